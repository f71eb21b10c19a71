"""RL fine-tuning of the music LM (MusicRL).

Maximises J = E_{y~pi(.|x)}[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)).

The pieces, all pure and jittable:

  advantages(rewards, group_size, baseline)    'none' | 'batch_mean' | 'rloo' | 'group_mean' |
                                               'group_norm'
  kl_per_token(policy_lp, reference_lp, mask, est)  per-token k1 / k2 / k3 (0 off the mask)
  kl_per_sequence(...)                          the same, summed per sequence -> [B]
  rl_loss(config, token_lp, old_lp, ref_lp, entropy, mask, rewards, beta)  the surrogate loss
  make_rl_step(lm_config, tx, reward_fn, rl_config) -> rl_step(state, reference_params,
                                                        reward_params, caption_tokens, rng)

One `rl_step`: every caption is repeated `samples_per_caption` times, clips are drawn with the
KV-cache sampler from the current policy (constants: no gradient flows through sampling), scored
by `reward_fn` (sequence-level reward) and by the frozen reference LM, and the surrogate takes
`updates_per_batch` optax steps on those samples. `jit_rl_step` jits it with shardings.

Algorithms (`RLConfig.algorithm`):

* 'reinforce' (default; RLOO with the 'rloo' baseline): the surrogate's gradient is an
  unbiased (leave-one-out baselines) Monte-Carlo estimate of grad J; `tests/test_rl_exact.py`
  checks every accepted setting against the exact gradient on an enumerable LM.
  With k_t the per-token KL estimate and K = sum_t k_t:
  - kl_mode='reward' (the paper's): the shaped reward r - beta * stop_gradient(K) enters the
    score-function (REINFORCE) term. For k1 (K = log pi(y)/pi_ref(y)) that is exactly grad KL.
    For k3 (E[k3_t | prefix] = KL_t, but k3 depends on pi) the pathwise term beta * grad sum_t k3_t
    is added, as grad E[f_theta(y)] = E[f grad log pi] + E[grad f].
  - kl_mode='loss': the KL is its own term, reward-to-go style: token s is weighted by
    sum_{t >= s} k_t (later tokens depend on it; earlier ones do not), baselined like the reward,
    plus the pathwise term for k3. Same expectation as 'reward', no whitening of the KL.
  - k2 is rejected: E[k2] is not the KL, so no surrogate built on it has gradient grad KL.
* 'grpo' (DeepSeekMath; as TRL and Tunix implement it): group-normalised advantages
  (r - mean_group) / std_group ('group_norm'; 'group_mean' is Dr. GRPO's unscaled variant),
  per-token clipped ratios, and the KL as a per-token loss beta * k3_t differentiated pathwise
  (kl_mode='token_loss'). That KL term's gradient is the per-token gradient of KL(pi_ref || pi)
  with the prefix fixed, not grad KL(pi || pi_ref): GRPO is a regularised heuristic, not an
  unbiased estimator of J (the std division reweights captions), and is documented as such.
  loss_aggregation: 'sequence_mean' (GRPO: each sequence's token mean, then the batch mean),
  'token_mean' (DAPO: all tokens of the batch weigh alike), 'constant' (Dr. GRPO: divide by
  batch * max tokens). With the fixed-length clips of this project the three differ only by
  constant factors; they differ when a mask makes lengths ragged.

Per-token ratios: every token's term is written as A_t * rho_t with rho_t = pi_t / pi_old_t
(clipped PPO-style when ratio_clip > 0), so the first update (rho = 1) has the on-policy
gradient and later ones (updates_per_batch > 1) are importance-weighted per token; a per-sequence
ratio over ~1,000 tokens would explode, or, clipped, zero most gradients.

Sampling: the estimators are on-policy, so RL samples at temperature 1 with no top-k and no
classifier-free guidance (`RLConfig` rejects other `sampling` settings; evaluation may still
sample the trained policy any way it likes).

Reward normalisation: 'batch_whiten' divides the shaped reward (and, in reward mode, the KL
within it, pathwise part included) by the batch's std and removes its mean; 'none' (default)
keeps the RewardCombination's already-normalised scale. The entropy bonus is the per-token
entropy regulariser of PPO implementations (prefix fixed), not a sequence-entropy gradient.

Non-finite values (`RLConfig.nonfinite`): the step counts, per component, the samples whose
reward is NaN/Inf or whose policy/reference log-ratio overflows (`nonfinite_by_component`), and
the updates whose loss or gradient norm is NaN/Inf (metrics 'nonfinite/...', 'nonfinite_samples').
A step at fault returns the state it was given. With 'stop' (default) any of them is a fault, and
`train_rl`, reading the counts with the metrics or before a checkpoint (no sync of its own),
raises TrainingDivergedError naming the step and the component; nothing from that step on is
saved. With 'drop' such samples weigh nothing (jnp.where, since NaN * 0 is NaN) and enter no
baseline or normalisation; only a non-finite update then stops the run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from musicrl_jax import decoding, partitioning
from musicrl_jax.checkpoints import Checkpointer, abstract_like
from musicrl_jax.decoding import SamplingConfig
from musicrl_jax.errors import ConfigError, Preempted
from musicrl_jax.models import lora as lora_lib
from musicrl_jax.models import music_lm
from musicrl_jax.training.trainer import (PreemptionFlag, RunLog, TrainingDivergedError,
                                          check_finite, freeze, make_optimizer,
                                          write_operative_config)

ALGORITHMS = ("reinforce", "grpo")
BASELINES = ("none", "batch_mean", "rloo", "group_mean", "group_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_MODES = ("reward", "loss", "token_loss")
NORMALIZATIONS = ("none", "batch_whiten")
LOSS_AGGREGATIONS = ("sequence_sum", "sequence_mean", "token_mean", "constant")
NONFINITE_MODES = ("stop", "drop")
# algorithm -> (accepted values per setting, default first)
_ACCEPTED = {
    "reinforce": {"baseline": ("rloo", "batch_mean", "none"), "kl_mode": ("reward", "loss"),
                  "kl_estimator": ("k1", "k3"), "loss_aggregation": ("sequence_sum",)},
    "grpo": {"baseline": ("group_norm", "group_mean", "rloo"), "kl_mode": ("token_loss",),
             "kl_estimator": ("k3",),
             "loss_aggregation": ("sequence_mean", "token_mean", "constant")},
}
_WHY_REJECTED = {
    ("reinforce", "kl_estimator", "k2"): "E[k2] is not the KL (it is biased), so neither a "
        "REINFORCE nor a pathwise term built on it has gradient grad KL(pi || pi_ref)",
    ("reinforce", "baseline", "group_norm"): "dividing by the group's std reweights captions, "
        "so the gradient is no longer grad J (use algorithm='grpo' for that heuristic)",
    ("reinforce", "kl_mode", "token_loss"): "a per-token pathwise KL fixes the prefix and, "
        "with k3, differentiates the reverse KL(pi_ref || pi) (that is GRPO's regulariser: "
        "use algorithm='grpo')",
}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLConfig:
    algorithm: str = "reinforce"  # reinforce (RLOO; exact gradient) | grpo (module docstring)
    samples_per_caption: int = 4
    # None = the algorithm's default (first of its accepted values in _ACCEPTED).
    baseline: str | None = None  # reinforce: rloo | batch_mean | none; grpo: group_norm | ...
    reward_normalization: str = "none"  # none | batch_whiten (see module docstring)
    kl_mode: str | None = None  # reinforce: reward (paper) | loss; grpo: token_loss
    kl_estimator: str | None = None  # reinforce: k1 | k3; grpo: k3
    loss_aggregation: str | None = None  # reinforce: sequence_sum; grpo: sequence_mean | ...
    beta: float = 0.1  # initial (and, without target_kl, fixed) KL coefficient
    target_kl: float = 0.0  # > 0: adapt beta toward this per-sequence KL
    adaptive_kl_rate: float = 0.1  # proportional gain of the beta controller
    entropy_bonus: float = 0.0  # coefficient on the mean per-token policy entropy
    updates_per_batch: int = 1
    ratio_clip: float | None = None  # per-token PPO clip; None: 0.2 for grpo, 0 (off) otherwise
    num_frames: int = 8
    # A sample whose reward or policy/reference log-ratio is NaN/Inf: 'stop' ends the run at
    # that step (its update not applied, nothing saved); 'drop' leaves it out of the update
    # and counts it (metric nonfinite_samples). A non-finite loss or gradient always stops.
    nonfinite: str = "stop"
    # RL samples on-policy: temperature 1, no top-k, no guidance (checked below).
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"RLConfig.algorithm={self.algorithm!r}; expected one of "
                              f"{list(ALGORITHMS)}.")
        accepted = _ACCEPTED[self.algorithm]
        for name, allowed in accepted.items():
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, allowed[0])
                continue
            if value not in allowed:
                why = _WHY_REJECTED.get((self.algorithm, name, value))
                raise ConfigError(
                    f"RLConfig.{name}={value!r} is not accepted with algorithm="
                    f"{self.algorithm!r}" + (f": {why}." if why else ".") +
                    f" Fix: use one of {list(allowed)}.")
        if self.ratio_clip is None:
            object.__setattr__(self, "ratio_clip", 0.2 if self.algorithm == "grpo" else 0.0)
        if self.reward_normalization not in NORMALIZATIONS:
            raise ConfigError(f"RLConfig.reward_normalization={self.reward_normalization!r}; "
                              f"expected one of {list(NORMALIZATIONS)}.")
        if self.nonfinite not in NONFINITE_MODES:
            raise ConfigError(
                f"RLConfig.nonfinite={self.nonfinite!r}; expected one of "
                f"{list(NONFINITE_MODES)} ('stop' ends the run at a NaN/Inf reward or "
                "log-ratio, 'drop' leaves those samples out of the update and counts them).")
        if self.samples_per_caption < 1 or self.updates_per_batch < 1:
            raise ConfigError("RLConfig.samples_per_caption and updates_per_batch must be >= 1.")
        if self.baseline in ("rloo", "group_mean", "group_norm") and self.samples_per_caption < 2:
            raise ConfigError(f"RLConfig.baseline={self.baseline!r} needs samples_per_caption "
                              ">= 2 (it compares the samples of one caption). Fix: raise "
                              "samples_per_caption or use 'batch_mean'.")
        if self.beta < 0 or self.target_kl < 0 or self.ratio_clip < 0:
            raise ConfigError("RLConfig.beta, target_kl and ratio_clip must be >= 0.")
        s = self.sampling
        if s.temperature != 1.0 or s.top_k or s.guidance_weight != 1.0:
            raise ConfigError(
                f"RLConfig.sampling={s}: RL must sample from the policy it differentiates "
                "(temperature 1, top_k 0, guidance_weight 1); other settings draw from another "
                "distribution, so the gradient is off-policy and k1 no longer estimates "
                "KL(pi || pi_ref). Fix: leave RLConfig.sampling at its default; choose the "
                "evaluation's sampling separately (demo.sampling / choose_sampling).")


@gin.config.register_finalize_hook
def _reject_bad_rl_config_at_parse(config):
    """Builds every bound RLConfig when gin is finalised, so a rejected setting stops the run
    before the data and pretraining stages rather than when RL starts."""
    scopes = {scope for scope, selector in config if selector.split(".")[-1] == "RLConfig"}
    for scope in scopes:
        with gin.config_scope(scope or None):
            RLConfig()


@flax.struct.dataclass
class RLState:
    step: jax.Array
    params: Any
    opt_state: Any
    beta: jax.Array  # current KL coefficient (adapted when target_kl > 0)


# --- estimators (pure functions of arrays) -------------------------------------------------

def advantages(rewards: jax.Array, group_size: int, baseline: str = "rloo",
               eps: float = 1e-6, valid: jax.Array | None = None) -> jax.Array:
    """rewards [B] laid out as consecutive groups of `group_size` samples of one caption.

    'none': A = r. 'batch_mean': A = r - mean(r). 'rloo': A_i = r_i - mean_{j != i in group} r_j
    = group_size / (group_size - 1) * (r_i - mean(group)), unbiased since the baseline does not
    depend on the sample it is subtracted from. 'group_mean': r - mean(group) (Dr. GRPO);
    'group_norm': (r - mean(group)) / (std(group) + eps) (GRPO).
    `valid` [B] bool (RLConfig.nonfinite='drop'): the other samples get A = 0 and enter no mean
    or std (their rewards may be NaN), so a group's baselines are those of its valid samples.
    """
    rewards = rewards.astype(jnp.float32)
    if valid is not None:
        return _valid_advantages(rewards, group_size, baseline, eps, valid)
    if baseline == "none":
        return rewards
    if baseline == "batch_mean":
        return rewards - rewards.mean()
    if baseline not in BASELINES:
        raise ConfigError(f"baseline={baseline!r}; expected one of {list(BASELINES)}.")
    if group_size < 2:
        raise ConfigError(f"baseline={baseline!r} needs group_size >= 2.")
    groups = rewards.reshape(-1, group_size)
    centred = groups - groups.mean(-1, keepdims=True)
    if baseline == "rloo":
        centred = centred * group_size / (group_size - 1)
    elif baseline == "group_norm":
        centred = centred / (groups.std(-1, keepdims=True) + eps)
    return centred.reshape(rewards.shape)


def _valid_advantages(rewards, group_size, baseline, eps, valid):
    """`advantages` over the `valid` samples only (jnp.where, not a product: NaN * 0 is NaN)."""
    rewards = jnp.where(valid, rewards, 0.0)
    if baseline == "none":
        return rewards
    if baseline == "batch_mean":
        mean, _ = masked_mean_std(rewards, valid)
        return jnp.where(valid, rewards - mean, 0.0)
    if baseline not in BASELINES:
        raise ConfigError(f"baseline={baseline!r}; expected one of {list(BASELINES)}.")
    if group_size < 2:
        raise ConfigError(f"baseline={baseline!r} needs group_size >= 2.")
    groups, group_valid = rewards.reshape(-1, group_size), valid.reshape(-1, group_size)
    mean, std = masked_mean_std(groups, group_valid, axis=-1)
    centred = groups - mean
    if baseline == "rloo":
        # n / (n - 1) over the group's n valid samples; a lone valid sample has no baseline
        # (its centred reward is 0 already).
        count = group_valid.sum(-1, keepdims=True)
        centred = centred * count / jnp.maximum(count - 1, 1)
    elif baseline == "group_norm":
        centred = centred / (std + eps)
    return jnp.where(group_valid, centred, 0.0).reshape(rewards.shape)


def masked_mean_std(x: jax.Array, valid: jax.Array, axis=None):
    """Mean and (population) std of `x` over the `valid` entries (0 where there are none);
    broadcast back over `axis` when one is given. Entries off `valid` may be NaN/Inf."""
    keepdims = axis is not None
    count = jnp.maximum(valid.sum(axis, keepdims=keepdims), 1)
    mean = jnp.where(valid, x, 0.0).sum(axis, keepdims=keepdims) / count
    deviation = jnp.where(valid, x - mean, 0.0)
    return mean, jnp.sqrt(jnp.square(deviation).sum(axis, keepdims=keepdims) / count)


def whiten(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return (x - x.mean()) / (x.std() + eps)


# log(float32 max): a log-ratio above it overflows exp (k3, the importance ratio).
_LOG_FLOAT32_MAX = float(np.log(np.finfo(np.float32).max))


def nonfinite_by_component(components: dict, total, policy_token_logprobs,
                           reference_token_logprobs, mask) -> dict[str, jax.Array]:
    """Which samples are unusable, by the component at fault: [B] bools under
    'reward/<name>' (that reward component is NaN/Inf), 'reward' (the combined reward is) and
    'log_ratio' (log pi_ref - log pi is NaN/Inf, or too large for exp, on some token, or its
    sequence sums, the k1/k3 KL estimates, overflow)."""
    faults = {f"reward/{name}": ~jnp.isfinite(raw) for name, raw in components.items()}
    faults["reward"] = ~jnp.isfinite(total)
    log_ratio = (reference_token_logprobs - policy_token_logprobs).astype(jnp.float32)
    mask = jnp.broadcast_to(mask, log_ratio.shape)
    overflowed = (~jnp.isfinite(log_ratio) | (log_ratio > _LOG_FLOAT32_MAX)) & mask
    finite = jnp.where(mask & ~overflowed, log_ratio, 0.0).reshape(log_ratio.shape[0], -1)
    sums_overflowed = ~(jnp.isfinite(jnp.abs(finite).sum(-1)) &
                        jnp.isfinite(jnp.expm1(finite).sum(-1)))
    faults["log_ratio"] = overflowed.reshape(finite.shape).any(-1) | sums_overflowed
    return faults


def kl_per_token(policy_token_logprobs, reference_token_logprobs, mask,
                 estimator: str = "k1") -> jax.Array:
    """Per-token KL(pi || pi_ref) estimate at the sampled tokens, 0 where `mask` is False.

    With r_t = log pi_ref(y_t) - log pi(y_t): k1 = -r_t (unbiased, can be negative),
    k2 = r_t^2 / 2 (biased, >= 0), k3 = e^r_t - 1 - r_t (unbiased, >= 0; Schulman)."""
    log_ratio = (reference_token_logprobs - policy_token_logprobs).astype(jnp.float32)
    if estimator == "k1":
        per_token = -log_ratio
    elif estimator == "k2":
        per_token = 0.5 * jnp.square(log_ratio)
    elif estimator == "k3":
        per_token = jnp.expm1(log_ratio) - log_ratio
    else:
        raise ConfigError(f"kl_estimator={estimator!r}; expected one of {list(KL_ESTIMATORS)}.")
    return jnp.where(jnp.broadcast_to(mask, per_token.shape), per_token, 0.0)


def kl_per_sequence(policy_token_logprobs, reference_token_logprobs, mask,
                    estimator: str = "k1") -> jax.Array:
    """`kl_per_token` summed over each sequence's positions -> [B]."""
    per_token = kl_per_token(policy_token_logprobs, reference_token_logprobs, mask, estimator)
    return per_token.reshape(per_token.shape[0], -1).sum(-1)


