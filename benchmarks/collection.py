"""Benchmark of feedback collection: judged clips per second, and where the time goes.

Runs the real `collection.collect` (preferences: two clips per caption, sampled by the LM,
decoded by the tokenizer, measured and judged by the simulated panel) with the demo's fitted
tokenizer and an LM of the demo's size: a pretrained one (--lm_dir, e.g. runs/demo/pretrain),
or random weights. A trained LM repeats frames, which decoding inverts once per batch, so it
collects faster than random weights. For each listener it times its parts on one batch:

  sample      jit(decoding.sample) of the batch's clips (KV cache)
  magnitude   tokenizer.decode_magnitude: codes -> log-mel -> STFT magnitude (mel inversion)
  griffin-lim the rest of tokenizer.decode: phase reconstruction -> waveform
  judge       features.measure_magnitude (spectrum) or features.measure (waveform) + scoring

judged clips/s = clips judged by `collect` / its wall time after a warm-up batch. The
spectrum listener judges on a worker thread while the next batch samples. With the demo
corpus present, it also prints how often the panel's expected preference between two
tokenized corpus clips is the same for both listeners, and for two Griffin-Lim seeds.

With --before REV it also times the collection code of git revision REV (extracted with
`git archive`, run in a subprocess) on the same LM, tokenizer, prompts and batch size, and
prints after/before: a421b72 is the last revision before the spectrum listener.

Usage (after `make demo` or the data build, which fit the tokenizer):
  python benchmarks/collection.py
  python benchmarks/collection.py --pairs 256 --batch_size 32
  python benchmarks/collection.py --lm_dir runs/demo/pretrain --pairs 256 --before a421b72
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from musicrl_jax import collection, decoding, partitioning, raters  # noqa: E402
from musicrl_jax.audio.tokenizer import load_tokenizer_input  # noqa: E402
from musicrl_jax.data import corpus  # noqa: E402
from musicrl_jax.data.musicrl_music import read_wav  # noqa: E402
from musicrl_jax.errors import ConfigError, report_user_errors  # noqa: E402
from musicrl_jax.models import music_lm  # noqa: E402
from musicrl_jax.training import rl_finetune  # noqa: E402

PROG = "python benchmarks/collection.py"
DEFAULT_TOKENIZER = os.path.join(REPO_ROOT, "data_cache", "musicrl_music_assets", "demo",
                                 "tokenizer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer_dir", default=DEFAULT_TOKENIZER)
    parser.add_argument("--pairs", type=int, default=64, help="preference pairs to collect")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=125, help="frames per clip (5 s)")
    parser.add_argument("--lm_dir", default=None,
                        help="a pretraining run of the demo LM on this tokenizer's codes "
                             "(default: random weights)")
    parser.add_argument("--griffin_lim_iters", type=int, default=16,
                        help="the tokenizer's (a fresh demo fits it with 16)")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also time collection.collect of this git revision (e.g. a421b72)")
    parser.add_argument("--before_griffin_lim_iters", type=int, default=32,
                        help="Griffin-Lim iterations for --before (32: a421b72's default)")
    parser.add_argument("--agreement_clips", type=int, default=128,
                        help="tokenized corpus clips for the listener agreement (0: skip)")
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


# Runs against an older tree, so it uses only what `collect` has always taken.
_BEFORE_TIMING = """
import dataclasses, os, pickle, sys, tempfile, time
from musicrl_jax import collection, partitioning, raters
from musicrl_jax.audio.tokenizer import load_tokenizer
from musicrl_jax.models import music_lm
job = pickle.load(open(sys.argv[1], "rb"))
tokenizer = load_tokenizer(job["tokenizer_dir"])
tokenizer.griffin_lim_iters = job["griffin_lim_iters"]
fields = {f.name for f in dataclasses.fields(music_lm.MusicLMConfig)}
config = music_lm.MusicLMConfig(**{k: v for k, v in job["config"].items() if k in fields})
setup = dict(lm_config=config, params=job["params"], tokenizer=tokenizer,
             panel=raters.RaterPanel.sample(40, 0), prompts=collection.Prompts(*job["prompts"]),
             batch_size=job["batch_size"], num_frames=job["frames"], show_progress=False,
             mesh=partitioning.make_mesh())
