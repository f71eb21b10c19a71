"""Roofline arithmetic for the music LM on one accelerator chip: the best step times the chip's
peak FLOP/s and HBM bandwidth allow, to read measured figures against (docs/PERFORMANCE.md).

Per model (gin_configs/models/*.gin with the decode benchmark's vocabulary macros) and chip:

  train    FLOPs of one pretraining example (`MusicLMTask.flops_per_example`: 3 x forward,
           matmuls + attention) and the examples/s the chip's peak gives (MFU 100%);
  rl       one RL sample: the sampling forward, the reference's teacher-forced forward, and
           the update's forward + backward (3 x forward) = 5 forwards;
  decode   one KV-cache step at --batch clips: FLOPs (2 x decoder weights x batch, attention over
           the mean context) vs bytes (decoder weights once + every clip's KV cache at the mean
           context + its cross-attention keys/values), the step time each bound gives, which
           bound binds, and the frames/s it caps.

bf16 weights and activations; chip peaks are dense bf16 (datasheets).

Usage:
  python benchmarks/roofline.py                        # base and large, v5e and H100
  python benchmarks/roofline.py --models small --frames 250 --batch 16
"""

from __future__ import annotations

import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rl_step import load_config  # noqa: E402  (the sibling benchmark's model loading)
from musicrl_jax.errors import report_user_errors  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.training.tasks import MusicLMTask  # noqa: E402

CHIPS = {  # name: (peak bf16 TFLOP/s, HBM TB/s, HBM GiB)
    "v5e": (197.0, 0.819, 16),
    "H100": (989.0, 3.35, 80),
}
BF16 = 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="base,large")
    parser.add_argument("--chips", default=",".join(CHIPS))
    parser.add_argument("--frames", type=int, default=500, help="clip length (50 frames/s)")
    parser.add_argument("--batch", type=int, default=64, help="clips decoded together")
    args = parser.parse_args(argv)
    unknown = [c for c in args.chips.split(",") if c not in CHIPS]
    if unknown:
        parser.error(f"--chips {unknown}: choose among {list(CHIPS)}")
    return args


def model_figures(config: music_lm.MusicLMConfig, frames: int, batch: int) -> dict:
    shapes = jax.eval_shape(lambda r: music_lm.init_params(config, r), jax.random.PRNGKey(0))
    flat = jax.tree_util.tree_leaves_with_path(shapes)
    total = sum(int(np.prod(x.shape)) for _, x in flat)
    decoder = sum(int(np.prod(x.shape)) for path, x in flat
                  if "decoder" in jax.tree_util.keystr(path)
                  or "heads" in jax.tree_util.keystr(path))
    example = {"audio_codes": np.zeros((1, frames, config.num_codebooks)),
               "caption_tokens": np.zeros((1, config.max_caption_length))}
    train = MusicLMTask(train_source=None, eval_source=None,
                        config=config).flops_per_example(example)
    attn_width = config.num_heads * config.head_dim
    mean_context = (frames + config.num_codebooks - 1) / 2
    layers = config.num_decoder_layers
    # Per decode step and clip: weights' matmuls + scores/values over the cached self- and
    # cross-attention keys.
    step_flops = batch * (2 * decoder + 4 * layers * attn_width
                          * (mean_context + config.max_caption_length))
    kv_bytes = batch * layers * 2 * attn_width * BF16 * (mean_context
                                                         + config.max_caption_length)
    return {"params_M": total / 1e6, "decoder_M": decoder / 1e6, "train_flops": train,
            "rl_flops": train / 3 * 5, "decode_step_flops": step_flops,
            "decode_step_bytes": decoder * BF16 + kv_bytes, "kv_bytes": kv_bytes}


@report_user_errors("python benchmarks/roofline.py")
def main(argv=None):
    args = parse_args(argv)
    rows = []
    print("| model | params (decoder) | chip | train examples/s at 100% MFU | RL samples/s at "
          "100% MFU | decode step: compute / memory bound | bound | decode frames/s cap |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        config = load_config(name, args.frames)
        fig = model_figures(config, args.frames, args.batch)
        for chip in args.chips.split(","):
            peak, bandwidth, _ = CHIPS[chip]
            compute_s = fig["decode_step_flops"] / (peak * 1e12)
            memory_s = fig["decode_step_bytes"] / (bandwidth * 1e12)
            row = {"model": name, "chip": chip, **fig,
                   "train_examples_per_s": peak * 1e12 / fig["train_flops"],
                   "rl_samples_per_s": peak * 1e12 / fig["rl_flops"],
                   "decode_compute_ms": compute_s * 1e3, "decode_memory_ms": memory_s * 1e3,
                   "decode_frames_per_s": args.batch / max(compute_s, memory_s)}
            rows.append(row)
            print(f"| {name} | {fig['params_M']:.0f}M ({fig['decoder_M']:.0f}M) | {chip} | "
                  f"{row['train_examples_per_s']:.0f} | {row['rl_samples_per_s']:.0f} | "
                  f"{row['decode_compute_ms']:.3f} / {row['decode_memory_ms']:.3f} ms | "
                  f"{'memory' if memory_s > compute_s else 'compute'} | "
                  f"{row['decode_frames_per_s']:,.0f} |", flush=True)
    print(f"({args.frames} frames per clip, decode batch {args.batch}, caption "
          f"{config.max_caption_length} tokens, {config.num_codebooks} codebooks of "
          f"{config.codebook_size}; bf16; peaks: "
          + ", ".join(f"{c} {p:g} TFLOP/s, {b:g} TB/s" for c, (p, b, _) in CHIPS.items()) + ")")
    return rows


if __name__ == "__main__":
    main()