def policy_gradient_loss(seq_logprobs: jax.Array, advantages: jax.Array) -> jax.Array:
    """REINFORCE surrogate: -mean(stop_gradient(A) * log pi(y|x))."""
    return -jnp.mean(jax.lax.stop_gradient(advantages) * seq_logprobs)


def clipped_token_objective(token_lp, old_token_lp, token_advantages,
                            ratio_clip: float = 0.0) -> jax.Array:
    """Per-token A_t * rho_t, rho_t = pi_t / pi_old_t (PPO-clipped when ratio_clip > 0); its
    gradient at pi = pi_old is A_t * grad log pi_t."""
    adv = jax.lax.stop_gradient(token_advantages)
    ratio = jnp.exp(token_lp - jax.lax.stop_gradient(old_token_lp))
    objective = adv * ratio
    if ratio_clip > 0:
        objective = jnp.minimum(objective, adv * jnp.clip(ratio, 1 - ratio_clip, 1 + ratio_clip))
    return objective


def aggregate(per_token: jax.Array, mask: jax.Array, how: str) -> jax.Array:
    """Reduces per-token terms [B, ...] (0 off `mask`) to a scalar loss."""
    mask = jnp.broadcast_to(mask, per_token.shape).reshape(per_token.shape[0], -1)
    per_token = jnp.where(mask, per_token.reshape(mask.shape), 0.0)
    counts = mask.sum(-1)
    if how == "sequence_sum":
        return per_token.sum(-1).mean()
    if how == "sequence_mean":
        return (per_token.sum(-1) / jnp.maximum(counts, 1)).mean()
    if how == "token_mean":
        return per_token.sum() / jnp.maximum(counts.sum(), 1)
    if how == "constant":
        return per_token.sum() / (mask.shape[0] * mask.shape[1])
    raise ConfigError(f"loss_aggregation={how!r}; expected one of {list(LOSS_AGGREGATIONS)}.")


