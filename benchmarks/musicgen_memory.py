"""Per-device memory of MusicRL on MusicGen small / medium / large, from XLA's compiled memory
analysis of the real RL step on the documented meshes (compiled, never run: nothing is
allocated, so a 3.3B model is measured on a laptop).

The LM config is what `python -m musicrl_jax.convert musicgen` writes for the published
checkpoints' shapes (T5-base text encoder, frozen; 4 EnCodec codebooks of 2048). The step holds
the policy (full fine-tuning: params + Adam moments; or LoRA adapters), the frozen reference
(with LoRA: the base, shared) and the reward models of MusicRL-R and -U on EnCodec tokens
(text, quality, preference; `models/small.gin` widths, replicated). Per device:

  state      trainable params + optimizer moments (sharded by the logical axis rules)
  frozen     reference LM + reward models
  temp       activations, KV caches, sampled clips, gradients (the step's scratch)
  total      everything the compiled step would hold at its peak

Meshes (virtual CPU devices stand in for the chips; memory analysis is per device):
  8xH100   data=1 fsdp=8 tensor=1   (80 GiB HBM per GPU)
  v5e-16   data=2 fsdp=8 tensor=1   (16 GiB HBM per chip)

state and frozen are exact from the shapes and the shardings; temp is XLA's buffer assignment
for the backend the script runs on. Measured on XLA:CPU with virtual devices (2 cores; one
compile takes minutes), musicgen-small at 500 frames: state 0.74 / frozen 0.60 / temp 64.5 GiB
per device, full fine-tuning, on both meshes, and LoRA r=16 0.11 / 0.60 / 63.9. That temp does
not shrink with the per-device batch (4 clips on both meshes), far above what the activations
and KV caches of 4 clips need, so XLA:CPU's figure is not the accelerator's: run this on the
target (`python benchmarks/musicgen_memory.py` on one host of the slice) for the real temp.

Usage:
  python benchmarks/musicgen_memory.py                      # all sizes, both meshes
  python benchmarks/musicgen_memory.py --sizes small --meshes 8xH100 --frames 250
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# The meshes need 16 devices; on a CPU host they are virtual (set before jax is imported).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=16").strip()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402

from rl_memory import compiled_memory  # noqa: E402  (the sibling benchmark's compile)
from musicrl_jax import convert, partitioning  # noqa: E402
from musicrl_jax.models import lora as lora_lib  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.rewards import RewardCombination, RewardModel  # noqa: E402
from musicrl_jax.training import rl  # noqa: E402
from musicrl_jax.training.reward_tasks import (  # noqa: E402
    PreferenceRewardTask, QualityRewardTask, TextRewardTask)

# The published checkpoints' shapes (facebook/musicgen-{small,medium,large} config.json).
DECODERS = {  # hidden, layers, heads, ffn
    "small": (1024, 24, 16, 4096),
    "medium": (1536, 48, 24, 6144),
    "large": (2048, 48, 32, 8192),
}
T5_BASE = {"model_type": "t5", "vocab_size": 32128, "d_model": 768, "num_layers": 12,
           "num_heads": 12, "d_kv": 64, "d_ff": 3072, "feed_forward_proj": "relu"}
MESHES = {  # name: (mesh sizes, HBM GiB per device)
    "8xH100": ({"data": 1, "fsdp": 8, "tensor": 1}, 80),
    "v5e-16": ({"data": 2, "fsdp": 8, "tensor": 1}, 16),
}
REWARD_WIDTHS = {"embed_dim": 512, "num_heads": 8, "head_dim": 64, "mlp_dim": 1536,
                 "num_encoder_layers": 4, "num_decoder_layers": 12}  # models/small.gin


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/musicgen_memory.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--meshes", default=",".join(MESHES))
    parser.add_argument("--frames", type=int, default=500, help="clip length (50 frames/s)")
    parser.add_argument("--captions_per_device", type=int, default=1)
    parser.add_argument("--samples_per_caption", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    args = parser.parse_args(argv)
    for flag, known in (("sizes", DECODERS), ("meshes", MESHES)):
        unknown = [name for name in _names(getattr(args, flag)) if name not in known]
        if unknown:
            parser.error(f"--{flag}: unknown {unknown}; choose from {','.join(known)}.")
    return args


def _names(comma_separated: str) -> list[str]:
    return [name.strip() for name in comma_separated.split(",") if name.strip()]


def musicgen_lm_config(size: str, frames: int, remat: str) -> music_lm.MusicLMConfig:
    hidden, layers, heads, ffn = DECODERS[size]
    hub_config = {
        "model_type": "musicgen", "text_encoder": T5_BASE,
        "audio_encoder": {"model_type": "encodec", "codebook_size": 2048},
        "decoder": {"model_type": "musicgen_decoder", "vocab_size": 2048, "num_codebooks": 4,
                    "hidden_size": hidden, "num_hidden_layers": layers,
                    "num_attention_heads": heads, "ffn_dim": ffn,
                    "max_position_embeddings": 2048}}
    config = convert.musicgen_config(hub_config, f"musicgen-{size} shapes", max_frames=frames,
                                     dtype="bfloat16")
    return dataclasses.replace(config, remat=remat)


def reward_combination(lm_config: music_lm.MusicLMConfig) -> RewardCombination:
    """MusicRL-R's and -U's reward models on the LM's tokens, with abstract params."""
    config = music_lm.MusicLMConfig(
        caption_vocab_size=lm_config.caption_vocab_size, codebook_size=lm_config.codebook_size,
        num_codebooks=lm_config.num_codebooks, max_frames=lm_config.max_frames,
        max_caption_length=lm_config.max_caption_length, dtype="bfloat16", **REWARD_WIDTHS)
    tasks = {"text": TextRewardTask(config=config, num_audio_layers=2, projection_dim=128),
             "quality": QualityRewardTask(config=config, num_audio_layers=2),
             "preference": PreferenceRewardTask(config=config, num_audio_layers=2,
                                                use_caption=True)}
    key = jax.random.PRNGKey(0)
    models = {name: RewardModel(task, jax.eval_shape(
        lambda k, t=task: partitioning.unbox(t.fresh_params(k)), key))
        for name, task in tasks.items()}
    return RewardCombination(rewards=models, weights={name: 1.0 for name in models},
                             reference_stats={name: {"mean": 0.0, "std": 1.0}
                                              for name in models})


