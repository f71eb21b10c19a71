"""Human feedback on clips: 1-5 ratings and pairwise preferences, stored as shards in a directory.

Record formats (one JSON object per line in `*.jsonl`, or the same fields as arrays in `*.npz`):

  rating      clip_id: str, caption: str, caption_tokens: [int] (caption vocabulary ids, EOS=1
              included, no padding), audio_codes: [[int] * K] * frames (ids in [0,
              codebook_size)), rating: number in [1, 5], rater_id: str
  preference  caption: str, caption_tokens: [int], tokens_a / tokens_b: [[int] * K] * frames,
              choice: 0 (a preferred) | 1 (b preferred) | 0.5 (tie), rater_id: str,
              pair_id: str (optional)

In `*.npz` shards every field is an array over records: text fields as string arrays,
caption_tokens [n, text_length] padded with 0, audio codes [n, frames, K] with a frame mask
(`audio_mask` for ratings, `mask_a` / `mask_b` for preferences; 1 = real frame; all real when
absent). Any number of shards of either type may sit in one directory, so ratings collected
elsewhere (a listening web page, a spreadsheet export) slot in as one more file.

`ratings_source` / `preferences_source` read a directory into an `ArraySource` (train or
validation, split by a hash of the caption so one caption's clips never straddle the split);
the TFDS builders `musicrl_ratings` and `musicrl_preferences` package the same shards as
datasets. Malformed records raise ConfigError naming the file, line and field.

Until the rater panel exists, `simulated_ratings` / `simulated_preferences` make feedback whose
ground truth is a known function of the tokens plus noise (see their docstrings).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Iterable

import gin
import numpy as np

from musicrl_jax import jsonl
from musicrl_jax.data import toy
from musicrl_jax.data.sources import ArraySource
from musicrl_jax.errors import ConfigError

RATING_FIELDS = ("clip_id", "caption", "caption_tokens", "audio_codes", "rating", "rater_id")
PREFERENCE_FIELDS = ("caption", "caption_tokens", "tokens_a", "tokens_b", "choice", "rater_id")
_CLIP_FIELDS = {"audio_codes": "audio_mask", "tokens_a": "mask_a", "tokens_b": "mask_b"}
_TEXT_FIELDS = ("clip_id", "caption", "rater_id", "pair_id")
_SPECS = {"ratings": RATING_FIELDS, "preferences": PREFERENCE_FIELDS}


# --- validation ---------------------------------------------------------------------------------

def _fail(where: str, field: str, problem: str, kind: str):
    raise ConfigError(f"{where}: field {field!r} {problem}. Fix: correct or drop that record; "
                      f"{kind} records need {list(_SPECS[kind])} (see musicrl_jax/data/"
                      "feedback.py for the format).")


def _int_array(value, ndim, where, field, kind) -> np.ndarray:
    try:
        array = np.asarray(value)
    except ValueError:
        _fail(where, field, "is ragged (rows of different lengths)", kind)
    if array.size == 0:
        _fail(where, field, "is empty", kind)
    if array.ndim != ndim or not (np.issubdtype(array.dtype, np.integer) or (
            np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array)))):
        shape = "a list of ints" if ndim == 1 else "a list of frames, each a list of K ints"
        _fail(where, field, f"must be {shape} (got shape {array.shape}, dtype {array.dtype})",
              kind)
    if array.min() < 0:
        _fail(where, field, f"holds a negative id ({int(array.min())})", kind)
    return array.astype(np.int32)


def validate_record(record: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    """Checks one record's fields and types; returns it with numpy token arrays."""
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    missing = [f for f in _SPECS[kind] if f not in record]
    if missing:
        _fail(where, missing[0], "is missing", kind)
    out = dict(record)
    for field in _TEXT_FIELDS:
        if field in out:
            if isinstance(out[field], bytes):
                out[field] = out[field].decode()
            if not isinstance(out[field], (str, np.str_)):
                _fail(where, field, f"must be a string (got {out[field]!r})", kind)
            out[field] = str(out[field])
    out["caption_tokens"] = _int_array(record["caption_tokens"], 1, where, "caption_tokens", kind)
    for field in _CLIP_FIELDS:
        if field in record:
            out[field] = _int_array(record[field], 2, where, field, kind)
    if kind == "ratings":
        rating = record["rating"]
        if isinstance(rating, bool) or not isinstance(rating, (int, float, np.number)) or not (
                1 <= float(rating) <= 5):
            _fail(where, "rating", f"must be a number in [1, 5] (got {rating!r})", kind)
        out["rating"] = float(rating)
    else:
        choice = record["choice"]
        if isinstance(choice, bool) or not isinstance(choice, (int, float, np.number)) or float(
                choice) not in (0.0, 0.5, 1.0):
            _fail(where, "choice", f"must be 0 (a preferred), 1 (b preferred) or 0.5 (tie) "
                  f"(got {choice!r})", kind)
        out["choice"] = float(choice)
        if out["tokens_a"].shape[1] != out["tokens_b"].shape[1]:
            _fail(where, "tokens_b", f"has {out['tokens_b'].shape[1]} codebooks but tokens_a "
                  f"has {out['tokens_a'].shape[1]}", kind)
    return out