def reward_to_go(per_token: jax.Array) -> jax.Array:
    """[B, L, K] -> [B, L]: sum over steps l' >= l and all codebooks (the K codes of one step
    are drawn independently given the prefix, so each may be weighted by all of them)."""
    per_step = per_token.sum(-1)
    return jnp.flip(jnp.cumsum(jnp.flip(per_step, -1), -1), -1)


def rl_loss(cfg: RLConfig, token_lp, old_token_lp, ref_token_lp, entropy, mask, rewards, beta,
            keep=None):
    """The surrogate loss of one update (module docstring) and its parts.

    token_lp [B, L, K] (differentiated), old_token_lp (the sampling policy's, constant),
    ref_token_lp, entropy, mask broadcastable to [B, L, K], rewards [B] (raw), beta scalar.
    keep [B] bool (RLConfig.nonfinite='drop'; None: all): the other samples weigh nothing and
    enter no baseline or normalisation, whatever NaN/Inf their rewards and log-probs hold.
    Returns (loss, aux)."""
    group = cfg.samples_per_caption
    mask = jnp.broadcast_to(mask, token_lp.shape)
    old_token_lp = jax.lax.stop_gradient(old_token_lp)
    if keep is not None:
        mask = mask & keep[:, None, None]
        # Replaced, not masked afterwards: NaN * 0 is NaN, and a masked branch's Inf still
        # turns its zero cotangent into NaN. The sampling policy's log-probs give log-ratio 0.
        ref_token_lp = jnp.where(mask, ref_token_lp, old_token_lp)
        rewards = jnp.where(keep, rewards, 0.0)
    old_kl = kl_per_token(old_token_lp, ref_token_lp, mask, cfg.kl_estimator)
    scale = 1.0
    shaped = rewards.astype(jnp.float32)
    if cfg.kl_mode == "reward":
        shaped = shaped - beta * old_kl.reshape(len(shaped), -1).sum(-1)
    if cfg.reward_normalization == "batch_whiten":
        if keep is None:
            scale = jax.lax.stop_gradient(1.0 / (shaped.std() + 1e-6))
            shaped = (shaped - shaped.mean()) * scale
        else:
            mean, std = masked_mean_std(shaped, keep)
            scale = jax.lax.stop_gradient(1.0 / (std + 1e-6))
            shaped = jnp.where(keep, (shaped - mean) * scale, 0.0)
    adv = advantages(shaped, group, cfg.baseline, valid=keep)
    token_adv = jnp.broadcast_to(adv[:, None, None], token_lp.shape)
    if cfg.kl_mode == "loss":
        kl_to_go = reward_to_go(old_kl)  # [B, L]
        kl_adv = jax.vmap(lambda g: advantages(g, group, cfg.baseline, valid=keep), in_axes=1,
                          out_axes=1)(kl_to_go)
        token_adv = token_adv - beta * kl_adv[..., None]
    objective = clipped_token_objective(token_lp, old_token_lp, token_adv, cfg.ratio_clip)
    pg = -aggregate(objective, mask, cfg.loss_aggregation)
    kl_loss = jnp.zeros(())
    if cfg.kl_estimator == "k3":
        # The pathwise part (k3 depends on pi); k1's has expectation zero, so it is left out.
        kl_loss = aggregate(kl_per_token(token_lp, ref_token_lp, mask, "k3"), mask,
                            cfg.loss_aggregation)
        if cfg.kl_mode == "reward":
            kl_loss = kl_loss * scale
    num_valid = jnp.maximum(mask.sum(), 1)
    loss = pg + beta * kl_loss
    if cfg.entropy_bonus:  # else no entropy gradient: a pass fewer over the logits' size
        loss = loss - cfg.entropy_bonus * jnp.where(mask, entropy, 0.0).sum() / num_valid
    ratio = jnp.exp(jax.lax.stop_gradient(token_lp) - old_token_lp)
    outside = (jnp.abs(ratio - 1.0) > cfg.ratio_clip) if cfg.ratio_clip > 0 else ratio < 0
    if keep is None:
        advantage_std, shaped_mean = adv.std(), shaped.mean()
    else:
        shaped_mean, _ = masked_mean_std(shaped, keep)
        advantage_std = masked_mean_std(adv, keep)[1]
    return loss, {"pg_loss": pg, "kl_loss": kl_loss, "loss": loss, "advantage_std": advantage_std,
                  "shaped_reward_mean": shaped_mean,
                  # Tokens whose ratio left [1 - clip, 1 + clip] (0 on the first update).
                  "clip_fraction": jnp.where(mask, outside, False).sum() / num_valid}


