"""Trained reward models as pure jittable scorers, and their weighted, normalised combinations.

  load_reward_model(task, checkpoint_dir)  -> RewardModel (params restored onto a mesh)
  RewardModel.score(params, caption_tokens, audio_codes, audio_mask=None) -> [batch]
  RewardCombination: sum_r weight_r * (score_r - mean_r) / std_r

The reference statistics (mean_r, std_r) put rewards of different units (a cosine, a 1-5
rating, a Bradley-Terry logit) on one scale. They are the scorer's mean and standard deviation
over a reference set (e.g. held-out real clips with their captions), computed once and stored
as JSON at `stats_path` (with the checkpoint each came from); later runs load them, so the scale
stays fixed while the policy moves.

MusicRL-R and MusicRL-U are configs, e.g.
  text_model/load_reward_model.task = @text/TextRewardTask()
  text_model/load_reward_model.checkpoint_dir = %TEXT_REWARD_DIR
  quality_model/load_reward_model.task = @quality/QualityRewardTask()
  quality_model/load_reward_model.checkpoint_dir = %QUALITY_REWARD_DIR
  RewardCombination.rewards = {'text': @text_model/load_reward_model(),
                               'quality': @quality_model/load_reward_model()}
  RewardCombination.weights = {'text': 1.0, 'quality': 1.0}   # MusicRL-R
(MusicRL-U: rewards = {'preference': @preference_model/load_reward_model()}.)

Token ids outside a model's vocabulary would be clamped silently inside jit, so
`validate_tokens` checks them on the host first; `RewardCombination.__call__` always does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gin
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from musicrl_jax import partitioning
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import reward_tasks
from musicrl_jax.training.reward_tasks import (PreferenceRewardTask, QualityRewardTask,
                                               TextRewardTask)

REWARD_KINDS = {"text_reward": TextRewardTask, "quality_reward": QualityRewardTask,
                "preference_reward": PreferenceRewardTask}


def validate_tokens(config, caption_tokens, audio_codes, audio_mask=None, name: str = "reward"):
    """Raises ConfigError when token ids or shapes do not fit a model of `config`
    (a MusicLMConfig): caption ids in [0, caption_vocab_size), audio codes [batch, frames, K]
    with ids in [0, codebook_size)."""
    caption_tokens, audio_codes = np.asarray(caption_tokens), np.asarray(audio_codes)
    if audio_codes.ndim != 3 or audio_codes.shape[-1] != config.num_codebooks:
        raise ConfigError(f"{name} model: audio_codes have shape {audio_codes.shape}; expected "
                          f"[batch, frames, {config.num_codebooks}] (its num_codebooks). Fix: "
                          "score clips from the tokenizer the reward model was trained on.")
    if caption_tokens.ndim != 2 or len(caption_tokens) != len(audio_codes):
        raise ConfigError(f"{name} model: caption_tokens have shape {caption_tokens.shape}; "
                          f"expected [batch={len(audio_codes)}, text_length].")
    if audio_mask is not None and np.shape(audio_mask) != audio_codes.shape[:2]:
        raise ConfigError(f"{name} model: audio_mask has shape {np.shape(audio_mask)}; expected "
                          f"{audio_codes.shape[:2]} ([batch, frames]).")
    for field, values, limit, setting in (
            ("caption_tokens", caption_tokens, config.caption_vocab_size, "caption_vocab_size"),
            ("audio_codes", audio_codes, config.codebook_size, "codebook_size")):
        bad = (values < 0) | (values >= limit)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ConfigError(
                f"{name} model: {field} hold id {int(values[where])} at index {where}, outside "
                f"the model's vocabulary [0, {limit}) ({setting}={limit}); {int(bad.sum())} ids "
                "are out of range. Fix: use the caption vocabulary and audio tokenizer the "
                "reward model was trained with, or a reward model trained for these tokens.")


@dataclasses.dataclass
class RewardModel:
    """A trained reward model: its task (model + config) and restored params."""
    task: Any
    params: Any
    checkpoint_dir: str = ""

    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def config(self):
        return self.task.config

    def score(self, params, caption_tokens, audio_codes, audio_mask=None):
        """Pure and jittable: the reward [batch]."""
        return self.task.score(params, caption_tokens, audio_codes, audio_mask)

    def validate_tokens(self, caption_tokens, audio_codes, audio_mask=None):
        validate_tokens(self.config, caption_tokens, audio_codes, audio_mask, self.kind)


@gin.configurable
def load_reward_model(task=gin.REQUIRED, checkpoint_dir: str = gin.REQUIRED, mesh=None,
                      step: int | None = None) -> RewardModel:
    """Restores `task`'s model from a reward stage's run (or checkpoints) directory onto `mesh`
    (default: `make_mesh()`), sharded by the logical axis rules. A missing directory, an empty
    one or another model's checkpoint raises ConfigError saying so."""
    if getattr(task, "kind", None) not in REWARD_KINDS:
        raise ConfigError(f"load_reward_model.task={task!r} is not a reward task; expected one "
                          f"of {[cls.__name__ for cls in REWARD_KINDS.values()]}.")
    params = reward_tasks.restore_params(task.fresh_params, task.kind, checkpoint_dir, mesh, step)
    return RewardModel(task=task, params=params, checkpoint_dir=os.path.abspath(checkpoint_dir))


