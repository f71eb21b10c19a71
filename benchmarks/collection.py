"""Benchmark of feedback collection: judged clips per second, and where the time goes.

Runs the real `collection.collect` (preferences: two clips per caption, sampled by the LM,
decoded to audio by the tokenizer, measured and judged by the simulated panel) with the demo's
LM size (random weights: the cost does not depend on them) and the demo's fitted tokenizer, and
times its parts on one batch:

  sample     jit(decoding.sample) of the batch's clips (KV cache)
  decode     tokenizer.decode: codes -> log-mel -> STFT magnitude (mel inversion, NNLS) ->
             Griffin-Lim waveform
  judge      features.batch_attributes + the raters' choices

judged clips/s = clips judged by `collect` / its wall time after a warm-up batch.

Usage (after `make demo` or the data build, which fit the tokenizer):
  python benchmarks/collection.py
  python benchmarks/collection.py --pairs 256 --batch_size 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from musicrl_jax import collection, decoding, partitioning, raters  # noqa: E402
from musicrl_jax.audio import features  # noqa: E402
from musicrl_jax.audio.tokenizer import load_tokenizer  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402

DEFAULT_TOKENIZER = os.path.join(REPO_ROOT, "data_cache", "musicrl_music_assets", "demo",
                                 "tokenizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer_dir", default=DEFAULT_TOKENIZER)
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs to collect")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=125, help="frames per clip (5 s)")
    return parser.parse_args(argv)


def demo_lm_config(tokenizer, frames: int) -> music_lm.MusicLMConfig:
    gin.clear_config()
    gin.add_config_file_search_path(os.path.join(REPO_ROOT, "gin_configs"))
    gin.parse_config_files_and_bindings(
        ["models/demo.gin"],
        [f"CODEBOOK_SIZE = {tokenizer.codebook_size}", f"NUM_CODEBOOKS = {tokenizer.num_codebooks}",
         f"MAX_FRAMES = {frames}", "CAPTION_VOCAB_SIZE = 768", "CAPTION_LENGTH = 64",
         f"MusicLMConfig.frames_per_second = {tokenizer.frame_rate}"])
    return music_lm.MusicLMConfig()


def prompts(config, count: int = 64, seed: int = 0) -> collection.Prompts:
    rng = np.random.default_rng(seed)
    tokens = np.zeros((count, config.max_caption_length), np.int32)
    tokens[:, :24] = rng.integers(3, config.caption_vocab_size, (count, 24))
    tokens[:, 24] = decoding.EOS_ID
    metas = [{"tempo_bpm": int(rng.integers(60, 160)), "key_pitch_class": int(rng.integers(12)),
              "key_mode": "major" if i % 2 else "minor", "drums": bool(i % 3 == 0),
              "instruments": [{"program": int(rng.integers(0, 72)), "role": "melody"}]}
             for i in range(count)]
    return collection.Prompts(tokens, [f"caption {i}" for i in range(count)], metas)


def timed(fn):
    jax.block_until_ready(fn())  # compile (these shapes differ from collect's sharded ones)
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(args.tokenizer_dir):
        raise SystemExit(f"--tokenizer_dir={args.tokenizer_dir}: no fitted tokenizer there. "
                         "Fix: build the demo data first (make demo, or python -m "
                         "musicrl_jax.data.build --data_dir data_cache --config demo).")
    tokenizer = load_tokenizer(args.tokenizer_dir)
    config = demo_lm_config(tokenizer, args.frames)
    params = partitioning.unbox(music_lm.init_params(config, jax.random.PRNGKey(0)))
    panel = raters.RaterPanel.sample(40, 0)
    setup = dict(lm_config=config, params=params, tokenizer=tokenizer, panel=panel,
                 prompts=prompts(config), batch_size=args.batch_size, num_frames=args.frames,
                 show_progress=False, mesh=partitioning.make_mesh())
    with tempfile.TemporaryDirectory() as tmp:
        collection.collect("preferences", os.path.join(tmp, "warmup"),
                           num_items=args.batch_size, **setup)  # compiles
        start = time.perf_counter()
        collection.collect("preferences", os.path.join(tmp, "timed"), num_items=args.pairs,
                           **setup)
        elapsed = time.perf_counter() - start

    # One batch's parts, outside `collect`.
    batch = setup["prompts"]
    captions = batch.caption_tokens[:args.batch_size]
    rngs = decoding.example_rngs(jax.random.PRNGKey(1), len(captions))
    codes, t_sample = timed(lambda: decoding.sample(config, params, captions, rngs,
                                                    num_frames=args.frames)["codes"])
    audio, t_decode = timed(lambda: tokenizer.decode(np.asarray(codes)))
    log_mel = tokenizer.tokens_to_log_mel(np.asarray(codes))
    _, t_mel_inversion = timed(lambda: tokenizer.mel_power_to_linear_power(
        tokenizer.log_mel_to_power(log_mel).swapaxes(-1, -2)))
    _, t_judge = timed(lambda: features.batch_attributes(audio, tokenizer.sample_rate,
                                                         batch.metas[:len(captions)]))
    clips = 2 * args.pairs
    per_clip = {k: 1000 * v / len(captions) for k, v in
                (("sample", t_sample), ("decode", t_decode),
                 ("of which mel inversion", t_mel_inversion), ("judge", t_judge))}
    print(f"collect: {clips} clips ({args.pairs} pairs, batches of {args.batch_size}) in "
          f"{elapsed:.1f} s = {clips / elapsed:.2f} judged clips/s on "
          f"{jax.device_count()} x {jax.devices()[0].platform}; per clip: "
          + ", ".join(f"{k} {v:.0f} ms" for k, v in per_clip.items()), flush=True)
    return {"judged_clips_per_s": clips / elapsed,
            **{f"{k.replace(' ', '_')}_ms": v for k, v in per_clip.items()}}


if __name__ == "__main__":
    main()