# --- reading and writing shards -------------------------------------------------------------------

def _jsonl_records(path: str, kind: str) -> Iterable[dict]:
    for where, record in jsonl.read_objects(path):
        yield validate_record(record, kind, where)


def _npz_records(path: str, kind: str) -> Iterable[dict]:
    with np.load(path, allow_pickle=False) as shard:
        arrays = {k: shard[k] for k in shard.files}
    missing = [f for f in _SPECS[kind] if f not in arrays]
    if missing:
        _fail(f"{path}", missing[0], "is missing from the shard", kind)
    n = len(arrays["caption_tokens"])
    for i in range(n):
        record = {k: v[i] for k, v in arrays.items()}
        record["caption_tokens"] = record["caption_tokens"][record["caption_tokens"] > 0]
        for field, mask_field in _CLIP_FIELDS.items():
            if field in record and mask_field in record:
                record[field] = record[field][record.pop(mask_field) > 0]
        for field in ("rating", "choice"):
            if field in record:
                record[field] = float(record[field])
        yield validate_record(record, kind, f"{path}, record {i}")


def read_records(directory: str, kind: str) -> list[dict]:
    """Every record of `kind` ('ratings' | 'preferences') in the directory's *.jsonl / *.npz."""
    if kind not in _SPECS:
        raise ConfigError(f"feedback kind {kind!r}; expected one of {list(_SPECS)}.")
    if not os.path.isdir(directory):
        raise ConfigError(f"No {kind} directory at {os.path.abspath(directory)}. Fix: collect "
                          f"{kind} there (JSONL or npz shards), or correct the path.")
    paths = sorted(glob.glob(os.path.join(directory, "*.jsonl")) +
                   glob.glob(os.path.join(directory, "*.npz")))
    records = []
    for path in paths:
        reader = _jsonl_records if path.endswith(".jsonl") else _npz_records
        records.extend(reader(path, kind))
    if not records:
        raise ConfigError(f"{os.path.abspath(directory)} holds no {kind} records (*.jsonl or "
                          "*.npz). Fix: write shards with write_jsonl / write_npz.")
    return records


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_jsonl(path: str, records: Iterable[dict]) -> str:
    """One JSON object per record (token arrays as nested lists)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"  # written whole, then renamed: a killed writer leaves no partial shard
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
    os.replace(tmp, path)
    return path


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> str:
    """A shard of padded arrays, e.g. the output of `simulated_ratings` or `to_arrays`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def to_arrays(records: list[dict], kind: str, caption_length: int,
              num_frames: int) -> dict[str, np.ndarray]:
    """Pads captions to `caption_length` (a longer caption is an error: it would lose its EOS)
    and clips to `num_frames` frames with a frame mask (longer clips are cropped)."""
    n = len(records)
    arrays: dict[str, np.ndarray] = {"caption_tokens": np.zeros((n, caption_length), np.int32)}
    clip_fields = [f for f in _CLIP_FIELDS if f in records[0]]
    num_codebooks = records[0][clip_fields[0]].shape[1]
    for field in clip_fields:
        arrays[field] = np.zeros((n, num_frames, num_codebooks), np.int32)
        arrays[_CLIP_FIELDS[field]] = np.zeros((n, num_frames), np.int32)
    for i, record in enumerate(records):
        caption = record["caption_tokens"]
        if len(caption) > caption_length:
            raise ConfigError(
                f"{kind} record {i} (caption {record.get('caption', '')!r}): caption_tokens has "
                f"{len(caption)} tokens, more than caption_length={caption_length}. Fix: raise "
                "the caption length (CAPTION_LENGTH) or shorten the caption.")
        arrays["caption_tokens"][i, :len(caption)] = caption
        for field in clip_fields:
            codes = record[field][:num_frames]
            if codes.shape[1] != num_codebooks:
                raise ConfigError(f"{kind} record {i}: field {field!r} has {codes.shape[1]} "
                                  f"codebooks, the first record has {num_codebooks}. Fix: "
                                  "tokenize every clip with the same tokenizer.")
            arrays[field][i, :len(codes)] = codes
            arrays[_CLIP_FIELDS[field]][i, :len(codes)] = 1
    if kind == "ratings":
        arrays["rating"] = np.array([r["rating"] for r in records], np.float32)
    else:
        arrays["choice"] = np.array([r["choice"] for r in records], np.float32)
    for field in _TEXT_FIELDS:
        if field in records[0]:
            arrays[field] = np.array([r.get(field, "") for r in records])
    return arrays