@gin.configurable
class RewardCombination:
    """total = sum_r weight_r * (score_r - mean_r) / std_r over named reward models."""

    def __init__(self, rewards: dict[str, RewardModel] = gin.REQUIRED,
                 weights: dict[str, float] = gin.REQUIRED,
                 reference_stats: dict[str, dict[str, float]] | None = None,
                 stats_path: str | None = None, reference_source=None,
                 reference_batch_size: int = 64, mesh=None):
        if set(rewards) != set(weights):
            raise ConfigError(f"RewardCombination: weights name {sorted(weights)} but rewards "
                              f"name {sorted(rewards)}. Fix: give one weight per reward.")
        self.rewards = dict(rewards)
        self.weights = {k: float(v) for k, v in weights.items()}
        self.mesh = mesh
        self.stats = reference_stats or self._reference_stats(stats_path, reference_source,
                                                              reference_batch_size)
        missing = sorted(set(rewards) - set(self.stats))
        if missing:
            raise ConfigError(f"RewardCombination: no reference statistics for {missing}. Fix: "
                              "give reference_source (they are then computed and stored) or "
                              "delete the stale stats_path file.")
        self._jitted = None

    @property
    def params(self) -> dict[str, Any]:
        return {name: model.params for name, model in self.rewards.items()}

    def check_policy(self, lm_config, caption_tokens=None) -> None:
        """Raises ConfigError unless every reward model reads the clips of a policy with
        `lm_config` (same codebooks and codebook size, a caption vocabulary that holds the
        policy's) and, if given, these caption tokens. Inside the jitted RL step an id out of
        range would be clamped silently, so this runs once at start-up."""
        for name, model in self.rewards.items():
            config = model.config
            for field in ("num_codebooks", "codebook_size"):
                if getattr(config, field) != getattr(lm_config, field):
                    raise ConfigError(
                        f"Reward {name!r} ({model.checkpoint_dir}) has {field}="
                        f"{getattr(config, field)} but the policy has "
                        f"{getattr(lm_config, field)}: it was trained on another audio "
                        "tokenizer. Fix: train the reward model on this data's tokens, or "
                        "fine-tune a policy of the same tokenizer.")
            if config.caption_vocab_size < lm_config.caption_vocab_size:
                raise ConfigError(
                    f"Reward {name!r} ({model.checkpoint_dir}) has caption_vocab_size="
                    f"{config.caption_vocab_size}, smaller than the policy's "
                    f"{lm_config.caption_vocab_size}. Fix: use the caption vocabulary the "
                    "reward model was trained with.")
            if caption_tokens is not None:
                codes = np.zeros((len(caption_tokens), 1, lm_config.num_codebooks), np.int32)
                model.validate_tokens(caption_tokens, codes)

    def raw_scores(self, params, caption_tokens, audio_codes, audio_mask=None):
        return {name: model.score(params[name], caption_tokens, audio_codes, audio_mask)
                for name, model in self.rewards.items()}

    def reward_fn(self, params, caption_tokens, audio_codes, audio_mask=None):
        """Pure and jittable: (total [batch], {name: raw score [batch]})."""
        raw = self.raw_scores(params, caption_tokens, audio_codes, audio_mask)
        total = 0.0
        for name, score in raw.items():
            stats = self.stats[name]
            total = total + self.weights[name] * (score - stats["mean"]) / stats["std"]
        return total, raw

    def __call__(self, caption_tokens, audio_codes, audio_mask=None):
        """Host entry: validates tokens for every model, then runs the jitted `reward_fn`
        (batch split over the mesh's batch axes when a mesh is set)."""
        for model in self.rewards.values():
            model.validate_tokens(caption_tokens, audio_codes, audio_mask)
        batch = {"caption_tokens": np.asarray(caption_tokens, np.int32),
                 "audio_codes": np.asarray(audio_codes, np.int32)}
        if audio_mask is not None:
            batch["audio_mask"] = np.asarray(audio_mask, np.int32)
        if self.mesh is None:
            if self._jitted is None:
                self._jitted = jax.jit(lambda p, b: self.reward_fn(p, **b))
            return self._jitted(self.params, batch)
        with partitioning.mesh_context(self.mesh):
            if self._jitted is None:
                self._jitted = jax.jit(
                    lambda p, b: self.reward_fn(p, **b),
                    out_shardings=NamedSharding(self.mesh, PartitionSpec()))
            return self._jitted(self.params, partitioning.shard_batch(batch, self.mesh))

    def _reference_stats(self, stats_path, reference_source, batch_size):
        if stats_path and os.path.exists(stats_path):
            with open(stats_path) as f:
                stored = json.load(f)
            stale = [n for n, m in self.rewards.items()
                     if n in stored and stored[n].get("checkpoint_dir") != m.checkpoint_dir]
            if stale:
                raise ConfigError(
                    f"{stats_path}: reference statistics for {stale} were computed for other "
                    "checkpoints. Fix: delete the file so they are recomputed, or point "
                    "stats_path elsewhere.")
            return stored
        if reference_source is None:
            raise ConfigError("RewardCombination needs reference statistics: give "
                              "reference_stats, an existing stats_path, or reference_source "
                              "(e.g. held-out real clips) to compute them.")
        stats = reference_statistics(self.rewards, reference_source, batch_size)
        if stats_path:
            os.makedirs(os.path.dirname(os.path.abspath(stats_path)), exist_ok=True)
            with open(stats_path, "w") as f:
                json.dump(stats, f, indent=1)
        return stats


