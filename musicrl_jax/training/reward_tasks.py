"""Reward-model tasks for the one training loop (`trainer.train`), and their held-out metrics.

  TextRewardTask        kind 'text_reward'        symmetric InfoNCE over (caption, clip) pairs
  QualityRewardTask     kind 'quality_reward'     MSE to 1-5 ratings, audio only
  PreferenceRewardTask  kind 'preference_reward'  Bradley-Terry on (clip a, clip b, choice) pairs

Each task follows the trainer's contract (`init_params`, `loss`, `train_source`, `eval_source`,
`kind`) and adds `score(params, caption_tokens, audio_codes, audio_mask=None) -> [batch]` (the
reward, used by `musicrl_jax.rewards`) and `heldout_metrics(params, source=None)`: metrics that
need the whole split at once (retrieval recall, correlations, calibration), which a per-batch
loss cannot give.

Batch fields: caption_tokens [batch, text_length] (0 = padding), audio_codes [batch, frames, K]
and optional audio_mask [batch, frames] (1 = real frame); quality adds rating [batch] (1-5);
preference uses tokens_a / tokens_b [batch, frames, K] (optional mask_a / mask_b) and choice
[batch] (0 = a preferred, 1 = b preferred, 0.5 = tie).
"""

from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import music_lm, reward_models
from musicrl_jax.models.music_lm import MusicLMConfig


# --- restoring a trainer checkpoint's params ---------------------------------------------------

def checkpoint_directory(path: str, kind: str) -> str:
    """A run directory (holding `checkpoints/`) or the checkpoints directory itself; never
    created here, so a typo is reported instead of becoming an empty directory."""
    path = os.path.abspath(path)
    nested = os.path.join(path, "checkpoints")
    if os.path.isdir(nested):
        return nested
    if os.path.isdir(path):
        return path
    raise ConfigError(f"No {kind} checkpoint directory at {path}. Fix: train the {kind} stage "
                      "first (its train.workdir holds checkpoints/), or correct the path.")


def restore_params(init_params: Callable, kind: str, path: str, mesh=None, step=None,
                   make_state: Callable | None = None):
    """Params of a checkpoint, restored onto `mesh` sharded by the logical rules.

    `init_params(rng)` gives the boxed parameter tree of the expected model; the optimizer
    state is restored alongside (the checkpoint holds the whole state) and dropped.
    `make_state(params, opt_state)` builds the saved state's layout (default: the trainer's
    TrainState; the RL loop passes its RLState).
    """
    from musicrl_jax.training import trainer  # the loop owns the TrainState layout

    directory = checkpoint_directory(path, kind)
    mesh = partitioning.make_mesh() if mesh is None else mesh
    tx, _ = trainer.make_optimizer(total_steps=1)  # only its state's structure is used
    if make_state is None:
        def make_state(params, opt_state):
            return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                      opt_state=opt_state)

    def init_state(rng):
        params = init_params(rng)
        return make_state(params, tx.init(params))

    with partitioning.mesh_context(mesh):
        abstract, _ = partitioning.abstract_with_shardings(init_state, mesh,
                                                           jax.random.PRNGKey(0))
    checkpointer = Checkpointer(directory, kind=kind)
    try:
        return checkpointer.restore(abstract, step).params
    finally:
        checkpointer.close()


# --- shared helpers -----------------------------------------------------------------------------

def _require(batch, fields, kind):
    missing = [f for f in fields if f not in batch]
    if missing:
        raise ConfigError(f"{kind} data lacks the field(s) {missing} (have {sorted(batch)}). "
                          "Fix: use the readers in musicrl_jax/data/feedback.py, which produce "
                          "them.")


