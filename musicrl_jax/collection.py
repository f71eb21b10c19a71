"""Feedback collection: sample clips from a model for prompt captions, decode them to audio, let
the rater panel judge them, and stream the judgements to disk as `data/feedback.py` shards.

  ratings:     one clip per caption, one rater gives it 1-5 (-> the quality reward)
  preferences: two clips per caption, one rater picks one, or ties or skips (-> the preference
               reward), as the paper's users did with two clips from the deployed model

Work is cut into batches; each batch becomes one shard (`ratings-00012.jsonl`), written whole or
not at all, so a killed job resumes from the first missing shard and a finished job is a no-op.
Raters hear decoded audio only, never tokens: with listener="spectrum" (the default, for a
tokenizer that has `decode_magnitude`) they judge the decoded STFT magnitude
(`features.measure_magnitude`, no Griffin-Lim), with "waveform" the Griffin-Lim waveform, as
`evaluation` does. A batch is decoded, judged and written on a worker thread while the next
one is sampled (`benchmarks/collection.py` prints the speed of both listeners).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np
import threadpoolctl
from tqdm import tqdm

from musicrl_jax import decoding, partitioning, raters
from musicrl_jax.audio import features
from musicrl_jax.data import feedback
from musicrl_jax.errors import ConfigError


@dataclasses.dataclass
class Prompts:
    """Captions to collect on: tokens [n, text_length] (padded), texts, and each caption's
    metadata (tempo, key, instruments: what the raters compare the audio with)."""
    caption_tokens: np.ndarray
    captions: Sequence[str]
    metas: Sequence[dict[str, Any]]

    def __post_init__(self):
        if not (len(self.caption_tokens) == len(self.captions) == len(self.metas)) or not len(
                self.captions):
            raise ConfigError(f"Prompts: {len(self.caption_tokens)} token rows, "
                              f"{len(self.captions)} captions and {len(self.metas)} metadata "
                              "records; expected the same non-zero number.")


def _shard_path(out_dir: str, kind: str, index: int) -> str:
    return os.path.join(out_dir, f"{kind}-{index:05d}.jsonl")


LISTENERS = ("spectrum", "waveform")


def _sample_codes(config, params, caption_tokens, rngs, num_frames, sampling, mesh):
    """Codes [n, frames, K] for `caption_tokens` [n, length] with per-example `rngs` [n]."""
    size = len(caption_tokens)
    if mesh is not None:  # split the batch over the mesh's batch axes, beside sharded params
        pad = -size % partitioning.batch_divisor(mesh)  # a short last batch repeats a row
        caption_tokens = np.concatenate([caption_tokens, np.repeat(caption_tokens[:1], pad, 0)])
        rngs = jax.numpy.concatenate([rngs, jax.numpy.repeat(rngs[:1], pad, 0)])
        caption_tokens = partitioning.shard_batch({"c": caption_tokens}, mesh)["c"]
    codes = decoding.sample(config, params, caption_tokens, rngs, num_frames=num_frames,
                            sampling=sampling)["codes"]
    return np.asarray(codes)[:size]


def hear(tokenizer, codes, metas, listener: str = "spectrum") -> list[dict[str, float]]:
    """The attributes the raters judge for clips `codes` [n, frames, K] of captions `metas`,
    as `collect` hears them (one per clip)."""
    if listener == "spectrum" and not hasattr(tokenizer, "decode_magnitude"):
        listener = "waveform"  # a codec without a spectrogram stage is heard as audio
    return _attributes(tokenizer, _decode(tokenizer, codes, listener), metas, listener)


def _decode(tokenizer, codes, listener: str):
    """What the raters hear: STFT magnitudes (spectrum) or waveforms, one per clip."""
    if listener == "spectrum":
        return tokenizer.decode_magnitude(codes)
    return tokenizer.decode(codes)


def _attributes(tokenizer, decoded, metas, listener: str) -> list[dict[str, float]]:
    # One BLAS thread: this runs beside the next batch's sampling on the other core, and
    # oversubscribed BLAS threads make these small matmuls ~4x slower.
    with threadpoolctl.threadpool_limits(1):
        if listener == "waveform":
            return features.batch_attributes(decoded, tokenizer.sample_rate, metas)
        return [features.score(features.measure_magnitude(
            m, tokenizer.sample_rate, tokenizer.n_fft, tokenizer.hop_length), meta)
            for m, meta in zip(decoded, metas)]


def _unpadded(tokens: np.ndarray) -> list[int]:
    return [int(t) for t in tokens[tokens > 0]]


def collect(kind: str, out_dir: str, *, lm_config, params, tokenizer, panel: raters.RaterPanel,
            prompts: Prompts, num_items: int, batch_size: int = 16, num_frames: int | None = None,
            sampling=decoding.SamplingConfig(), seed: int = 0, show_progress: bool = True,
            mesh=None, listener: str = "spectrum") -> str:
    """Collects `num_items` ratings or preference pairs into `out_dir`; returns `out_dir`.

    Which captions, raters and sampling keys a batch uses depend only on (seed, batch index),
    so a resumed job produces exactly what an uninterrupted one would. With a `mesh`, each
    batch is sharded over its batch axes; per-example keys make the clips the same either way.
    """
    if kind not in ("ratings", "preferences"):
        raise ConfigError(f"collect: kind={kind!r}; expected 'ratings' or 'preferences'.")
    if listener not in LISTENERS:
        raise ConfigError(f"collect: listener={listener!r}; expected one of {LISTENERS}.")
    num_frames = num_frames or lm_config.max_frames
    num_batches = -(-num_items // batch_size)
    todo = [b for b in range(num_batches) if not os.path.exists(_shard_path(out_dir, kind, b))]
    progress = tqdm(total=num_batches, initial=num_batches - len(todo), desc=f"collect {kind}",
                    disable=not show_progress, dynamic_ncols=True)
    copies = 1 if kind == "ratings" else 2
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as judge:
        pending = None
        for index in todo:
            rng = np.random.default_rng([seed, index])
            size = min(batch_size, num_items - index * batch_size)
            chosen = rng.choice(len(prompts.captions), size)
            captions = np.asarray(prompts.caption_tokens)[chosen]
            key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
            # A pair's two clips come from one sampling and one decoding call (bigger batches
            # cost less per clip); per-example keys make each clip what it would be on its own.
            rngs = jax.numpy.concatenate([decoding.example_rngs(jax.random.fold_in(key, c), size)
                                          for c in range(copies)])
            codes = _sample_codes(lm_config, params, np.concatenate([captions] * copies), rngs,
                                  num_frames, sampling, mesh)
            if pending is not None:  # at most one batch in flight: its errors surface here
                pending.result()
                progress.update(1)
            pending = judge.submit(_judge_and_write, kind, out_dir, index, rng, chosen, captions,
                                   codes, prompts, panel, tokenizer, listener)
        if pending is not None:
            pending.result()
            progress.update(1)
    progress.close()
    return out_dir


def _judge_and_write(kind, out_dir, index, rng, chosen, captions, codes, prompts, panel,
                     tokenizer, listener):
    """Decodes, judges and writes one batch (on the worker thread)."""
    size = len(chosen)
    metas = [prompts.metas[i] for i in chosen]
    attrs = hear(tokenizer, codes, metas * (len(codes) // size), listener)
    codes_a, attrs_a = codes[:size], attrs[:size]
    records = []
    if kind == "ratings":
        for i, c in enumerate(chosen):
            rater = panel.raters[rng.integers(len(panel))]
            records.append({
                "clip_id": f"{kind}-{index:05d}-{i:03d}", "caption": prompts.captions[c],
                "caption_tokens": _unpadded(captions[i]), "audio_codes": codes_a[i],
                "rating": raters.rate(rater, attrs_a[i], rng), "rater_id": rater.rater_id})
    else:
        codes_b, attrs_b = codes[size:], attrs[size:]
        for i, c in enumerate(chosen):
            rater = panel.raters[rng.integers(len(panel))]
            value = raters.choice_value(raters.compare(rater, attrs_a[i], attrs_b[i], rng))
            if value is None:  # the rater skipped this pair
                continue
            records.append({
                "pair_id": f"{kind}-{index:05d}-{i:03d}", "caption": prompts.captions[c],
                "caption_tokens": _unpadded(captions[i]), "tokens_a": codes_a[i],
                "tokens_b": codes_b[i], "choice": value, "rater_id": rater.rater_id})
    feedback.write_jsonl(_shard_path(out_dir, kind, index), records)
