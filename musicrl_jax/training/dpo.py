"""Direct preference optimisation of the music LM on pairwise preferences (MusicRL-U offline).

The alternative to "Bradley-Terry reward model + RL" for user preferences: the policy is trained
directly on the `musicrl_preferences` pairs by the one supervised loop (`trainer.train`), with
the pretrained LM both as its start and as the frozen reference.

With Delta(y) = log pi(y|x) - log pi_ref(y|x) for a clip y and h = Delta(a) - Delta(b):
  'dpo' (Rafailov et al. 2023): -log sigmoid(beta * h) for "a preferred" (ties count half to
        each side, as the preference reward model treats them);
  'ipo' (Azar et al. 2023):     (h - (2 p_a - 1) / (2 beta))^2, p_a = P(a preferred), a squared
        loss that does not push the margin to infinity on deterministic preferences.
The reference log-probs are computed once, when the task is built, and travel with the batches
(`ref_logprob_a`, `ref_logprob_b`), so the training step holds one copy of the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from musicrl_jax import partitioning
from musicrl_jax.data.sources import ArraySource
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import music_lm
from musicrl_jax.models.music_lm import MusicLMConfig
from musicrl_jax.training import reward_tasks

LOSS_TYPES = ("dpo", "ipo")
PAIR_FIELDS = ("caption_tokens", "tokens_a", "tokens_b", "choice")


def pair_logprobs(config: MusicLMConfig, params, batch) -> tuple[jax.Array, jax.Array]:
    """(log pi(a|x), log pi(b|x)) [batch] in one forward pass over both clips."""
    size = batch["tokens_a"].shape[0]
    codes = jnp.concatenate([batch["tokens_a"], batch["tokens_b"]])
    mask = (jnp.concatenate([batch["mask_a"], batch["mask_b"]]) if "mask_a" in batch else None)
    captions = jnp.concatenate([batch["caption_tokens"]] * 2)
    token_lp, _ = music_lm.token_logprobs(config, params, captions, codes, mask)
    seq = token_lp.sum(axis=(1, 2))
    return seq[:size], seq[size:]


def preference_loss(margin, prob_a, beta: float, loss_type: str) -> jax.Array:
    """Per-pair loss from h = Delta(a) - Delta(b) and P(a preferred) (module docstring)."""
    if loss_type == "dpo":
        logits = beta * margin
        return prob_a * jax.nn.softplus(-logits) + (1.0 - prob_a) * jax.nn.softplus(logits)
    if loss_type == "ipo":
        return jnp.square(margin - (2.0 * prob_a - 1.0) / (2.0 * beta))
    raise ConfigError(f"DPOTask.loss_type={loss_type!r}; expected one of {list(LOSS_TYPES)}.")


def with_reference_logprobs(source, config: MusicLMConfig, reference_params,
                            batch_size: int = 64) -> ArraySource:
    """`source` with each pair's reference log-probs added as `ref_logprob_a/b`."""
    arrays = dict(source.arrays)
    missing = [k for k in PAIR_FIELDS if k not in arrays]
    if missing:
        raise ConfigError(f"DPOTask: source {getattr(source, 'name', source)!r} lacks {missing}; "
                          f"it needs {list(PAIR_FIELDS)} (e.g. @preferences_source()).")
    fields = {k: arrays[k] for k in ("caption_tokens", "tokens_a", "tokens_b", "mask_a",
                                      "mask_b") if k in arrays}
    score = jax.jit(lambda p, b: jnp.stack(pair_logprobs(config, p, b), axis=-1))
    ref = reward_tasks.predict_split(lambda b: score(reference_params, b), fields, batch_size)
    arrays["ref_logprob_a"] = ref[:, 0].astype(np.float32)
    arrays["ref_logprob_b"] = ref[:, 1].astype(np.float32)
    return dataclasses.replace(source, arrays=arrays)


@gin.configurable
@dataclasses.dataclass
class DPOTask:
    """DPO / IPO of the LM at `init_checkpoint` (a pretraining or RL run) on preference pairs;
    the same checkpoint is the frozen reference. Trained by `trainer.train`."""
    train_source: Any = gin.REQUIRED
    eval_source: Any = gin.REQUIRED
    init_checkpoint: str = gin.REQUIRED
    config: MusicLMConfig = dataclasses.field(default_factory=MusicLMConfig)
    beta: float = 0.1
    loss_type: str = "dpo"
    reference_batch_size: int = 64
    kind: str = "music_dpo"

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"DPOTask.loss_type={self.loss_type!r}; expected one of "
                              f"{list(LOSS_TYPES)}.")
        if self.beta <= 0:
            raise ConfigError(f"DPOTask.beta={self.beta} must be > 0.")
        from musicrl_jax.training.rl_finetune import restore_policy_params
        one_device = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
        self._reference = jax.device_get(restore_policy_params(self.config,
                                                               self.init_checkpoint, one_device))
        self.train_source = with_reference_logprobs(self.train_source, self.config,
                                                    self._reference, self.reference_batch_size)
        self.eval_source = with_reference_logprobs(self.eval_source, self.config,
                                                   self._reference, self.reference_batch_size)

    def init_params(self, rng):
        """The reference's values in the LM's boxed (logically annotated) layout."""
        boxed = music_lm.init_params(self.config, rng)
        return partitioning.rebox(boxed, self._reference)

    def loss(self, params, batch, rng):
        del rng
        logprob_a, logprob_b = pair_logprobs(self.config, params, batch)
        margin = ((logprob_a - batch["ref_logprob_a"]) - (logprob_b - batch["ref_logprob_b"]))
        prob_a = 1.0 - batch["choice"].astype(jnp.float32)
        per_pair = preference_loss(margin, prob_a, self.beta, self.loss_type)
        # Ties, and margins at float noise (the policy still at the reference), count half.
        undecided = (prob_a == 0.5) | (jnp.abs(margin) < 1e-3)
        agreement = jnp.where(undecided, 0.5, (margin > 0) == (prob_a > 0.5))
        count = jnp.asarray(margin.shape[0], jnp.float32)
        return per_pair.sum(), count, {"loss": per_pair.sum(), "agreement": agreement.sum(),
                                       "margin": margin.sum()}