def adapt_beta(beta, kl, target_kl: float, rate: float):
    """Proportional controller: beta *= 1 + rate * clip(kl / target - 1, -0.2, 0.2)."""
    if target_kl <= 0:
        return beta
    error = jnp.clip(kl / target_kl - 1.0, -0.2, 0.2)
    return beta * (1.0 + rate * error)


def policy_token_stats(lm_config: music_lm.MusicLMConfig, params, caption_tokens, codes):
    """One teacher-forced forward pass: (token log-probs [B, L, K] (0 off the delay mask),
    per-token entropy [B, L, K] (0 off the mask), mask [1, L, K])."""
    token_lp, mask, entropy = music_lm.token_logprobs(lm_config, params, caption_tokens, codes,
                                                      with_entropy=True)
    return token_lp, entropy, mask


# --- the step ------------------------------------------------------------------------------

def _stats(prefix, x, keep=None):
    if keep is None:
        return {f"{prefix}_mean": x.mean(), f"{prefix}_min": x.min(), f"{prefix}_max": x.max()}
    # Over the kept samples (0 if none is): the dropped ones may be NaN/Inf.
    any_kept = keep.any()
    return {f"{prefix}_mean": masked_mean_std(x, keep)[0],
            f"{prefix}_min": jnp.where(any_kept, jnp.where(keep, x, jnp.inf).min(), 0.0),
            f"{prefix}_max": jnp.where(any_kept, jnp.where(keep, x, -jnp.inf).max(), 0.0)}


def _overflowed(log_ratio, mask):
    """Whether exp(log_ratio) is NaN/Inf at some position of `mask`."""
    bad = ~jnp.isfinite(log_ratio) | (log_ratio > _LOG_FLOAT32_MAX)
    return (bad & jnp.broadcast_to(mask, bad.shape)).any()