with tempfile.TemporaryDirectory() as tmp:
    collection.collect("preferences", os.path.join(tmp, "warmup"), num_items=job["batch_size"],
                       **setup)
    start = time.perf_counter()
    collection.collect("preferences", os.path.join(tmp, "timed"), num_items=job["pairs"], **setup)
    print("CLIPS_PER_S", 2 * job["pairs"] / (time.perf_counter() - start))
"""


def time_revision(revision: str, job: dict) -> float:
    """Judged clips/s of `collect` as it was at `revision` (same job, fresh process)."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", REPO_ROOT, "archive", revision, "musicrl_jax"],
                                 capture_output=True)
        if archive.returncode:
            raise ConfigError(f"--before={revision}: git cannot read that revision "
                              f"({archive.stderr.decode().strip()}). Fix: pass a commit of "
                              "this repository, e.g. a421b72.")
        subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
        job_path = os.path.join(tree, "job.pkl")
        with open(job_path, "wb") as f:
            pickle.dump(job, f)
        run = subprocess.run([sys.executable, "-c", _BEFORE_TIMING, job_path], cwd=tree,
                             env={**os.environ, "PYTHONPATH": tree}, capture_output=True,
                             text=True)
        lines = [l for l in run.stdout.splitlines() if l.startswith("CLIPS_PER_S")]
        if run.returncode or not lines:
            raise SystemExit(f"--before={revision}: its collection failed:\n{run.stderr[-2000:]}")
        return float(lines[-1].split()[1])