def measure(config, mesh, args, lora) -> dict:
    rl_config = rl.RLConfig(samples_per_caption=args.samples_per_caption,
                            num_frames=config.max_frames)
    captions = args.captions_per_device * mesh.devices.size
    combination = reward_combination(config)
    return {**compiled_memory(config, rl_config, captions, lora, mesh, combination.reward_fn,
                              combination.params),
            "samples_per_step": captions * args.samples_per_caption}


def main(argv=None):
    args = parse_args(argv)
    rows = []
    print("| model | params | mesh | mode | state | frozen (ref + rewards) | temp | total "
          "per device | HBM | samples/step |\n|---|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for size in _names(args.sizes):
        config = musicgen_lm_config(size, args.frames, args.remat)
        params_m = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
            lambda r: music_lm.init_params(config, r), jax.random.PRNGKey(0)))) / 1e6
        for mesh_name in _names(args.meshes):
            sizes, hbm = MESHES[mesh_name]
            count = sizes["data"] * sizes["fsdp"] * sizes["tensor"]
            mesh = partitioning.make_mesh(**sizes, devices=jax.devices()[:count])
            for mode, lora in (("full", None),
                               (f"LoRA r={args.rank}", lora_lib.LoRAConfig(rank=args.rank))):
                row = {"model": size, "params_M": params_m, "mesh": mesh_name, "mode": mode,
                       "hbm_GiB": hbm, **measure(config, mesh, args, lora)}
                rows.append(row)
                print(f"| musicgen-{size} | {params_m:.0f}M | {mesh_name} | {mode} | "
                      f"{row['state_GiB']:.2f} | {row['frozen_GiB']:.2f} | "
                      f"{row['temp_GiB']:.2f} | **{row['total_GiB']:.2f}** | {hbm} | "
                      f"{row['samples_per_step']} |", flush=True)
    print(f"({args.frames} frames = {args.frames / 50:g} s of EnCodec-32kHz tokens, "
          f"{args.captions_per_device} caption(s) x {args.samples_per_caption} samples per "
          f"device, bf16 compute, f32 params and Adam moments, remat={args.remat})")
    return rows


if __name__ == "__main__":
    main()