def current_policy(trainable, reference_params, lora: lora_lib.LoRAConfig | None = None):
    """The policy's LM params from what RL trains: the params themselves, or, with LoRA, the
    frozen reference (the base) merged with the adapters."""
    if lora is None:
        return trainable
    return lora_lib.merge(lora, reference_params, trainable)


def make_rl_step(lm_config: music_lm.MusicLMConfig, tx: optax.GradientTransformation,
                 reward_fn: Callable, rl_config: RLConfig,
                 lora: lora_lib.LoRAConfig | None = None) -> Callable:
    """Returns pure rl_step(state, reference_params, reward_params, caption_tokens, rng)
    -> (state, metrics). reward_fn(reward_params, caption_tokens, audio_codes) -> (total [B],
    {name: raw [B]}) like `RewardCombination.reward_fn`. With `lora`, state.params are the
    adapters over the frozen reference (`models/lora.py`)."""
    cfg = rl_config
    group = cfg.samples_per_caption
    drop = cfg.nonfinite == "drop"
    tx = freeze(tx, lm_config)  # a frozen text encoder never moves (a no-op otherwise)

    def rl_step(state: RLState, reference_params, reward_params, caption_tokens, rng):
        captions = jnp.repeat(caption_tokens, group, axis=0)  # [c0]*group, [c1]*group, ...
        batch = captions.shape[0]
        reference_params = jax.lax.stop_gradient(reference_params)
        current = current_policy(state.params, reference_params, lora)
        rngs = decoding.example_rngs(jax.random.fold_in(rng, 0), batch)
        codes = decoding.sample(lm_config, current, captions, rngs,
                                num_frames=cfg.num_frames, sampling=cfg.sampling)["codes"]
        codes = jax.lax.stop_gradient(codes)
        reward_params = jax.lax.stop_gradient(reward_params)

        total, components = reward_fn(reward_params, captions, codes)
        total = total.astype(jnp.float32)
        ref_lp, _, mask = policy_token_stats(lm_config, reference_params, captions, codes)
        beta = state.beta

        def loss_fn(params, old_lp, keep):
            token_lp, entropy, _ = policy_token_stats(
                lm_config, current_policy(params, reference_params, lora), captions, codes)
            faults = None
            if old_lp is None:
                # The first update's params are the sampling policy's (on-policy): its forward
                # gives the old log-probs, so no separate no-grad pass computes them again.
                old_lp = jax.lax.stop_gradient(token_lp)
                faults = nonfinite_by_component(components, total, old_lp, ref_lp, mask)
                if drop:
                    keep = ~functools.reduce(jnp.logical_or, faults.values())
            loss, aux = rl_loss(cfg, token_lp, old_lp, ref_lp, entropy, mask, total, beta, keep)
            return loss, (aux, faults, keep, jax.lax.stop_gradient(token_lp),
                          jax.lax.stop_gradient(entropy))

        def update(params, opt_state, old_lp, keep):
            (_, (aux, faults, keep, token_lp, entropy)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(params, old_lp, keep)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            grad_norm = optax.tree.norm(grads)
            broken = ~(jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm))
            return (params, opt_state, {**aux, "grad_norm": grad_norm}, broken, faults, keep,
                    token_lp, entropy)

        params, opt_state, first, broken, faults, keep, old_lp, old_entropy = update(
            state.params, state.opt_state, None, None)
        # Per step: samples with a NaN/Inf reward or log-ratio, by component (the loop names
        # them), and updates whose loss or gradient norm is NaN/Inf.
        counts = {f"nonfinite/{name}": flags.sum(dtype=jnp.int32)
                  for name, flags in faults.items()}
        faulty_samples = ~keep if drop else functools.reduce(jnp.logical_or, faults.values())
        counts["nonfinite_samples"] = faulty_samples.sum(dtype=jnp.int32)
        counts["nonfinite/update"] = broken.astype(jnp.int32)
        token_mask = jnp.broadcast_to(mask, old_lp.shape)
        if drop:
            token_mask = token_mask & keep[:, None, None]
        if cfg.updates_per_batch > 1:
            def later_update(carry, _):
                params, opt_state, aux, broken, _, _, token_lp, _ = update(*carry, old_lp, keep)
                ratio_overflowed = _overflowed(token_lp - old_lp, token_mask)
                return (params, opt_state), (aux, broken, ratio_overflowed)

            (params, opt_state), (later, later_broken, ratio_overflowed) = jax.lax.scan(
                later_update, (params, opt_state), None, length=cfg.updates_per_batch - 1)
            first.update({f"{k}_last": v[-1] for k, v in later.items()})
            counts["nonfinite/update"] += later_broken.sum(dtype=jnp.int32)
            counts["nonfinite/importance_ratio"] = ratio_overflowed.sum(dtype=jnp.int32)
        kl_seq = kl_per_sequence(old_lp, ref_lp, mask, "k1")
        kl_k3_seq = kl_per_sequence(old_lp, ref_lp, mask, "k3")
        sample_logprob = old_lp.sum(axis=(1, 2))
        if drop:
            def mean(x):
                return masked_mean_std(x, keep)[0]
            entropy = jnp.where(token_mask, old_entropy, 0.0).sum()
        else:
            def mean(x):
                return x.mean()
            entropy = old_entropy.sum()
        kl_mean = mean(kl_seq)
        new_beta = adapt_beta(beta, kl_mean, cfg.target_kl, cfg.adaptive_kl_rate)

        num_valid = jnp.maximum(token_mask.sum(), 1)
        metrics = {**_stats("reward", total, keep), **_stats("kl", kl_seq, keep),
                   "kl": kl_mean, "kl_k3": mean(kl_k3_seq), "entropy": entropy / num_valid,
                   "beta": beta, "sample_logprob": mean(sample_logprob)}
        for name, raw in components.items():
            metrics.update(_stats(f"reward/{name}", raw.astype(jnp.float32), keep))
        # First update's loss/grad norm (on-policy), last update's for updates_per_batch > 1.
        metrics.update(first)
        metrics.update(counts)
        new_state = RLState(step=state.step + 1, params=params, opt_state=opt_state,
                            beta=new_beta)
        # A step at fault keeps the state it started from, so the loop never holds (nor saves)
        # NaN/Inf params; it raises when it reads the counts. Exact when all is finite.
        applied = counts["nonfinite/update"] == 0
        if not drop:
            applied &= counts["nonfinite_samples"] == 0
        if cfg.updates_per_batch > 1:
            applied &= counts["nonfinite/importance_ratio"] == 0
        new_state = jax.tree.map(lambda new, old: jnp.where(applied, new, old), new_state, state)
        return new_state, metrics

    return rl_step


# --- state, shardings, jit -----------------------------------------------------------------

