"""`make demo`: the MusicRL recipe end to end at toy scale, every output under one run directory.

Stages so far: build the music data (corpus, tokenizer, caption vocabulary, TFDS; cached in the
data directory), pretrain the music LM, sample clips for held-out captions with the KV-cache
sampler and decode them to WAV. Each stage resumes from its own checkpoints or caches, so
rerunning the demo continues work.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import gin
import jax
import numpy as np

from musicrl_jax import decoding, partitioning
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import trainer


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def eval_history(workdir: str) -> dict[int, dict]:
    """{step: eval metrics}; later lines win (a resumed run rewrites the steps it redid)."""
    return {row["step"]: row["eval"] for row in read_metrics(workdir) if "eval" in row}


def _music_prompts(assets_dir: str, count: int, caption_length: int, vocab_limit: int):
    from musicrl_jax.data import tasks, vocab
    vocabulary = vocab.load_caption_vocabulary(os.path.join(assets_dir, "vocab"))
    if vocabulary.vocab_size > vocab_limit:
        raise ConfigError(
            f"The caption vocabulary has {vocabulary.vocab_size} pieces but "
            f"MusicLMConfig.caption_vocab_size={vocab_limit}. Fix: raise CAPTION_VOCAB_SIZE.")
    prompts = tasks.prompts("validation", caption_length)
    return prompts["caption_tokens"][:count], [str(c) for c in prompts["caption"][:count]]


def _write_audio(assets_dir: str, codes, run_dir: str) -> list[str]:
    from musicrl_jax.audio import listen
    from musicrl_jax.audio.tokenizer import load_tokenizer
    from musicrl_jax.data import corpus
    tokenizer = load_tokenizer(os.path.join(assets_dir, "tokenizer"))
    samples_dir = os.path.join(run_dir, "samples")
    wavs = listen.codes_to_wavs(tokenizer, codes, samples_dir, prefix="pretrained_lm")
    # One real clip through the tokenizer, to hear what the tokens can carry at best.
    clip = corpus.load_manifest(os.path.join(assets_dir, "corpus"), "test")[0]
    listen.round_trip_wav(tokenizer, os.path.join(assets_dir, "corpus", clip.wav), samples_dir)
    return wavs


def train_stage(name: str, task_factory: Callable, run_dir: str) -> dict:
    """Trains one stage in `run_dir/name` under the gin scope `name`, so a run file can set
    e.g. `text_reward/train.num_steps` apart from the other stages."""
    with gin.config_scope(name):
        task = task_factory()
        result = trainer.train(task=task, workdir=os.path.join(run_dir, name))
    return {**result, "task": task}


@gin.configurable
def demo(run_dir: str = gin.REQUIRED, pretrain_task: Callable = gin.REQUIRED,
         text_reward_task: Callable | None = None,
         prepare_data: Callable | None = None, register_tasks: Callable | None = None,
         num_sample_captions: int = 8, sample_frames: int | None = None,
         sampling=decoding.SamplingConfig(), seed: int = 0):
    """Runs the recipe's stages in order. Tasks are factories, called after the data stage so
    that their sources read the freshly built data."""
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    assets = None
    if prepare_data is not None:
        print("== data: corpus, tokenizer, caption vocabulary, TFDS (cached) ==", flush=True)
        assets = prepare_data()
        register_tasks()

    print("== pretrain the music LM ==", flush=True)
    result = train_stage("pretrain", pretrain_task, run_dir)
    task = result["task"]
    pretrain_dir = os.path.join(run_dir, "pretrain")
    history = eval_history(pretrain_dir)
    first, last = min(history), max(history)
    config = task.config

    text_reward = None
    if text_reward_task is not None:
        print("== text-adherence reward (MuLan-style dual encoder) ==", flush=True)
        text_reward = train_stage("text_reward", text_reward_task, run_dir)

    print("== sample held-out captions ==", flush=True)
    if assets:
        captions, caption_texts = _music_prompts(assets, num_sample_captions,
                                                 config.max_caption_length,
                                                 config.caption_vocab_size)
    else:
        captions = next(task.eval_source.eval_batches(num_sample_captions))["caption_tokens"]
        caption_texts = [" ".join(map(str, c[c > 0])) for c in captions]
    frames = sample_frames or config.max_frames
    samples = decoding.sample(config, result["state"].params, captions,
                              decoding.example_rngs(jax.random.PRNGKey(seed), len(captions)),
                              num_frames=frames, sampling=sampling)
    codes = np.asarray(samples["codes"])
    samples_dir = os.path.join(run_dir, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    np.savez(os.path.join(samples_dir, "pretrained_lm.npz"), caption_tokens=np.asarray(captions),
             codes=codes, captions=np.array(caption_texts))
    wavs = _write_audio(assets, codes, run_dir) if assets else []

    mesh = partitioning.make_mesh()
    report = [
        "# musicrl_jax demo report", "",
        f"Devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {dict(mesh.shape)}", "",
    ]
    if assets:
        build = json.load(open(os.path.join(assets, "corpus", "build_log.json")))
        report += [
            "## 1. Data", "",
            f"- corpus: {build['clips']} clips ({build['clips_per_split']}), "
            f"{build['distinct_captions']} distinct captions, "
            f"{len(build.get('styles', {}))} styles, {len(build.get('instruments', {}))} "
            f"instruments -> `{os.path.join(assets, 'corpus')}`",
            f"- audio tokenizer, caption vocabulary: `{assets}`",
            "- tokenizer round trip of a test clip: `samples/*.original.wav` vs "
            "`samples/*.tokenized_000.wav`", ""]
    report += [
        "## 2. Pretraining (music LM, next-token loss)", "",
        f"- steps: {result['step']}",
        f"- validation loss: {history[first]['loss']:.4f} (step {first}) -> "
        f"{history[last]['loss']:.4f} (step {last})",
        f"- checkpoints: `{os.path.join(pretrain_dir, 'checkpoints')}`", "",
    ]
    if text_reward:
        metrics = text_reward["eval"]
        report += [
            "## 3. Text-adherence reward (contrastive dual encoder; reward = cosine)", "",
            f"- steps: {text_reward['step']}; held-out retrieval over "
            f"{metrics.get('num_captions', 0):.0f} captions: "
            + ", ".join(f"{k} {metrics[k]:.3f}" for k in sorted(metrics) if "recall" in k
                        or "chance" in k),
            f"- checkpoints: `{os.path.join(run_dir, 'text_reward', 'checkpoints')}`", ""]
    report += [
        f"## {4 if text_reward else 3}. Samples from the pretrained LM", "",
        f"{len(captions)} held-out captions x {frames} frames x {config.num_codebooks} codebooks "
        f"(KV-cache sampling, {sampling}) -> `samples/pretrained_lm.npz`", "",
    ]
    for i, text in enumerate(caption_texts):
        report.append(f"- {text}" + (f" -> `samples/{os.path.basename(wavs[i])}`" if wavs else ""))
    with open(os.path.join(run_dir, "report.md"), "w") as f:
        f.write("\n".join(report) + "\n")
    print("\n".join(report))
    print(f"\nRun directory: {run_dir}")
    return run_dir
