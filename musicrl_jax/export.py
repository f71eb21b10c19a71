"""Export a policy checkpoint (pretrained LM or RL fine-tuned) as a self-contained serving
artifact that `python -m musicrl_jax.generate` runs without any training code.

  python -m musicrl_jax.export --checkpoint_dir RUN/pretrain/checkpoints \
      --assets_dir DATA/musicrl_music_assets/demo --out DIR \
      [--gin_config RUN/pretrain/config.gin] [--gin_bindings ...] [--step N] \
      [--batch_size 4] [--num_frames N] [--top_k K] [--platforms cpu[,cuda,tpu]]

The artifact directory holds:

  sample_conditional.jax_export  the sampler, serialised with jax.export (StableHLO):
  sample_guided.jax_export         (params, caption_tokens int32 [B, L], keys uint32 [B, 2],
                                   temperature f32 [], guidance_weight f32 []) ->
                                   (codes int32 [B, frames, K], sample_logprobs f32 [B]);
                                   'conditional' skips the unconditional pass (guidance 1.0),
                                   'guided' runs classifier-free guidance with the given weight
  params.npz                     the weights, flattened to '/'-joined names (an argument of the
                                   programs, so the artifact is weights + program)
  vocab/captions.model           the SentencePiece caption vocabulary
  tokenizer/                     the audio tokenizer (codes -> waveform at its sample rate:
                                   16 kHz MelRVQ, or a converted EnCodec's, e.g. 32 kHz)
  config.json                    MusicLMConfig and the sampling settings fixed at export
  manifest.json                  format version, shapes, dtypes, sha256 of every file

Why jax.export rather than orbax-export / a TF SavedModel: serving runs the exact XLA program the
training code samples with (same `decoding.sample_with_runtime_settings`, same lowering), so a
seed gives bit-identical codes (tested); no TensorFlow (or jax2tf) in the serving path; one
artifact can carry lowerings for several platforms (`--platforms cpu,cuda,tpu`), checked
against the device at load time.

Fixed at export: the batch size B (generate pads the last partial batch), the number of frames
and top_k (lax.top_k needs a static k). Chosen at generation: the seed, temperature and guidance
weight (runtime scalar inputs). Waveform decoding is not part of the programs (MelRVQ's
Griffin-Lim runs in librosa), so the tokenizer's files are copied and generate decodes with
them. The programs are single-device (no sharding): serving a model too large for one
accelerator needs a sharded export, which this does not do.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from flax import traverse_util

from musicrl_jax import decoding, generate, partitioning
from musicrl_jax.errors import ConfigError, report_user_errors
from musicrl_jax.models import music_lm
from musicrl_jax.training import rl_finetune

PROG = "python -m musicrl_jax.export"


# --- restoring the policy ----------------------------------------------------------------------

def restore_policy_params(checkpoint_dir: str, config: music_lm.MusicLMConfig,
                          step: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """The policy's params as a flat {'/'-joined name: numpy array} dict, and where they came
    from ({'checkpoint_dir', 'kind', 'step'}); a pretrain or RL checkpoint."""
    directory, _, _ = rl_finetune.policy_checkpoint(checkpoint_dir, step)
    # One device whatever mesh the checkpoint was written from: Orbax reshards on restore.
    mesh = partitioning.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    params = rl_finetune.restore_policy_params(config, directory, mesh, step)
    # Asked for the latest, a damaged step was moved aside and the one before restored: the
    # latest step now is the one the params came from.
    _, step, meta = rl_finetune.policy_checkpoint(directory, step)
    flat = traverse_util.flatten_dict(jax.device_get(partitioning.unbox(params)), sep="/")
    return ({name: np.asarray(value) for name, value in flat.items()},
            {"checkpoint_dir": directory, "kind": meta["kind"], "step": int(step)})


# --- the exported programs ---------------------------------------------------------------------

def sampler(config: music_lm.MusicLMConfig, *, num_frames: int, top_k: int, guidance: bool):
    """The jitted function each program is exported from (flat params in, as stored)."""
    def sample(params, caption_tokens, keys, temperature, guidance_weight):
        nested = traverse_util.unflatten_dict(params, sep="/")
        out = decoding.sample_with_runtime_settings(
            config, nested, caption_tokens, keys, temperature, guidance_weight,
            num_frames=num_frames, top_k=top_k, guidance=guidance)
        return out["codes"], out["sample_logprobs"]
    return jax.jit(sample)


def _spec(shape, dtype) -> dict:
    return {"shape": list(shape), "dtype": str(np.dtype(dtype))}


def _check_assets(assets_dir: str, config: music_lm.MusicLMConfig):
    """The tokenizer and vocabulary directories, after checking they fit the model."""
    import sentencepiece as spm

    from musicrl_jax.audio.tokenizer import load_tokenizer_input

    tokenizer_dir = os.path.join(assets_dir, "tokenizer")
    vocab_path = os.path.join(assets_dir, generate.VOCAB_FILE)
    for path in (tokenizer_dir, vocab_path):
        if not os.path.exists(path):
            raise ConfigError(f"--assets_dir {assets_dir}: {path} is missing. Fix: pass the "
                              "dataset's assets directory (DATA_DIR/musicrl_music_assets/"
                              "CONFIG, which holds tokenizer/ and vocab/).")
    tokenizer = load_tokenizer_input(tokenizer_dir,
                                     f"--assets_dir {assets_dir}: the tokenizer does not load")
    if (tokenizer.num_codebooks, tokenizer.codebook_size) != (config.num_codebooks,
                                                               config.codebook_size):
        raise ConfigError(
            f"The tokenizer in {tokenizer_dir} has {tokenizer.num_codebooks} codebooks of "
            f"{tokenizer.codebook_size}, the model {config.num_codebooks} of "
            f"{config.codebook_size}. Fix: pass the assets the model was trained on.")
    vocab_size = spm.SentencePieceProcessor(model_file=vocab_path).GetPieceSize()
    if vocab_size > config.caption_vocab_size:
        raise ConfigError(
            f"The caption vocabulary {vocab_path} has {vocab_size} pieces but the model "
            f"embeds {config.caption_vocab_size}. Fix: pass the assets the model was trained on.")
    return tokenizer_dir, vocab_path, tokenizer.sample_rate


def export_policy(params: dict[str, np.ndarray], config: music_lm.MusicLMConfig, out_dir: str,
                  *, assets_dir: str, batch_size: int = 4, num_frames: int | None = None,
                  top_k: int = 0, platforms=("cpu",), source: dict | None = None) -> dict:
    """Writes the artifact (see the module docstring) to `out_dir`; returns its manifest."""
    num_frames = config.max_frames if num_frames is None else num_frames
    if not 1 <= num_frames <= config.max_frames:
        raise ConfigError(f"--num_frames={num_frames}: must be in 1..MusicLMConfig.max_frames="
                          f"{config.max_frames}.")
    if batch_size < 1 or not 0 <= top_k <= config.codebook_size:
        raise ConfigError(f"--batch_size={batch_size} must be >= 1 and --top_k={top_k} in "
                          f"0..{config.codebook_size}.")
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"--out {out_dir} exists and is not empty. Fix: choose a new "
                          "directory, or delete that one.")
    tokenizer_dir, vocab_path, sample_rate = _check_assets(assets_dir, config)

    # Written under a temporary name and renamed at the end, so a crash never leaves a
    # directory that looks like an artifact.
    staging = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, os.path.dirname(generate.VOCAB_FILE)))
    shutil.copytree(tokenizer_dir, os.path.join(staging, generate.TOKENIZER_DIR))
    shutil.copyfile(vocab_path, os.path.join(staging, generate.VOCAB_FILE))
    np.savez(os.path.join(staging, generate.PARAMS_FILE), **params)

    length = config.max_caption_length
    inputs = {"caption_tokens": _spec((batch_size, length), np.int32),
              "keys": _spec((batch_size, 2), np.uint32),
              "temperature": _spec((), np.float32), "guidance_weight": _spec((), np.float32)}
    outputs = {"codes": _spec((batch_size, num_frames, config.num_codebooks), np.int32),
               "sample_logprobs": _spec((batch_size,), np.float32)}
    abstract_args = (
        {name: jax.ShapeDtypeStruct(value.shape, value.dtype) for name, value in params.items()},
        *[jax.ShapeDtypeStruct(tuple(spec["shape"]), spec["dtype"]) for spec in inputs.values()])
    for name, filename in generate.PROGRAM_FILES.items():
        fn = sampler(config, num_frames=num_frames, top_k=top_k, guidance=name == "guided")
        try:
            exported = jax.export.export(fn, platforms=list(platforms))(*abstract_args)
        except ValueError as err:  # e.g. an unknown platform name
            shutil.rmtree(staging, ignore_errors=True)
            raise ConfigError(f"--platforms={','.join(platforms)}: {err}") from err
        with open(os.path.join(staging, filename), "wb") as f:
            f.write(exported.serialize())

    with open(os.path.join(staging, generate.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump({"model": dataclasses.asdict(config),
                   "sampling": {"num_frames": num_frames, "top_k": top_k},
                   "sample_rate": sample_rate}, f, indent=2, sort_keys=True)
    files = {}
    for root, _, names in os.walk(staging):
        for name in sorted(names):
            path = os.path.join(root, name)
            files[os.path.relpath(path, staging)] = {"sha256": generate.sha256_file(path),
                                                     "bytes": os.path.getsize(path)}
    manifest = {
        "format_version": generate.FORMAT_VERSION, "created_by": "musicrl_jax.export",
        "created_unix": int(time.time()), "jax_version": jax.__version__,
        "source": source or {}, "platforms": list(platforms),
        "batch_size": batch_size, "max_caption_length": length, "num_frames": num_frames,
        "num_codebooks": config.num_codebooks, "codebook_size": config.codebook_size,
        "top_k": top_k, "sample_rate": sample_rate,
        "prng_impl": jax.config.jax_default_prng_impl,
        "programs": dict(generate.PROGRAM_FILES), "inputs": inputs, "outputs": outputs,
        "params": {name: _spec(value.shape, value.dtype) for name, value in params.items()},
        "files": dict(sorted(files.items())),
    }
    with open(os.path.join(staging, generate.MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    if os.path.exists(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(staging, out_dir)
    return manifest


# --- CLI ---------------------------------------------------------------------------------------

def _parse_model_config(gin_config: str | None, meta: dict, bindings: list[str]):
    """MusicLMConfig and the gin-bound SamplingConfig: from --gin_config if given, else the
    model config the checkpoint recorded in its meta (older checkpoints: the MusicLMConfig
    bindings of its stored operative gin config); --gin_bindings on top."""
    import gin

    from musicrl_jax import main as entry_point

    if gin_config:
        entry_point.parse_gin([gin_config], bindings)
        return music_lm.MusicLMConfig(), decoding.SamplingConfig()
    stored_gin, recorded = meta.get("gin", ""), meta.get("model_config")
    if recorded is None and "MusicLMConfig." not in stored_gin:
        raise ConfigError(
            "The checkpoint records no model config and its stored gin config does not bind "
            "MusicLMConfig (the model was configured in Python). Fix: pass --gin_config with "
            "the MusicLMConfig bindings it was trained with (e.g. the stage's config.gin).")
    importlib.import_module("musicrl_jax.registry")  # registers every configurable
    try:
        gin.parse_config(stored_gin)
    except (ValueError, SyntaxError) as err:
        raise ConfigError(f"The checkpoint's stored gin config does not parse ({err}). "
                          "Fix: pass --gin_config.") from err
    entry_point.parse_gin([], bindings)
    config = music_lm.MusicLMConfig(**recorded) if recorded else music_lm.MusicLMConfig()
    return config, decoding.SamplingConfig()


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint_dir", required=True,
                        help="a policy stage's checkpoints/ directory (or its run directory)")
    parser.add_argument("--assets_dir", required=True,
                        help="dataset assets: holds tokenizer/ and vocab/")
    parser.add_argument("--out", required=True, help="artifact directory to create")
    parser.add_argument("--gin_config", help="default: the config the checkpoint stored")
    parser.add_argument("--gin_bindings", action="append", default=[])
    parser.add_argument("--step", type=int, default=None, help="default: the latest")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_frames", type=int, default=None,
                        help="default: MusicLMConfig.max_frames")
    parser.add_argument("--top_k", type=int, default=None,
                        help="default: the gin-bound SamplingConfig.top_k")
    parser.add_argument("--platforms", default="cpu",
                        help="comma-separated jax.export platforms: cpu, cuda, rocm, tpu")
    return parser.parse_args(argv)


def run(args) -> dict:
    _, _, meta = rl_finetune.policy_checkpoint(args.checkpoint_dir, args.step)
    config, sampling = _parse_model_config(args.gin_config, meta, args.gin_bindings)
    params, source = restore_policy_params(args.checkpoint_dir, config, args.step)
    top_k = sampling.top_k if args.top_k is None else args.top_k
    return export_policy(params, config, args.out, assets_dir=args.assets_dir,
                         batch_size=args.batch_size, num_frames=args.num_frames, top_k=top_k,
                         platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip()),
                         source=source)


@report_user_errors(PROG)
def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    manifest = run(args)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"Exported {manifest['source']['kind']} step {manifest['source']['step']} to "
          f"{args.out}: {size / 2**20:.1f} MiB, batch {manifest['batch_size']}, "
          f"{manifest['num_frames']} frames, platforms {','.join(manifest['platforms'])} "
          f"({time.perf_counter() - start:.1f} s)")
    return manifest


if __name__ == "__main__":
    main()