def lm_param_shardings(lm_config: music_lm.MusicLMConfig, mesh, rules=None):
    """NamedShardings of the LM's params under the logical axis rules (boxed abstract init)."""
    boxed = jax.eval_shape(functools.partial(music_lm.init_params, lm_config),
                           jax.random.PRNGKey(0))
    return partitioning.tree_shardings(boxed, mesh, rules)


def abstract_rl_state(lm_config: music_lm.MusicLMConfig, tx, mesh, rl_config: RLConfig,
                      rules=None, lora: lora_lib.LoRAConfig | None = None, seed: int = 0):
    """(abstract RLState with shardings, its shardings) without allocating: the layout
    `create_rl_state` builds (and a checkpoint restores into, or a compiler analyses)."""
    lora = lora_lib.for_model(lora, lm_config)

    def init(rng):
        return _initial_state(music_lm.init_params(lm_config, rng), tx, rl_config, lora, seed)

    return partitioning.abstract_with_shardings(init, mesh, jax.random.PRNGKey(0), rules=rules)


def _initial_state(params, tx, rl_config: RLConfig, lora, seed: int) -> RLState:
    """The RLState at step 0: a copy of `params` or, with LoRA, fresh adapters over them."""
    if lora is None:
        # Copy so the policy never aliases the caller's arrays (jit forwards unchanged inputs,
        # and a donated RL step would otherwise delete the frozen reference's buffers).
        trainable = jax.tree.map(jnp.copy, params)
    else:
        trainable = lora_lib.init(lora, partitioning.unbox(params),
                                  jax.random.fold_in(jax.random.PRNGKey(seed), 1))
    return RLState(step=jnp.zeros((), jnp.int32), params=trainable,
                   opt_state=tx.init(trainable), beta=jnp.asarray(rl_config.beta, jnp.float32))


def create_rl_state(lm_config: music_lm.MusicLMConfig, tx, params, mesh, rl_config: RLConfig,
                    rules=None, lora: lora_lib.LoRAConfig | None = None, seed: int = 0):
    """RLState initialised from (pretrained, unboxed) `params`, sharded on `mesh` by the logical
    rules like `trainer.create_train_state`; returns (state, state_shardings, param_shardings).
    The policy starts at `params`; keep the same `params` as the frozen reference. With `lora`
    the state holds fresh adapters (replicated: they are small) instead of a copy of `params`."""
    lora = lora_lib.for_model(lora, lm_config)  # the adapters abstract_rl_state lays out
    _, state_shardings = abstract_rl_state(lm_config, tx, mesh, rl_config, rules, lora, seed)
    param_shardings = lm_param_shardings(lm_config, mesh, rules)
    params = jax.device_put(params, param_shardings)

    def build(p):
        return _initial_state(p, tx, rl_config, lora, seed)

    with partitioning.mesh_context(mesh, rules):
        state = jax.jit(build, in_shardings=(param_shardings,),
                        out_shardings=state_shardings)(params)
    return state, state_shardings, param_shardings


def existing_shardings(tree, mesh):
    """Each jax.Array leaf's own sharding (if it lives on `mesh`), else replicated on `mesh`."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return sharding
        return replicated

    return jax.tree.map(leaf, tree)


def jit_rl_step(rl_step, state_shardings, param_shardings, mesh, reward_shardings=None,
                donate_state: bool = True):
    """jax.jit of `rl_step` with explicit shardings: state and reference params by the logical
    rules, reward params by `reward_shardings` (a pytree, or None = replicated), captions over
    the batch axes, the rng and the metrics replicated. Call it (and build it) under
    `partitioning.mesh_context(mesh)`."""
    replicated = NamedSharding(mesh, PartitionSpec())
    reward_shardings = replicated if reward_shardings is None else reward_shardings
    return jax.jit(
        rl_step,
        in_shardings=(state_shardings, param_shardings, reward_shardings,
                      partitioning.batch_sharding(mesh, 2), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate_state else ())


def metrics_to_host(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def nonfinite_counts(metrics) -> dict[str, jax.Array]:
    """The step's NaN/Inf counts among its metrics (still on device)."""
    return {k: v for k, v in metrics.items() if k.startswith("nonfinite")}


def raise_on_nonfinite(unread: list[tuple[int, dict]], rl_config: RLConfig, batch: int,
                       latest_checkpoint: int | None):
    """Reads the NaN/Inf counts of the steps run since the last read, [(step, counts)], in one
    transfer, and empties `unread`. The first step at fault raises TrainingDivergedError
    naming it and its components (with nonfinite='drop', dropped samples are only logged).
    Called before anything reads that state: a log, an evaluation, a checkpoint."""
    if not unread:
        return
    steps = [step for step, _ in unread]
    counts = [{k: int(v) for k, v in c.items()} for c in jax.device_get([c for _, c in unread])]
    unread.clear()
    drop = rl_config.nonfinite == "drop"
    for step, count in zip(steps, counts):
        samples = []  # what made samples unusable, by component
        for key, n in count.items():
            if n and key.startswith("nonfinite/reward/"):
                samples.append(f"reward {key.removeprefix('nonfinite/reward/')!r} returned "
                               f"NaN/Inf for {n} of {batch} samples")
        if count["nonfinite/reward"] and not samples:
            samples.append(f"the combined reward was NaN/Inf (its components finite) for "
                           f"{count['nonfinite/reward']} of {batch} samples")
        if count["nonfinite/log_ratio"]:
            samples.append(f"the policy/reference log-ratio overflowed (NaN/Inf, or beyond "
                           f"exp's float32 range) for {count['nonfinite/log_ratio']} of {batch} "
                           "samples")
        updates = []
        if count.get("nonfinite/importance_ratio"):
            updates.append(f"the importance ratio pi/pi_old overflowed in "
                           f"{count['nonfinite/importance_ratio']} of the "
                           f"{rl_config.updates_per_batch - 1} later updates")
        if count["nonfinite/update"]:
            updates.append(f"the loss or gradient norm was NaN/Inf in "
                           f"{count['nonfinite/update']} of {rl_config.updates_per_batch} "
                           "updates")
        if drop and samples:
            logging.warning("RL step %d: dropped %d of %d samples: %s.", step,
                            count["nonfinite_samples"], batch, "; ".join(samples))
        # With 'stop', faulty samples make the loss NaN too: name the cause only.
        faults = updates if drop else samples or updates
        if not faults:
            continue
        fixes = []
        if not drop and samples:
            fixes.append("check the reward model or policy named (its checkpoint and inputs), "
                         "or set RLConfig.nonfinite = 'drop' to leave such samples out of the "
                         "update and count them (metric nonfinite_samples)")
        if (updates and faults is updates) or count["nonfinite/log_ratio"]:
            fixes.append("if the policy diverged, lower make_optimizer.learning_rate or "
                         "clip_norm, or raise RLConfig.beta")
        saved = (f"the latest checkpoint, step {latest_checkpoint}, is the last good state"
                 if latest_checkpoint is not None else "no checkpoint was written yet")
        raise TrainingDivergedError(
            f"RL step {step}: {'; '.join(faults)}. Its update was not applied and nothing "
            f"from step {step} on was saved: {saved}. Fix: {'; '.join(fixes)}; then rerun "
            "(it resumes from the latest checkpoint).")


