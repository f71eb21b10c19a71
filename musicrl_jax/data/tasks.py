"""seqio tasks over `musicrl_music` and the feature converter the LM and trainers consume.

  musicrl_pretrain: caption tokens (SentencePiece + EOS) -> audio codes [frames, K]
  musicrl_prompts:  caption tokens plus the caption text and metadata (RL and evaluation prompts)

`MusicLMFeatureConverter` pads captions to a fixed length and audio codes to a fixed number of
frames with an `audio_mask` (1 = real frame). `seqio_source` materialises a split as an
`ArraySource`, so the trainer's deterministic, resumable, per-host batching applies.
"""

from __future__ import annotations

import functools

import gin
import numpy as np
import seqio
import tensorflow as tf

from musicrl_jax.data import vocab as vocab_lib
from musicrl_jax.data.musicrl_music import MusicrlMusic, assets_dir, builder_config
from musicrl_jax.data.sources import ArraySource
from musicrl_jax.errors import ConfigError

PRETRAIN_TASK = "musicrl_pretrain"
PROMPTS_TASK = "musicrl_prompts"
FeatureSpec = seqio.FeatureConverter.FeatureSpec


@seqio.map_over_dataset
def _check_audio_tokens(example, codebook_size: int, num_codebooks: int):
    """Fails with the clip id when a record's tokens are out of range or mis-shaped."""
    codes = example["audio_codes"]
    checks = [
        tf.debugging.Assert(tf.equal(tf.shape(codes)[-1], num_codebooks),
                            ["clip", example["clip_id"], "has audio_tokens with",
                             tf.shape(codes)[-1], "codebooks; expected", num_codebooks]),
        tf.debugging.Assert(tf.logical_and(tf.reduce_min(codes) >= 0,
                                           tf.reduce_max(codes) < codebook_size),
                            ["clip", example["clip_id"], "has audio tokens outside [0,",
                             codebook_size, "): min", tf.reduce_min(codes), "max",
                             tf.reduce_max(codes)]),
        tf.debugging.Assert(tf.strings.length(example["caption_tokens"]) > 0,
                            ["clip", example["clip_id"], "has an empty caption"]),
    ]
    with tf.control_dependencies(checks):
        return {**example, "audio_codes": tf.identity(codes)}


class MusicLMFeatureConverter(seqio.FeatureConverter):
    """Pads (never packs: each clip is one conditioned sequence) and adds the frame mask."""
    TASK_FEATURES = {"caption_tokens": FeatureSpec(dtype=tf.int32),
                     "audio_codes": FeatureSpec(dtype=tf.int32, rank=2)}
    MODEL_FEATURES = {"caption_tokens": FeatureSpec(dtype=tf.int32),
                      "audio_codes": FeatureSpec(dtype=tf.int32, rank=2),
                      "audio_mask": FeatureSpec(dtype=tf.int32)}
    PACKING_FEATURE_DTYPES = None

    def __init__(self, **kwargs):
        super().__init__(pack=False, **kwargs)

    def _convert_features(self, ds, task_feature_lengths):
        caption_length = task_feature_lengths["caption_tokens"]
        num_frames = task_feature_lengths["audio_codes"]

        def convert(example):
            caption = example["caption_tokens"]
            codes = example["audio_codes"]
            frames = tf.shape(codes)[0]
            return {
                "caption_tokens": tf.pad(caption, [[0, caption_length - tf.shape(caption)[0]]]),
                "audio_codes": tf.pad(codes, [[0, num_frames - frames], [0, 0]]),
                "audio_mask": tf.pad(tf.ones([frames], tf.int32), [[0, num_frames - frames]]),
            }
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths):
        return {"caption_tokens": task_feature_lengths["caption_tokens"],
                "audio_codes": task_feature_lengths["audio_codes"],
                "audio_mask": task_feature_lengths["audio_codes"]}


@gin.configurable
def register_tasks(data_dir: str = gin.REQUIRED, config_name: str = "demo") -> None:
    """(Re-)registers the seqio tasks for `musicrl_music/<config_name>` in `data_dir`."""
    config = builder_config(config_name)
    vocabulary = vocab_lib.load_caption_vocabulary(
        f"{assets_dir(data_dir, config_name)}/vocab")
    source = seqio.TfdsDataSource(
        tfds_name=f"musicrl_music/{config_name}:{MusicrlMusic.VERSION}", tfds_data_dir=data_dir)
    caption_feature = seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32)
    add_pretrain_task(PRETRAIN_TASK, source, vocabulary, config.codebook_size,
                      config.num_codebooks)
    seqio.TaskRegistry.remove(PROMPTS_TASK)
    seqio.TaskRegistry.add(
        PROMPTS_TASK, source=source, output_features={"caption_tokens": caption_feature},
        preprocessors=[_rename, seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim])