def reference_statistics(rewards: dict[str, RewardModel], reference_source,
                         batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per reward: mean and std of its score over every example of `reference_source`
    (an ArraySource with caption_tokens, audio_codes and optionally audio_mask)."""
    arrays = reference_source.arrays
    fields = {k: arrays[k] for k in ("caption_tokens", "audio_codes", "audio_mask")
              if k in arrays}
    stats = {}
    for name, model in rewards.items():
        model.validate_tokens(fields["caption_tokens"], fields["audio_codes"],
                              fields.get("audio_mask"))
        params = model.params
        fn = jax.jit(lambda b, model=model, params=params: model.score(
            params, b["caption_tokens"], b["audio_codes"], b.get("audio_mask")))
        scores = reward_tasks.predict_split(fn, fields, batch_size).astype(np.float64)
        if scores.std() < 1e-6:
            raise ConfigError(
                f"Reward {name!r} ({model.checkpoint_dir}) is constant ({scores.mean():.4g}) "
                f"over the {len(scores)} reference examples, so it cannot be normalised. Fix: "
                "check that its checkpoint is trained and that the reference set varies.")
        stats[name] = {"mean": float(scores.mean()), "std": float(scores.std()),
                       "count": int(len(scores)), "checkpoint_dir": model.checkpoint_dir}
    return stats