def make_rl_eval(lm_config: music_lm.MusicLMConfig, reward_fn: Callable,
                 rl_config: RLConfig, lora: lora_lib.LoRAConfig | None = None) -> Callable:
    """Returns pure rl_eval(trainable, reference_params, reward_params, caption_tokens, rng) ->
    (metrics, codes): one clip per caption from the policy, its reward components and its KL to
    the reference. Called with the same rng at every evaluation, so the numbers move only
    because the policy does (common random numbers)."""
    cfg = rl_config

    def rl_eval(trainable, reference_params, reward_params, caption_tokens, rng):
        params = current_policy(trainable, reference_params, lora)
        rngs = decoding.example_rngs(rng, caption_tokens.shape[0])
        codes = decoding.sample(lm_config, params, caption_tokens, rngs,
                                num_frames=cfg.num_frames, sampling=cfg.sampling)["codes"]
        total, components = reward_fn(reward_params, caption_tokens, codes)
        ref_lp, _, mask = policy_token_stats(lm_config, reference_params, caption_tokens, codes)
        token_lp, entropy, _ = policy_token_stats(lm_config, params, caption_tokens, codes)
        num_valid = jnp.maximum(jnp.broadcast_to(mask, token_lp.shape).sum(), 1)
        metrics = {"reward": total.astype(jnp.float32).mean(),
                   "kl": kl_per_sequence(token_lp, ref_lp, mask, "k1").mean(),
                   "kl_k3": kl_per_sequence(token_lp, ref_lp, mask, "k3").mean(),
                   "entropy": entropy.sum() / num_valid}
        metrics.update({f"reward/{name}": raw.astype(jnp.float32).mean()
                        for name, raw in components.items()})
        return metrics, codes

    return rl_eval


class AudioLog:
    """Decodes sampled codes to WAV files under `out_dir/step_<N>/` and to TensorBoard."""

    def __init__(self, tokenizer_dir: str, out_dir: str, writer, count: int = 4):
        from musicrl_jax.audio.tokenizer import load_tokenizer
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.out_dir, self.writer, self.count = out_dir, writer, count

    def __call__(self, step: int, codes) -> list[str]:
        from musicrl_jax.audio import listen
        clips = listen.decode_clips(self.tokenizer, np.asarray(codes)[:self.count])
        rate = self.tokenizer.sample_rate
        self.writer.write_audios(step, {"samples": clips[..., None]}, sample_rate=rate)
        return listen.write_wavs(clips, rate, os.path.join(self.out_dir, f"step_{step:06d}"),
                                 prefix="sample")


