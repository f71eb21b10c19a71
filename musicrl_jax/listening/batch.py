"""Listening batches: the pairs a listening session serves, on disk.

A batch directory holds

  manifest.json   {"format": "musicrl-listening-batch/1", "batch_id": str,
                   "codes_file": "codes.npz",
                   "pairs": [{"pair_id": str, "caption": str, "caption_tokens": [int],
                              "clips": [{"clip_id": str, "model_id": str, "wav": str,
                                         "provenance": {...} (optional)}, {...}]}]}
  codes.npz       one int array [frames, K] per clip, keyed by clip_id: the audio tokens
                  the clip was decoded from (or encoded to), which the exported
                  `musicrl_preferences` / `musicrl_ratings` records carry
  <clip_id>.wav   the audio a listener hears

`caption_tokens` are caption-vocabulary ids with EOS (=1) and no padding, as in
`musicrl_jax/data/feedback.py`. Clip ids are random hex strings: they appear in the page's
audio URLs, so they must not reveal which model made the clip. For the same reason a pair's
two WAVs are written in a random order and all WAVs get one modification time. Which clip of
a pair is shown as A is decided when the pair is first shown to a listener (see store.py).

A clip's optional `provenance` says which program made it, so a vote can be traced to it:
{"model": str, "checkpoint": str (directory), "checkpoint_step": int, "artifact": str (the
serving export sampled from), "artifact_sha256": str (of its manifest.json, which lists every
file's sha256), "seed": int, "sample_index": int, "num_samples": int (the clip is row
sample_index of `generate.Artifact.sample` over num_samples captions with that seed),
"sampling": {"temperature": float, "guidance": float}, "caption_id": str (the corpus clip the
caption was written for)}.

`make_batch` writes a batch from two aligned lists of clips (WAVs and/or codes); the CLI's
`make-batch` command (see __main__.py) gathers those lists from directories and files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import time
from typing import Sequence

import numpy as np

from musicrl_jax import jsonl
from musicrl_jax.errors import ConfigError

FORMAT = "musicrl-listening-batch/1"
MANIFEST = "manifest.json"
CODES_FILE = "codes.npz"
# Ids travel in URLs, form fields and npz keys: a narrow alphabet keeps them inert everywhere.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
PROVENANCE_FIELDS = ("model", "checkpoint", "checkpoint_step", "artifact", "artifact_sha256",
                     "seed", "sample_index", "num_samples", "sampling", "caption_id")


@dataclasses.dataclass(frozen=True)
class Clip:
    clip_id: str
    model_id: str
    wav: str  # file name inside the batch directory
    provenance: dict | None = None  # which program made the clip (module docstring)


@dataclasses.dataclass(frozen=True)
class Pair:
    pair_id: str
    caption: str
    caption_tokens: tuple[int, ...]
    clips: tuple[Clip, Clip]


@dataclasses.dataclass(frozen=True)
class Batch:
    """A loaded, validated batch; `clip_path` is the only way from a clip id to a file."""
    directory: str
    batch_id: str
    pairs: tuple[Pair, ...]
    codes_file: str

    def __post_init__(self):
        object.__setattr__(self, "_pairs", {p.pair_id: p for p in self.pairs})
        object.__setattr__(self, "_clips", {c.clip_id: c for p in self.pairs for c in p.clips})

    def pair(self, pair_id: str) -> Pair | None:
        return self._pairs.get(pair_id)

    def clip(self, clip_id: str) -> Clip | None:
        return self._clips.get(clip_id)

    def clip_path(self, clip_id: str) -> str | None:
        clip = self._clips.get(clip_id)
        return None if clip is None else os.path.join(self.directory, clip.wav)

    def load_codes(self) -> dict[str, np.ndarray]:
        path = os.path.join(self.directory, self.codes_file)
        if not os.path.exists(path):
            raise ConfigError(f"{path}: missing. Fix: rebuild the batch with make-batch (the "
                              "exported records need every clip's audio codes).")
        with np.load(path, allow_pickle=False) as codes:
            arrays = {k: codes[k] for k in codes.files}
        missing = [c for c in self._clips if c not in arrays]
        if missing:
            raise ConfigError(f"{path}: no codes for clip {missing[0]!r} ({len(missing)} clips "
                              "missing). Fix: rebuild the batch with make-batch.")
        return arrays


def _require(condition: bool, where: str, problem: str):
    if not condition:
        raise ConfigError(f"{where}: {problem}. Fix: correct the manifest, or rebuild the batch "
                          "with `python -m musicrl_jax.listening make-batch` (format: "
                          "musicrl_jax/listening/batch.py).")


def _check_id(value, where: str, field: str) -> str:
    _require(isinstance(value, str) and bool(ID_PATTERN.match(value)), where,
             f"field {field!r} must be a string of letters, digits, '_', '-', '.' (got {value!r})")
    return value


def load_batch(directory: str) -> Batch:
    """Reads and validates `directory`/manifest.json; every WAV must sit in the directory."""
    directory = os.path.abspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise ConfigError(f"No batch manifest at {path}. Fix: point --batch at a directory made "
                          "by `python -m musicrl_jax.listening make-batch`.")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}). Fix: "
                          "rebuild the batch with make-batch.") from err
    _require(isinstance(manifest, dict) and manifest.get("format") == FORMAT, path,
             f"field 'format' must be {FORMAT!r}")
    batch_id = _check_id(manifest.get("batch_id"), path, "batch_id")
    codes_file = manifest.get("codes_file", CODES_FILE)
    _require(isinstance(codes_file, str) and os.path.basename(codes_file) == codes_file, path,
             "field 'codes_file' must be a file name inside the batch directory")
    raw_pairs = manifest.get("pairs")
    _require(isinstance(raw_pairs, list) and len(raw_pairs) > 0, path,
             "field 'pairs' must be a non-empty list")
    pairs, seen = [], set()
    for i, raw in enumerate(raw_pairs):
        where = f"{path}, pairs[{i}]"
        _require(isinstance(raw, dict), where, "must be an object")
        pair_id = _check_id(raw.get("pair_id"), where, "pair_id")
        caption = raw.get("caption")
        _require(isinstance(caption, str) and caption.strip() != "", where,
                 "field 'caption' must be a non-empty string")
        tokens = raw.get("caption_tokens")
        _require(isinstance(tokens, list) and len(tokens) > 0 and all(
            isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tokens), where,
            "field 'caption_tokens' must be a non-empty list of positive ints (no padding)")
        clips_raw = raw.get("clips")
        _require(isinstance(clips_raw, list) and len(clips_raw) == 2, where,
                 "field 'clips' must hold exactly two clips")
        clips = []
        for j, clip in enumerate(clips_raw):
            clip_where = f"{where}.clips[{j}]"
            _require(isinstance(clip, dict), clip_where, "must be an object")
            clip_id = _check_id(clip.get("clip_id"), clip_where, "clip_id")
            model_id = _check_id(clip.get("model_id"), clip_where, "model_id")
            wav = clip.get("wav")
            # A bare file name: the manifest cannot point the server outside the batch.
            _require(isinstance(wav, str) and wav == os.path.basename(wav) and wav not in (
                "", ".", "..") and wav.endswith(".wav"), clip_where,
                f"field 'wav' must be a .wav file name inside the batch directory (got {wav!r})")
            _require(os.path.isfile(os.path.join(directory, wav)), clip_where,
                     f"WAV {os.path.join(directory, wav)} is missing")
            provenance = clip.get("provenance")
            _require(provenance is None or (isinstance(provenance, dict) and all(
                f in provenance for f in PROVENANCE_FIELDS)), clip_where,
                f"field 'provenance' must be an object with the fields {list(PROVENANCE_FIELDS)}")
            for key in (pair_id, clip_id):
                _require(key not in seen, clip_where, f"id {key!r} is used twice")
            seen.add(clip_id)
            clips.append(Clip(clip_id, model_id, wav, provenance))
        seen.add(pair_id)
        pairs.append(Pair(pair_id, caption, tuple(tokens), (clips[0], clips[1])))
    return Batch(directory, batch_id, tuple(pairs), codes_file)


def new_clip_id() -> str:
    return secrets.token_hex(8)


def make_batch(out_dir: str, batch_id: str, captions: Sequence[str],
               caption_tokens: Sequence[Sequence[int]], model_ids: tuple[str, str],
               codes: tuple[Sequence[np.ndarray], Sequence[np.ndarray]],
               wav_writers: tuple[Sequence, Sequence],
               provenance: tuple[Sequence[dict], Sequence[dict]] | None = None) -> Batch:
    """Writes a batch of len(captions) pairs: pair i is (clip i of model A, clip i of model B).

    codes: per model, one int array [frames, K] per clip. wav_writers: per model, one callable
    per clip that writes the clip's WAV to the path it is given (a copy of an existing file,
    or a decode of its codes). provenance: per model, one record per clip (module docstring).
    Returns the loaded batch.
    """
    _check_id(batch_id, "make-batch --batch-id", "batch_id")
    for model_id in model_ids:
        _check_id(model_id, "make-batch --model-a/--model-b", "model_id")
    n = len(captions)
    for name, seq in (("caption_tokens", caption_tokens), ("codes of model A", codes[0]),
                      ("codes of model B", codes[1]), ("WAVs of model A", wav_writers[0]),
                      ("WAVs of model B", wav_writers[1])):
        if len(seq) != n:
            raise ConfigError(f"make-batch: {n} captions but {len(seq)} {name}. Fix: give one "
                              "caption per pair and one clip per caption from each model (files "
                              "are paired in sorted name order).")
    if n == 0:
        raise ConfigError("make-batch: no captions. Fix: give a captions file with one caption "
                          "per pair.")
    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise ConfigError(f"{os.path.join(out_dir, MANIFEST)} exists. Fix: choose a new --out "
                          "directory (a batch is never overwritten: votes refer to its ids).")
    os.makedirs(out_dir, exist_ok=True)
    pairs, arrays, wav_paths = [], {}, []
    for i in range(n):
        tokens = [int(t) for t in np.asarray(caption_tokens[i]).reshape(-1) if int(t) > 0]
        clips = [None, None]
        # A random order per pair: written model A first, model A's clip would always be the
        # older file, and anything that shows file dates would unblind the test.
        for side in (0, 1) if secrets.randbelow(2) else (1, 0):
            clip_codes = np.asarray(codes[side][i])
            if clip_codes.ndim != 2 or clip_codes.size == 0 or not np.issubdtype(
                    clip_codes.dtype, np.integer) or clip_codes.min() < 0:
                raise ConfigError(f"make-batch: codes of clip {i} of model "
                                  f"{model_ids[side]!r} have shape {clip_codes.shape} and dtype "
                                  f"{clip_codes.dtype}; expected non-negative ints [frames, K].")
            clip_id = new_clip_id()
            wav_paths.append(os.path.join(out_dir, f"{clip_id}.wav"))
            wav_writers[side][i](wav_paths[-1])
            arrays[clip_id] = clip_codes.astype(np.int32)
            clips[side] = {"clip_id": clip_id, "model_id": model_ids[side],
                           "wav": f"{clip_id}.wav"}
            if provenance is not None:
                clips[side]["provenance"] = dict(provenance[side][i])
        pairs.append({"pair_id": f"{batch_id}-{i:05d}", "caption": str(captions[i]),
                      "caption_tokens": tokens, "clips": clips})
    stamp = time.time()
    for path in wav_paths:  # one date for every clip: file times say nothing about a model
        os.utime(path, (stamp, stamp))
    np.savez(os.path.join(out_dir, CODES_FILE), **arrays)
    manifest = {"format": FORMAT, "batch_id": batch_id, "codes_file": CODES_FILE,
                "pairs": pairs}
    tmp = os.path.join(out_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, MANIFEST))  # the manifest last: a batch is whole
    return load_batch(out_dir)


def read_captions(path: str) -> tuple[list[str], list[list[int] | None]]:
    """Captions file: plain text (one caption per line) or JSONL ({"caption": str,
    "caption_tokens": [int] (optional)} per line). Returns captions and tokens (None where a
    line gives none)."""
    if not path.endswith(".jsonl"):
        captions = jsonl.read_lines(path, "--captions", "caption")
        return captions, [None] * len(captions)
    if not os.path.isfile(path):
        raise ConfigError(f"--captions {path}: no such file.")
    captions, tokens = [], []
    for where, record in jsonl.read_objects(path):
        if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
            raise ConfigError(f"{where}: field 'caption' (a string) is missing. Fix: one "
                              'object per line like {"caption": "...", "caption_tokens": [..]}.')
        row = record.get("caption_tokens")
        if row is not None and not (isinstance(row, list) and row and all(
                isinstance(t, int) and t >= 0 for t in row)):
            raise ConfigError(f"{where}: field 'caption_tokens' must be a list of "
                              "non-negative ints (caption-vocabulary ids with EOS=1).")
        captions.append(record["caption"])
        tokens.append(row)
    return captions, tokens