def predict_split(fn: Callable, arrays: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Applies jitted `fn(batch) -> [batch, ...]` to every example (the last chunk is padded
    by repeating its first row, so one compiled shape serves the whole split)."""
    n = len(next(iter(arrays.values())))
    outputs = []
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
        real = len(next(iter(chunk.values())))
        if real < batch_size:
            chunk = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, axis=0)])
                     for k, v in chunk.items()}
        outputs.append(np.asarray(fn(chunk))[:real])
    return np.concatenate(outputs)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their average rank (what Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else 0.0


def spearman(x, y) -> float:
    return pearson(_ranks(np.asarray(x)), _ranks(np.asarray(y)))


def expected_calibration_error(probs, outcomes, num_bins: int = 10) -> float:
    """sum_bins (n_bin / n) |mean predicted probability - observed frequency|, equal-width bins."""
    probs, outcomes = np.asarray(probs, np.float64), np.asarray(outcomes, np.float64)
    bins = np.minimum((probs * num_bins).astype(int), num_bins - 1)
    error = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            error += in_bin.mean() * abs(probs[in_bin].mean() - outcomes[in_bin].mean())
    return float(error)


class MissingSource:
    """Stands in for an unbound data source: scoring needs none, training reports the binding."""

    def __init__(self, field: str):
        self.field = field

    def _error(self):
        return ConfigError(f"The reward task's {self.field} is not bound. Fix: bind it in the "
                           f"stage's gin file, e.g. TextRewardTask.{self.field} = "
                           "@train_split/simulated_source() or @ratings_source().")

    def train_batch(self, step, batch_size):
        raise self._error()

    def eval_batches(self, batch_size, max_batches=None):
        raise self._error()

    @property
    def arrays(self):
        raise self._error()


@dataclasses.dataclass
class _RewardTask(abc.ABC):
    """Shared plumbing: model construction, optional LM initialisation, scoring."""
    train_source: Any = dataclasses.field(default_factory=lambda: MissingSource("train_source"))
    eval_source: Any = dataclasses.field(default_factory=lambda: MissingSource("eval_source"))
    config: MusicLMConfig = dataclasses.field(default_factory=MusicLMConfig)
    num_audio_layers: int = 2
    # A music_lm run (or checkpoints) directory: copy its audio embedding (and text encoder,
    # where the model has one) into the initial params; see reward_models.init_from_music_lm.
    init_from_music_lm: str | None = None
    # A fitted mel-RVQ tokenizer directory: the audio tower adds statistics of the decoded
    # log-mel (reward_models.SpectralSummary), starting from this tokenizer's codebooks.
    spectral_tokenizer: str | None = None
    eval_batch_size: int = 64
    # A run (or checkpoints) directory of this same reward model: start from its params
    # instead (a feedback round retrains the last round's model on the new votes).
    warm_start: str | None = None

    @abc.abstractmethod
    def model(self) -> nn.Module:
        """The Flax module this reward trains."""

    def _example_inputs(self):
        cfg = self.config
        return (jnp.ones((1, cfg.max_caption_length), jnp.int32),
                jnp.zeros((1, cfg.max_frames, cfg.num_codebooks), jnp.int32))

    def fresh_params(self, rng):
        """Boxed params, freshly initialised (the checkpoint-restore template)."""
        return self.model().init(rng, *self._example_inputs(), method="score")["params"]

    @property
    def spectral_bins(self) -> int:
        """Mel bands of `spectral_tokenizer` (0: no spectral summary)."""
        return self._spectral_codebooks()[0].shape[-1] if self.spectral_tokenizer else 0

    def _spectral_codebooks(self) -> tuple[np.ndarray, np.ndarray]:
        """(codebooks [K, size, bins], band means [bins]) in natural-log mel power."""
        if getattr(self, "_codebooks", None) is None:
            from musicrl_jax.audio.tokenizer import load_tokenizer
            try:
                tokenizer = load_tokenizer(self.spectral_tokenizer)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"{type(self).__name__}.spectral_tokenizer="
                                  f"{self.spectral_tokenizer}: {e}") from None
            codebooks = getattr(tokenizer, "codebooks", None)
            if codebooks is None:
                raise ConfigError(
                    f"{type(self).__name__}.spectral_tokenizer={self.spectral_tokenizer}: "
                    f"a {type(tokenizer).__name__} has no log-mel codebooks. Fix: point it at "
                    "the mel-RVQ tokenizer that made the audio codes, or unset it.")
            scale = np.asarray(tokenizer.mel_std, np.float32)  # undo the normalisation
            self._codebooks = (np.asarray(codebooks, np.float32) * scale,
                               np.broadcast_to(np.asarray(tokenizer.mel_mean, np.float32),
                                               codebooks.shape[-1:]).copy())
        return self._codebooks

    def init_params(self, rng):
        params = self.fresh_params(rng)
        if self.warm_start:
            return partitioning.rebox(params, self._warm_start_params())
        if not (self.init_from_music_lm or self.spectral_tokenizer):
            return params
        values = nn.meta.unbox(params)
        if self.init_from_music_lm:
            values, _ = reward_models.init_from_music_lm(values, self._pretrained_lm_params())
        if self.spectral_tokenizer:
            values = reward_models.init_from_tokenizer(values, *self._spectral_codebooks())
        return partitioning.rebox(params, values)

    def _pretrained_lm_params(self):
        # Restored once, eagerly even when called while the trainer traces its jitted init
        # (which then closes over the values).
        if getattr(self, "_lm_params", None) is None:
            with jax.ensure_compile_time_eval():
                one_device = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
                params = restore_params(lambda rng: music_lm.init_params(self.config, rng),
                                        "music_lm", self.init_from_music_lm, one_device)
                self._lm_params = jax.device_get(params)
        return self._lm_params

    def _warm_start_params(self):
        # As _pretrained_lm_params: restored once, eagerly, even inside the jitted init.
        if getattr(self, "_warm_params", None) is None:
            with jax.ensure_compile_time_eval():
                one_device = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
                params = restore_params(self.fresh_params, self.kind, self.warm_start,
                                        one_device)
                self._warm_params = jax.device_get(nn.meta.unbox(params))
        return self._warm_params

    def score(self, params, caption_tokens, audio_codes, audio_mask=None):
        """The reward [batch] (pure, jittable)."""
        return self.model().apply({"params": params}, caption_tokens, audio_codes, audio_mask,
                                  method="score")

    def _eval_arrays(self, source):
        return (source or self.eval_source).arrays


@gin.configurable
@dataclasses.dataclass
class TextRewardTask(_RewardTask):
    """MuLan-like text adherence: a dual encoder trained with symmetric InfoNCE.

    Clips whose caption tokens are identical are all positives for each other (the targets
    spread evenly over them), so repeated captions are not pushed apart as negatives.
    """
    projection_dim: int = 64
    initial_temperature: float = 0.07
    max_logit_scale: float = 100.0
    kind: str = "text_reward"

    def model(self):
        return reward_models.TextAudioDualEncoder(
            self.config, self.num_audio_layers, self.projection_dim, self.initial_temperature,
            self.max_logit_scale, self.spectral_bins)

    def loss(self, params, batch, rng):
        del rng
        _require(batch, ("caption_tokens", "audio_codes"), self.kind)
        captions = batch["caption_tokens"]
        text, audio, scale = self.model().apply({"params": params}, captions,
                                                batch["audio_codes"], batch.get("audio_mask"))
        logits = scale * text @ audio.T  # [captions, clips]
        same = jnp.all(captions[:, None, :] == captions[None, :, :], axis=-1)
        targets = same / same.sum(axis=-1, keepdims=True)
        text_to_audio = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1)
        audio_to_text = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=0), axis=0)
        per_example = 0.5 * (text_to_audio + audio_to_text)
        hits = same[jnp.arange(len(captions)), jnp.argmax(logits, axis=1)]
        count = jnp.asarray(captions.shape[0], jnp.float32)
        return per_example.sum(), count, {"loss": per_example.sum(),
                                          "text_to_audio_accuracy": hits.sum(),
                                          "logit_scale": scale * count}

    def embed(self, params, arrays, batch_size=None):
        """(text embeddings, audio embeddings) [n, projection_dim] for a whole split."""
        model, size = self.model(), batch_size or self.eval_batch_size
        text_fn = jax.jit(lambda b: model.apply({"params": params}, b["caption_tokens"],
                                                method="embed_text"))
        audio_fn = jax.jit(lambda b: model.apply({"params": params}, b["audio_codes"],
                                                 b.get("audio_mask"), method="embed_audio"))
        audio_fields = {k: arrays[k] for k in ("audio_codes", "audio_mask") if k in arrays}
        return (predict_split(text_fn, {"caption_tokens": arrays["caption_tokens"]}, size),
                predict_split(audio_fn, audio_fields, size))

    def heldout_metrics(self, params, source=None, ks=(1, 10)) -> dict[str, float]:
        """Retrieval over the whole split. Captions are deduplicated (identical token rows are
        one caption): audio->text ranks each clip's caption among the distinct captions;
        text->audio counts a hit when any of the k nearest clips carries that caption. Chance
        levels are reported beside each recall."""
        arrays = self._eval_arrays(source)
        text, audio = self.embed(params, arrays)
        captions, first, labels = np.unique(arrays["caption_tokens"], axis=0, return_index=True,
                                            return_inverse=True)
        labels = labels.reshape(-1)
        similarity = audio @ text[first].T  # [clips, distinct captions]
        own = similarity[np.arange(len(labels)), labels]
        audio_rank = (similarity > own[:, None]).sum(axis=1)
        order = np.argsort(-similarity, axis=0, kind="stable")  # clips by similarity per caption
        counts = np.bincount(labels, minlength=len(captions))
        metrics = {"num_clips": float(len(labels)), "num_captions": float(len(captions))}
        for k in ks:
            top = labels[order[:k]]  # [k, captions]
            hits = (top == np.arange(len(captions))[None]).any(axis=0)
            metrics[f"text_to_audio_recall@{k}"] = float(hits.mean())
            metrics[f"audio_to_text_recall@{k}"] = float((audio_rank < k).mean())
            no_hit = np.array([np.prod([(len(labels) - c - j) / (len(labels) - j)
                                        for j in range(min(k, len(labels)))]) for c in counts])
            metrics[f"text_to_audio_chance@{k}"] = float(1.0 - no_hit.mean())
            metrics[f"audio_to_text_chance@{k}"] = min(1.0, k / len(captions))
        metrics["mean_cosine_matched"] = float(own.mean())
        metrics["mean_cosine_all"] = float(similarity.mean())
        return metrics


@gin.configurable
@dataclasses.dataclass
class QualityRewardTask(_RewardTask):
    """Mean-opinion-score regression from the audio alone (the caption is never read)."""
    kind: str = "quality_reward"

    def model(self):
        return reward_models.QualityModel(self.config, self.num_audio_layers, self.spectral_bins)

    def loss(self, params, batch, rng):
        del rng
        _require(batch, ("audio_codes", "rating"), self.kind)
        predicted = self.model().apply({"params": params}, batch["audio_codes"],
                                       batch.get("audio_mask"))
        error = predicted - batch["rating"].astype(jnp.float32)
        squared = jnp.sum(error * error)
        return squared, jnp.asarray(error.shape[0], jnp.float32), {"loss": squared, "abs_error": jnp.abs(error).sum()}

    def heldout_metrics(self, params, source=None) -> dict[str, float]:
        """Correlation of predicted and held-out ratings; RMSE against the constant baseline
        that predicts the split's mean rating."""
        arrays = self._eval_arrays(source)
        model = self.model()
        fn = jax.jit(lambda b: model.apply({"params": params}, b["audio_codes"],
                                           b.get("audio_mask")))
        fields = {k: arrays[k] for k in ("audio_codes", "audio_mask") if k in arrays}
        predicted = predict_split(fn, fields, self.eval_batch_size)
        ratings = np.asarray(arrays["rating"], np.float64)
        return {"pearson": pearson(predicted, ratings), "spearman": spearman(predicted, ratings),
                "rmse": float(np.sqrt(np.mean((predicted - ratings) ** 2))),
                "rmse_constant_baseline": float(ratings.std()),
                "num_clips": float(len(ratings))}


@gin.configurable
@dataclasses.dataclass
class PreferenceRewardTask(_RewardTask):
    """Bradley-Terry user-preference model: loss -log sigmoid(s_winner - s_loser).

    Ties (choice 0.5) are kept with target probability 1/2, i.e. each counts as half a win for
    either clip; they are left out of accuracy and calibration, which need a winner.
    """
    use_caption: bool = False
    kind: str = "preference_reward"

    def model(self):
        return reward_models.PreferenceModel(self.config, self.num_audio_layers,
                                             self.use_caption, self.spectral_bins)

    def score_pair(self, params, batch):
        """(s_a, s_b) [batch] from one forward pass over both clips."""
        batch_size = batch["tokens_a"].shape[0]
        codes = jnp.concatenate([batch["tokens_a"], batch["tokens_b"]])
        mask = None
        if "mask_a" in batch:
            mask = jnp.concatenate([batch["mask_a"], batch["mask_b"]])
        captions = jnp.concatenate([batch["caption_tokens"]] * 2)
        scores = self.score(params, captions, codes, mask)
        return scores[:batch_size], scores[batch_size:]

    def loss(self, params, batch, rng):
        del rng
        _require(batch, ("caption_tokens", "tokens_a", "tokens_b", "choice"), self.kind)
        score_a, score_b = self.score_pair(params, batch)
        margin = score_a - score_b
        a_wins = 1.0 - batch["choice"].astype(jnp.float32)  # P(a preferred)
        per_pair = a_wins * jax.nn.softplus(-margin) + (1.0 - a_wins) * jax.nn.softplus(margin)
        agreement = jnp.where(a_wins == 0.5, 0.5, (margin > 0) == (a_wins > 0.5))
        return per_pair.sum(), jnp.asarray(margin.shape[0], jnp.float32), {"loss": per_pair.sum(),
                                                 "agreement": agreement.sum()}

    def heldout_metrics(self, params, source=None, num_bins: int = 10) -> dict[str, float]:
        """Pairwise accuracy and ECE (equal-width bins on sigmoid(s_a - s_b) against 'a won')
        over the decided pairs, with the majority-class rate as the trivial baseline."""
        arrays = self._eval_arrays(source)
        fn = jax.jit(lambda b: jnp.stack(self.score_pair(params, b), axis=-1))
        fields = {k: arrays[k] for k in ("caption_tokens", "tokens_a", "tokens_b", "mask_a",
                                         "mask_b") if k in arrays}
        scores = predict_split(fn, fields, self.eval_batch_size)
        choice = np.asarray(arrays["choice"], np.float64)
        decided = choice != 0.5
        a_won = (choice[decided] == 0).astype(np.float64)
        prob_a = 1.0 / (1.0 + np.exp(-(scores[decided, 0] - scores[decided, 1])))
        return {"accuracy": float(((prob_a > 0.5) == (a_won > 0.5)).mean()),
                "majority_rate": float(max(a_won.mean(), 1.0 - a_won.mean())),
                "ece": expected_calibration_error(prob_a, a_won, num_bins),
                "num_pairs": float(decided.sum()), "num_ties": float((~decided).sum())}