@gin.configurable
def train_rl(lm_config=gin.REQUIRED, policy_params=gin.REQUIRED, reward_fn=gin.REQUIRED,
             reward_params=gin.REQUIRED, caption_source=gin.REQUIRED, workdir: str = gin.REQUIRED,
             *, reference_params=None, rl_config: RLConfig | None = None, tx=None,
             optimizer: Callable = make_optimizer,
             num_steps: int = 100, captions_per_step: int = 8, log_every: int = 10,
             eval_source=None, eval_every: int = 50, num_eval_captions: int = 16,
             tokenizer_dir: str | None = None, audio_every: int = 0, num_audio_samples: int = 4,
             checkpoint_every: int = 50, keep_checkpoints: int = 3, seed: int = 0,
             lora: lora_lib.LoRAConfig | None = None, checkpoint_meta: dict | None = None,
             show_progress: bool = True, mesh=None) -> dict[str, Any]:
    """RL fine-tuning loop: `num_steps` rl_steps on `captions_per_step` captions each (from
    `caption_source.train_batch(step, n)["caption_tokens"]`), resuming from
    `workdir/checkpoints` (a resumed run takes exactly the steps an uninterrupted one would:
    captions and rngs are functions of the step). The policy starts at `policy_params`; the
    frozen reference is `reference_params` (default: `policy_params`). The optimizer is `tx`,
    else `optimizer(total_steps=num_steps * updates_per_batch)[0]` (gin:
    `train_rl.optimizer = @rl/make_optimizer` sets RL's learning rate apart from pretraining's).

    Logged to `workdir/metrics.jsonl` and TensorBoard: every `log_every` steps the step's
    metrics (reward components mean/min/max, KL, entropy, losses, grad norm) with samples/s and
    tokens/s; every `eval_every` steps (and at step 0) the policy on the first
    `num_eval_captions` held-out captions of `eval_source`; every `audio_every` steps
    `num_audio_samples` of those clips as WAV (`workdir/samples/`) and TensorBoard audio
    (needs `tokenizer_dir`). SIGTERM saves a checkpoint and stops. A NaN/Inf reward,
    log-ratio, loss or gradient raises TrainingDivergedError naming the step and the component
    before any checkpoint of it is written (`RLConfig.nonfinite`, module docstring).
    `lora` (gin: `train_rl.lora = @LoRAConfig()`) trains adapters over the frozen reference
    instead of a full copy; the policy must then start at the reference. `checkpoint_meta` is
    stored with each checkpoint (rl_finetune records the reference checkpoint there, which a
    LoRA checkpoint needs to be restored as a policy).
    Returns {'step', 'train': last metrics, 'eval': {step: eval metrics}, 'state',
    'policy_params': the policy's LM params (merged with LoRA)}."""

    rl_config = rl_config or RLConfig()
    mesh = partitioning.make_mesh() if mesh is None else mesh
    partitioning.check_batch_size(captions_per_step, mesh, "train_rl.captions_per_step")
    # The optimizer steps updates_per_batch times per RL step; its schedule must span them all.
    tx = optimizer(total_steps=num_steps * rl_config.updates_per_batch)[0] if tx is None else tx
    if audio_every and not tokenizer_dir:
        raise ConfigError("train_rl.audio_every > 0 needs train_rl.tokenizer_dir (the audio "
                          "tokenizer that decodes the policy's codes). Fix: set it, or set "
                          "audio_every = 0.")
    os.makedirs(workdir, exist_ok=True)
    rules = partitioning.logical_axis_rules()
    if lora is not None and reference_params is not None and (
            reference_params is not policy_params):
        raise ConfigError("train_rl.lora: LoRA trains adapters over the frozen KL reference, "
                          "so the policy must start at the reference (e.g. MusicRL-RU, which "
                          "starts at MusicRL-R's policy, is not supported with LoRA). Fix: "
                          "drop train_rl.lora, or start from the reference checkpoint.")
    reference_params = policy_params if reference_params is None else reference_params
    # Resolved once, so the checkpoint's meta records the adapters it holds.
    lora = lora_lib.for_model(lora, lm_config)
    with partitioning.mesh_context(mesh, rules):
        state, state_shardings, param_shardings = create_rl_state(
            lm_config, tx, policy_params, mesh, rl_config, rules, lora=lora, seed=seed)
        reference = jax.device_put(reference_params, param_shardings)
        reward_shardings = existing_shardings(reward_params, mesh)
        reward_params = jax.device_put(reward_params, reward_shardings)
        step_fn = jit_rl_step(make_rl_step(lm_config, tx, reward_fn, rl_config, lora),
                              state_shardings, param_shardings, mesh, reward_shardings)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=checkpoint_every,
                                keep=keep_checkpoints, kind="music_rl")
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_like(state, state_shardings))
    start = int(state.step)
    model_meta = {"model_config": dataclasses.asdict(lm_config),  # export reads it
                  **({"lora": dataclasses.asdict(lora)} if lora else {}),
                  **(checkpoint_meta or {})}

    eval_fn = eval_captions = None
    if eval_source is not None and eval_every:
        eval_captions = np.asarray(eval_source.arrays["caption_tokens"][:num_eval_captions],
                                   np.int32)
        partitioning.check_batch_size(len(eval_captions), mesh, "train_rl.num_eval_captions")
        replicated = NamedSharding(mesh, PartitionSpec())
        with partitioning.mesh_context(mesh, rules):
            eval_fn = jax.jit(make_rl_eval(lm_config, reward_fn, rl_config, lora),
                              in_shardings=(state_shardings.params, param_shardings,
                                            reward_shardings,
                                            partitioning.batch_sharding(mesh, 2), replicated),
                              out_shardings=replicated)

    log = RunLog(workdir, total=num_steps, initial=start, desc="RL fine-tuning",
                 show_progress=show_progress)
    audio_log = (AudioLog(tokenizer_dir, os.path.join(workdir, "samples"), log.writer,
                          num_audio_samples) if audio_every and log.is_main else None)
    samples_per_step = captions_per_step * rl_config.samples_per_caption
    tokens_per_sample = rl_config.num_frames * lm_config.num_codebooks
    local = partitioning.host_local_batch_size(captions_per_step)
    last: dict[str, float] = {}
    evals: dict[int, dict[str, float]] = {}
    preempted_at = None
    unread_faults: list[tuple[int, dict]] = []  # (step, its NaN/Inf counts, on device)

    def check_faults():
        raise_on_nonfinite(unread_faults, rl_config, samples_per_step,
                           checkpointer.latest_step())

    def run_eval(done):
        with partitioning.mesh_context(mesh, rules):
            # Every host holds all eval captions; each passes its share.
            captions = partitioning.shard_batch({"c": partitioning.host_rows(eval_captions)},
                                                mesh)["c"]
            metrics, codes = eval_fn(state.params, reference, reward_params, captions,
                                     jax.random.PRNGKey(seed + 1))
        metrics = metrics_to_host(metrics)
        check_finite(metrics, done, "RL evaluation")
        evals[done] = metrics
        log.record(done, metrics, "eval")
        log.say(f"[rl] step {done}: held-out ", metrics)
        if audio_log and (done % audio_every == 0 or done == num_steps):
            audio_log(done, jax.device_get(codes))

    try:
        with partitioning.mesh_context(mesh, rules), PreemptionFlag() as preemption:
            if eval_fn and start == 0:
                run_eval(0)
            log.restart_clock(start)
            for step in range(start, num_steps):
                captions = caption_source.train_batch(step, local)["caption_tokens"]
                captions = partitioning.shard_batch(
                    {"c": np.asarray(captions, np.int32)}, mesh)["c"]
                rng = jax.random.fold_in(jax.random.PRNGKey(seed), step)
                state, metrics = step_fn(state, reference, reward_params, captions, rng)
                done = step + 1
                # Read with the metrics, or before a save: no sync of its own.
                unread_faults.append((done, nonfinite_counts(metrics)))
                logging_step = done % log_every == 0 or done == num_steps or done == start + 1
                evaluating = eval_fn and (done % eval_every == 0 or done == num_steps)
                if logging_step or evaluating:
                    check_faults()
                if logging_step:
                    last = metrics_to_host(metrics)
                    check_finite(last, done, "RL fine-tuning")
                    last["samples_per_sec"] = samples_per_step * log.steps_per_sec(done)
                    last["tokens_per_sec"] = last["samples_per_sec"] * tokens_per_sample
                    log.record(done, last)
                    log.progress.set_postfix(reward=f"{last['reward_mean']:.3f}",
                                         kl=f"{last['kl']:.2f}")
                if done == start + 1:
                    write_operative_config(workdir)
                if evaluating:
                    run_eval(done)
                    log.restart_clock(done)
                # Read once: a SIGTERM arriving during the save must not stop an unsaved step.
                stop = preemption.requested
                force = done == num_steps or stop
                if checkpointer.will_save(done, force):
                    check_faults()  # never a checkpoint of a step at fault, nor of later ones
                checkpointer.save(done, state, meta=model_meta, force=force)
                log.progress.update(1)
                if stop:
                    logging.warning("SIGTERM: saved RL step %d, stopping.", done)
                    preempted_at = done
                    break
    finally:
        log.close()
        checkpointer.close()
    if preempted_at is not None:
        raise Preempted(f"{workdir}: SIGTERM; saved RL step {preempted_at} of {num_steps}. "
                        "Rerun the same command to resume.")
    policy = state.params
    if lora is not None:
        with partitioning.mesh_context(mesh, rules):
            policy = jax.jit(functools.partial(current_policy, lora=lora),
                             out_shardings=param_shardings)(state.params, reference)
    return {"step": int(state.step), "train": last, "eval": evals, "state": state,
            "policy_params": policy}


__all__ = ["RLConfig", "RLState", "advantages", "kl_per_token", "kl_per_sequence",
           "policy_gradient_loss", "clipped_token_objective", "aggregate", "reward_to_go",
           "rl_loss", "adapt_beta", "current_policy", "policy_token_stats", "make_rl_step",
           "create_rl_state", "jit_rl_step", "train_rl", "lm_param_shardings", "existing_shardings",
           "whiten", "masked_mean_std", "nonfinite_by_component", "nonfinite_counts",
           "raise_on_nonfinite"]