def caption_split(caption: str, caption_tokens: np.ndarray, validation_fraction: float) -> str:
    """'train' or 'validation' from a stable hash of the caption text (its tokens if empty)."""
    key = caption if caption else " ".join(map(str, np.asarray(caption_tokens).tolist()))
    bucket = int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 0x100000000
    return "validation" if bucket < validation_fraction else "train"


def _source(directory, kind, split, caption_length, num_frames, validation_fraction, seed,
            max_records):
    if split not in ("train", "validation"):
        raise ConfigError(f"{kind}_source.split={split!r}; expected 'train' or 'validation'.")
    records = read_records(directory, kind)
    if max_records is not None:  # the first ones in shard order: a prefix of the collection
        if len(records) < max_records:
            raise ConfigError(f"{directory}: {len(records)} {kind} records, fewer than "
                              f"{kind}_source.max_records={max_records}. Fix: collect more or "
                              "lower max_records.")
        records = records[:max_records]
    records = [r for r in records
               if caption_split(r["caption"], r["caption_tokens"], validation_fraction) == split]
    if not records:
        raise ConfigError(f"{directory}: no {kind} records fall in the {split!r} split "
                          f"(validation_fraction={validation_fraction}). Fix: add records or "
                          "change validation_fraction.")
    arrays = to_arrays(records, kind, caption_length, num_frames)
    numeric = {k: v for k, v in arrays.items() if k not in _TEXT_FIELDS}
    return ArraySource(numeric, seed=seed, name=f"{kind}:{directory}/{split}")


@gin.configurable
def ratings_source(directory: str = gin.REQUIRED, split: str = "train", caption_length: int = 32,
                   num_frames: int = 64, validation_fraction: float = 0.1,
                   seed: int = 0, max_records: int | None = None) -> ArraySource:
    """Ratings in `directory` as model features: caption_tokens, audio_codes, audio_mask,
    rating. max_records: use only the first ones (before the split)."""
    return _source(directory, "ratings", split, caption_length, num_frames,
                   validation_fraction, seed, max_records)


@gin.configurable
def preferences_source(directory: str = gin.REQUIRED, split: str = "train",
                       caption_length: int = 32, num_frames: int = 64,
                       validation_fraction: float = 0.1, seed: int = 0,
                       max_records: int | None = None) -> ArraySource:
    """Preferences in `directory` as model features: caption_tokens, tokens_a, mask_a,
    tokens_b, mask_b, choice. max_records: use only the first ones (before the split)."""
    return _source(directory, "preferences", split, caption_length, num_frames,
                   validation_fraction, seed, max_records)


# --- simulated feedback (until the rater panel exists) --------------------------------------------

def corrupt(codes: np.ndarray, fraction: np.ndarray, codebook_size: int,
            rng: np.random.Generator) -> np.ndarray:
    """Replaces each token of clip i by a uniformly random id with probability fraction[i]."""
    replace = rng.random(codes.shape) < fraction.reshape((-1,) + (1,) * (codes.ndim - 1))
    return np.where(replace, rng.integers(0, codebook_size, codes.shape), codes).astype(np.int32)