def listener_agreement(tokenizer, corpus_dir: str, count: int, panel, seed: int = 0):
    """Share of random pairs of tokenized corpus clips where the panel's mean utility picks
    the same clip under both listeners, and under two Griffin-Lim seeds (phase noise)."""
    specs = [dataclasses.asdict(c) for c in corpus.load_manifest(corpus_dir)[:count]]
    samples = tokenizer.num_samples(125)
    waves = np.stack([np.pad(w[:samples], (0, samples - len(w[:samples]))) for w in
                      (read_wav(os.path.join(corpus_dir, m["wav"])) for m in specs)])
    codes = np.asarray(tokenizer.encode(waves))
    mean_utility = {}
    for name, listener in (("spectrum", "spectrum"), ("waveform", "waveform"),
                           ("waveform seed 1", "waveform")):
        tokenizer.seed = 1 if name.endswith("1") else 0
        attrs = collection._attributes(tokenizer, collection._decode(tokenizer, codes, listener),
                                       specs, listener)
        mean_utility[name] = panel.utilities(attrs).mean(axis=0)
    tokenizer.seed = 0
    order = np.random.default_rng(seed).permutation(len(codes))
    first, second = order[:len(order) // 2], order[len(order) // 2:2 * (len(order) // 2)]

    def picks(name):
        return mean_utility[name][first] > mean_utility[name][second]
    return (float(np.mean(picks("spectrum") == picks("waveform"))),
            float(np.mean(picks("waveform") == picks("waveform seed 1"))))


@report_user_errors(PROG)
def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(args.tokenizer_dir):
        raise ConfigError(f"--tokenizer_dir={args.tokenizer_dir}: no fitted tokenizer there. "
                          "Fix: build the demo data first (make demo, or python -m "
                          "musicrl_jax.data.build --data_dir data_cache --config demo).")
    tokenizer = load_tokenizer_input(args.tokenizer_dir, f"--tokenizer_dir={args.tokenizer_dir}")
    tokenizer.griffin_lim_iters = args.griffin_lim_iters
    config = demo_lm_config(tokenizer, args.frames)
    if args.lm_dir:
        _, step, meta = rl_finetune.policy_checkpoint(args.lm_dir)
        config = music_lm.MusicLMConfig(**{**meta["model_config"], "max_frames": args.frames})
        params = rl_finetune.restore_policy_params(config, args.lm_dir, step=step)
        lm = f"the LM of {args.lm_dir} (step {step})"
    else:
        params = partitioning.unbox(music_lm.init_params(config, jax.random.PRNGKey(0)))
        lm = "a random-weight LM"
    panel = raters.RaterPanel.sample(40, 0)
    setup = dict(lm_config=config, params=params, tokenizer=tokenizer, panel=panel,
                 prompts=prompts(config), batch_size=args.batch_size, num_frames=args.frames,
                 show_progress=False, mesh=partitioning.make_mesh())
    clips = 2 * args.pairs
    result = {}
    for listener in collection.LISTENERS:
        with tempfile.TemporaryDirectory() as tmp:
            collection.collect("preferences", os.path.join(tmp, "warmup"), listener=listener,
                               num_items=args.batch_size, **setup)  # compiles
            start = time.perf_counter()
            collection.collect("preferences", os.path.join(tmp, "timed"), listener=listener,
                               num_items=args.pairs, **setup)
            result[f"{listener}_clips_per_s"] = clips / (time.perf_counter() - start)

    # One batch's parts, outside `collect`.
    batch = setup["prompts"]
    captions = batch.caption_tokens[:args.batch_size]
    metas = batch.metas[:len(captions)]
    rngs = decoding.example_rngs(jax.random.PRNGKey(1), len(captions))
    codes, t_sample = timed(lambda: decoding.sample(config, params, captions, rngs,
                                                    num_frames=args.frames)["codes"])
    codes = np.asarray(codes)
    def fresh_magnitude():  # an empty frame memo: what a batch of new clips costs
        tokenizer._frame_magnitudes.clear()
        return tokenizer.decode_magnitude(codes)
    magnitude, t_magnitude = timed(fresh_magnitude)
    audio, t_griffin_lim = timed(lambda: tokenizer._phase(magnitude))
    _, t_judge_spectrum = timed(lambda: collection._attributes(tokenizer, magnitude, metas,
                                                               "spectrum"))
    _, t_judge_waveform = timed(lambda: collection._attributes(tokenizer, audio, metas,
                                                               "waveform"))
    per_clip = {k: 1000 * v / len(captions) for k, v in
                (("sample", t_sample), ("magnitude", t_magnitude),
                 ("griffin-lim", t_griffin_lim), ("judge spectrum", t_judge_spectrum),
                 ("judge waveform", t_judge_waveform))}
    print(f"collect with {lm}: {clips} clips ({args.pairs} pairs, batches of "
          f"{args.batch_size}) on "
          f"{jax.device_count()} x {jax.devices()[0].platform}, Griffin-Lim "
          f"{tokenizer.griffin_lim_iters} iterations: judged clips/s "
          + ", ".join(f"{k.split('_')[0]} listener {v:.2f}" for k, v in result.items())
          + "; per clip: " + ", ".join(f"{k} {v:.0f} ms" for k, v in per_clip.items()),
          flush=True)
    result.update({f"{k.replace(' ', '_').replace('-', '_')}_ms": v for k, v in per_clip.items()})
    if args.before:
        job = dict(tokenizer_dir=args.tokenizer_dir,
                   griffin_lim_iters=args.before_griffin_lim_iters,
                   config=dataclasses.asdict(config), params=jax.device_get(params),
                   prompts=dataclasses.astuple(setup["prompts"]), batch_size=args.batch_size,
                   frames=args.frames, pairs=args.pairs)
        before = time_revision(args.before, job)
        after = result["spectrum_clips_per_s"]
        print(f"collect at {args.before} (Griffin-Lim {args.before_griffin_lim_iters} "
              f"iterations): {before:.2f} judged clips/s; now: {after:.2f} "
              f"(spectrum listener): {after / before:.1f}x", flush=True)
        result.update(before_clips_per_s=before, speedup=after / before)
    corpus_dir = os.path.join(os.path.dirname(args.tokenizer_dir), "corpus")
    if args.agreement_clips and os.path.isdir(corpus_dir):
        same, seeds = listener_agreement(tokenizer, corpus_dir, args.agreement_clips, panel)
        print(f"panel's mean preference on {args.agreement_clips // 2} pairs of tokenized corpus "
              f"clips: spectrum vs waveform listener agree on {same:.1%}; waveform with two "
              f"Griffin-Lim seeds agree on {seeds:.1%}", flush=True)
        result.update(listener_agreement=same, griffin_lim_seed_agreement=seeds)
    return result


if __name__ == "__main__":
    main()