def add_pretrain_task(name, source, vocabulary, codebook_size, num_codebooks):
    """Registers a caption -> audio codes task over any seqio source with the record fields
    `clip_id`, `caption` (text) and `audio_tokens` [frames, K]."""
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name, source=source,
        output_features={
            "caption_tokens": seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
            "audio_codes": seqio.Feature(seqio.PassThroughVocabulary(codebook_size),
                                         add_eos=False, dtype=tf.int32, rank=2)},
        preprocessors=[functools.partial(_rename,
                                         required=("caption", "clip_id", "audio_tokens")),
                       functools.partial(_check_audio_tokens, codebook_size=codebook_size,
                                         num_codebooks=num_codebooks),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim])


_RECORD_FIELDS = {"caption_tokens": "caption", "audio_codes": "audio_tokens",
                  "clip_id": "clip_id", "caption": "caption", "tempo_bpm": "tempo_bpm",
                  "key_tonic": "key_tonic", "key_mode": "key_mode", "style": "style"}


def _rename(ds, required=("caption", "clip_id")):
    """Model-facing names for the record fields; a missing required field is named."""
    missing = sorted(set(required) - set(ds.element_spec))
    if missing:
        raise ConfigError(f"music records lack the field(s) {missing} (have "
                          f"{sorted(ds.element_spec)}). Fix: rebuild the dataset with "
                          "musicrl_jax/data/build.py or add the fields to your records.")
    key_map = {k: v for k, v in _RECORD_FIELDS.items() if v in ds.element_spec}
    return seqio.preprocessors.rekey(ds, key_map=key_map)


def _ensure_registered(task_name: str) -> None:
    """Registers the tasks from the gin-bound data directory (data/music.gin) on first use, so
    a stage run on its own finds the data the data stage built."""
    if task_name in seqio.TaskRegistry.names():
        return
    try:
        register_tasks()
    except RuntimeError as err:  # gin: register_tasks.data_dir is not bound
        raise ConfigError(f"seqio task {task_name!r} is not registered and "
                          "register_tasks.data_dir is not set. Fix: include 'data/music.gin' "
                          "(or bind register_tasks.data_dir) after building the data with "
                          "`python -m musicrl_jax.data.build`.") from err


def _task_numpy(task_name, split, lengths, per_host, converter=None):
    import jax
    _ensure_registered(task_name)
    shard_info = (seqio.ShardInfo(jax.process_index(), jax.process_count())
                  if per_host and jax.process_count() > 1 else None)
    try:
        task = seqio.get_mixture_or_task(task_name)
        ds = task.get_dataset(lengths, split=split, shuffle=False, shard_info=shard_info,
                              num_epochs=1)
        if converter is not None:
            ds = converter(ds, lengths)
        return list(ds.as_numpy_iterator())
    except tf.errors.InvalidArgumentError as err:
        raise ConfigError(f"seqio task {task_name!r}, split {split!r}: a malformed record: "
                          f"{err.message.splitlines()[0][:800]}\nFix: rebuild the dataset "
                          "(delete its TFDS directory) or drop that clip.") from err
    except (ValueError, KeyError) as err:
        if "No Task or Mixture found" in str(err):
            raise ConfigError(f"seqio task {task_name!r} is not registered. Fix: call "
                              "register_tasks(data_dir) (the data stage does).") from err
        raise


@gin.configurable
def seqio_source(split: str = "train", caption_length: int = 48, num_frames: int = 200,
                 per_host: bool = False, seed: int = 0) -> ArraySource:
    """A split of `musicrl_pretrain` as model features (LM training and evaluation)."""
    lengths = {"caption_tokens": caption_length, "audio_codes": num_frames}
    rows = _task_numpy(PRETRAIN_TASK, split, lengths, per_host, MusicLMFeatureConverter())
    if not rows:
        raise ConfigError(f"seqio task {PRETRAIN_TASK!r} has no examples in split {split!r}.")
    arrays = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
    return ArraySource(arrays, seed=seed, name=f"{PRETRAIN_TASK}/{split}",
                       host_sharded=per_host)


def prompts(split: str = "validation", caption_length: int = 48) -> dict[str, np.ndarray]:
    """Held-out prompts: padded caption tokens [n, caption_length] and the caption texts."""
    rows = _task_numpy(PROMPTS_TASK, split, {"caption_tokens": caption_length}, per_host=False)
    tokens = np.zeros((len(rows), caption_length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row["caption_tokens"])] = row["caption_tokens"]
    return {"caption_tokens": tokens,
            "caption": np.array([row["caption"].decode() for row in rows]),
            "clip_id": np.array([row["clip_id"].decode() for row in rows]),
            "tempo_bpm": np.array([row["tempo_bpm"] for row in rows], np.int32)}


@gin.configurable
def prompt_source(split: str = "train", caption_length: int = 48, seed: int = 0) -> ArraySource:
    """A split's captions (caption_tokens only): what the RL policy is prompted with."""
    tokens = prompts(split, caption_length)["caption_tokens"]
    return ArraySource({"caption_tokens": tokens}, seed=seed, name=f"{PROMPTS_TASK}/{split}")