def _toy_pool(num_examples, num_frames, num_codebooks, codebook_size, caption_length, seed):
    return toy.toy_examples(num_examples, num_frames, num_codebooks, codebook_size,
                            caption_length, noise=0.0, seed=seed)


@gin.configurable
def simulated_ratings(num_examples: int = 512, num_frames: int = 32, num_codebooks: int = 2,
                      codebook_size: int = 256, caption_length: int = 16,
                      max_corruption: float = 0.8, rating_noise: float = 0.4,
                      seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic ratings of toy clips (`data/toy.py`); NOT human judgements.

    Each clip has a fraction c ~ U(0, max_corruption) of its tokens replaced by random ids; its
    rating is round(5 - 4 c / max_corruption + N(0, rating_noise)) clipped to 1..5, so the
    ground truth is a known function of the tokens plus rater noise.
    """
    rng = np.random.default_rng([seed, 1])
    clips = _toy_pool(num_examples, num_frames, num_codebooks, codebook_size, caption_length,
                      seed)
    corruption = rng.uniform(0.0, max_corruption, num_examples)
    clean_rating = 5.0 - 4.0 * corruption / max_corruption
    rating = np.clip(np.round(clean_rating + rng.normal(0.0, rating_noise, num_examples)), 1, 5)
    return {"caption_tokens": clips["caption_tokens"],
            "audio_codes": corrupt(clips["audio_codes"], corruption, codebook_size, rng),
            "audio_mask": np.ones((num_examples, num_frames), np.int32),
            "rating": rating.astype(np.float32),
            "clean_rating": clean_rating.astype(np.float32)}


@gin.configurable
def simulated_preferences(num_pairs: int = 512, num_frames: int = 32, num_codebooks: int = 2,
                          codebook_size: int = 256, caption_length: int = 16,
                          max_corruption: float = 0.8, corruption_weight: float = 5.0,
                          adherence_weight: float = 2.0, off_caption_rate: float = 0.5,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic pairwise preferences over toy clips; NOT human judgements.

    Both clips of a pair answer the pair's caption, except that each is, with probability
    `off_caption_rate`, a clip of another caption. A listener's utility for a clip is
        u = -corruption_weight * (fraction of corrupted tokens) + adherence_weight * [on caption]
    and b is chosen with probability sigmoid(u_b - u_a) (Bradley-Terry), so the ground truth
    is a known function of the tokens and caption plus sampling noise. The adherence term is
    what a caption-aware model can learn and an audio-only one cannot.
    """
    rng = np.random.default_rng([seed, 2])
    pool_size = max(8 * num_pairs, 1024)
    pool = _toy_pool(pool_size, num_frames, num_codebooks, codebook_size, caption_length, seed)
    keys = [row.tobytes() for row in pool["caption_tokens"]]
    by_caption: dict[bytes, np.ndarray] = {}
    for i, key in enumerate(keys):
        by_caption.setdefault(key, []).append(i)
    by_caption = {k: np.asarray(v) for k, v in by_caption.items()}
    anchors = rng.integers(0, pool_size, num_pairs)

    def draw(anchor):
        on_caption = rng.random() >= off_caption_rate
        while True:
            index = (rng.choice(by_caption[keys[anchor]]) if on_caption
                     else rng.integers(0, pool_size))
            if on_caption or keys[index] != keys[anchor]:
                return index, on_caption

    picks = [(draw(a), draw(a)) for a in anchors]
    index_a = np.array([p[0][0] for p in picks])
    index_b = np.array([p[1][0] for p in picks])
    on_a = np.array([p[0][1] for p in picks], np.float64)
    on_b = np.array([p[1][1] for p in picks], np.float64)
    corruption_a = rng.uniform(0.0, max_corruption, num_pairs)
    corruption_b = rng.uniform(0.0, max_corruption, num_pairs)
    utility_a = -corruption_weight * corruption_a + adherence_weight * on_a
    utility_b = -corruption_weight * corruption_b + adherence_weight * on_b
    prob_b = 1.0 / (1.0 + np.exp(-(utility_b - utility_a)))
    choice = (rng.random(num_pairs) < prob_b).astype(np.float32)
    codes = pool["audio_codes"]
    return {"caption_tokens": pool["caption_tokens"][anchors],
            "tokens_a": corrupt(codes[index_a], corruption_a, codebook_size, rng),
            "tokens_b": corrupt(codes[index_b], corruption_b, codebook_size, rng),
            "mask_a": np.ones((num_pairs, num_frames), np.int32),
            "mask_b": np.ones((num_pairs, num_frames), np.int32),
            "choice": choice, "true_prob_b": prob_b.astype(np.float32)}


@gin.configurable
def simulated_source(kind: str = gin.REQUIRED, split: str = "train", num_examples: int = 512,
                     seed: int = 0, **kwargs) -> ArraySource:
    """An `ArraySource` of simulated feedback ('ratings' | 'preferences' | 'captioned_clips',
    the last for the text-adherence model: toy clips whose tokens follow their caption)."""
    split_seed = seed * 10 + {"train": 0, "validation": 1, "test": 2}[split]
    if kind == "ratings":
        arrays = simulated_ratings(num_examples, seed=split_seed, **kwargs)
        arrays.pop("clean_rating")
    elif kind == "preferences":
        arrays = simulated_preferences(num_examples, seed=split_seed, **kwargs)
        arrays.pop("true_prob_b")
    elif kind == "captioned_clips":
        kwargs.setdefault("noise", 0.05)
        arrays = toy.toy_examples(num_examples, seed=split_seed, **kwargs)
    else:
        raise ConfigError(f"simulated_source.kind={kind!r}; expected 'ratings', 'preferences' "
                          "or 'captioned_clips'.")
    return ArraySource(arrays, seed=seed, name=f"simulated_{kind}_{split}")


# --- TFDS builders over the same shards ------------------------------------------------------------

import tensorflow_datasets as tfds  # noqa: E402  (heavy; only the builders need it)


class _FeedbackBuilder(tfds.core.GeneratorBasedBuilder):
    """Reads every shard in the manual directory (`DownloadConfig(manual_dir=...)`); splits
    train/validation by caption hash exactly as `ratings_source` / `preferences_source` do."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "JSONL / npz feedback shards (musicrl_jax/data/feedback.py)."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Put *.jsonl or *.npz feedback shards (format: "
                                    "musicrl_jax/data/feedback.py) in the manual_dir.")
    KIND = ""
    VALIDATION_FRACTION = 0.1

    def _split_generators(self, dl_manager):
        records = read_records(str(dl_manager.manual_dir), self.KIND)
        splits = {"train": [], "validation": []}
        for record in records:
            splits[caption_split(record["caption"], record["caption_tokens"],
                                 self.VALIDATION_FRACTION)].append(record)
        # TFDS cannot write an empty split; a small directory may have no validation captions.
        return {name: self._generate_examples(rows) for name, rows in splits.items() if rows}

    def _generate_examples(self, records):
        fields = set(self.info.features.keys())
        for i, record in enumerate(records):
            key = record.get("clip_id") or record.get("pair_id") or f"{record['rater_id']}:{i}"
            yield f"{key}:{i}", {k: v for k, v in record.items() if k in fields}


class MusicrlRatings(_FeedbackBuilder):
    """1-5 ratings of clips (see the module docstring for the record format)."""
    KIND = "ratings"

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "clip_id": tfds.features.Text(), "caption": tfds.features.Text(),
            "caption_tokens": tfds.features.Sequence(np.int32),
            "audio_codes": tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding="zlib"),
            "rating": np.float32, "rater_id": tfds.features.Text()}))


class MusicrlPreferences(_FeedbackBuilder):
    """Pairwise preferences between two clips for one caption (choice 0: a, 1: b, 0.5: tie)."""
    KIND = "preferences"

    def _info(self):
        clip = tfds.features.Tensor(shape=(None, None), dtype=np.int32, encoding="zlib")
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "caption": tfds.features.Text(), "caption_tokens": tfds.features.Sequence(np.int32),
            "tokens_a": clip, "tokens_b": clip, "choice": np.float32,
            "rater_id": tfds.features.Text()}))
