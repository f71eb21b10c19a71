"""RL fine-tuning of the music LM (MusicRL).

Maximises E_{y~pi(.|x)}[r(x, y)] - beta * KL(pi(.|x) || pi_ref(.|x)).

The pieces, all pure and jittable:

  advantages(rewards, group_size, baseline)           'none' | 'batch_mean' | 'rloo'
  kl_per_sequence(policy_lp, reference_lp, mask, est)  per-token k1 / k2 / k3, summed per sequence
  policy_gradient_loss(seq_logprobs, advantages)       -mean(stop_gradient(A) * log pi(y|x))
  make_rl_step(lm_config, tx, reward_fn, rl_config)    -> rl_step(state, reference_params,
                                                          reward_params, caption_tokens, rng)

One `rl_step`: every caption is repeated `samples_per_caption` times, clips are drawn with the
KV-cache sampler from the current policy (constants: no gradient flows through sampling), scored
by `reward_fn` (sequence-level reward), scored by the frozen reference LM (no gradient, no
optimizer state), and the KL-regularised REINFORCE objective takes `updates_per_batch` optax
steps on those samples. `jit_rl_step` jits it with explicit shardings on a mesh.

Estimators (r_t = log pi_ref(y_t) - log pi(y_t) at the sampled token y_t):
  k1 = -r_t            unbiased for KL(pi || pi_ref), can be negative per sample;
  k2 = r_t^2 / 2       biased, >= 0; its gradient through log pi is the score-function gradient
                       of KL(pi || pi_ref), so it is the estimator to use with kl_mode='loss';
  k3 = e^r_t - 1 - r_t unbiased and >= 0 (Schulman's estimator).
kl_mode='reward' (the paper's choice) subtracts beta * stop_gradient(KL_seq) from each sample's
reward before the baseline, so the KL is optimised by the same REINFORCE estimator (any
estimator works). kl_mode='loss' adds beta * mean(KL_seq) to the loss and differentiates it
directly (use k2; the pathwise gradient of k1 has expectation zero).

Reward normalisation: 'batch_whiten' rescales the (KL-shaped) rewards of the batch to zero mean
and unit std before the baseline, making the learning rate independent of the reward's units;
'none' (default) keeps the RewardCombination's already-normalised scale.

With updates_per_batch > 1, later updates are off-policy; they use the importance-weighted
surrogate -mean(A * exp(log pi - log pi_old)) (clipped PPO-style when ratio_clip > 0), whose
gradient at pi = pi_old equals the REINFORCE gradient, so updates_per_batch=1 is exactly
`policy_gradient_loss`.
"""

from __future__ import annotations

import dataclasses
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
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import music_lm
from musicrl_jax.training.trainer import (PreemptionFlag, RunLog, check_finite, make_optimizer,
                                          write_operative_config)

BASELINES = ("none", "batch_mean", "rloo")
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_MODES = ("reward", "loss")
NORMALIZATIONS = ("none", "batch_whiten")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RLConfig:
    samples_per_caption: int = 4
    baseline: str = "rloo"  # none | batch_mean | rloo (leave-one-out within a caption's group)
    reward_normalization: str = "none"  # none | batch_whiten (see module docstring)
    kl_mode: str = "reward"  # reward (paper) | loss
    kl_estimator: str = "k1"  # k1 | k2 | k3, per token, summed over the sequence
    beta: float = 0.1  # initial (and, without target_kl, fixed) KL coefficient
    target_kl: float = 0.0  # > 0: adapt beta toward this per-sequence KL
    adaptive_kl_rate: float = 0.1  # proportional gain of the beta controller
    entropy_bonus: float = 0.0  # coefficient on the mean per-token policy entropy
    updates_per_batch: int = 1
    ratio_clip: float = 0.0  # > 0: PPO clipping of the sequence ratio when updates_per_batch > 1
    num_frames: int = 8
    # The estimator is on-policy for temperature=1, top_k=0, guidance_weight=1 (the defaults);
    # other settings sample from a distribution other than the pi being differentiated.
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self):
        checks = [("baseline", self.baseline, BASELINES),
                  ("reward_normalization", self.reward_normalization, NORMALIZATIONS),
                  ("kl_mode", self.kl_mode, KL_MODES),
                  ("kl_estimator", self.kl_estimator, KL_ESTIMATORS)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"RLConfig.{name}={value!r}; expected one of {list(allowed)}.")
        if self.samples_per_caption < 1 or self.updates_per_batch < 1:
            raise ConfigError("RLConfig.samples_per_caption and updates_per_batch must be >= 1.")
        if self.baseline == "rloo" and self.samples_per_caption < 2:
            raise ConfigError("RLConfig.baseline='rloo' needs samples_per_caption >= 2 (the "
                              "baseline of a sample is the mean reward of the others of its "
                              "caption). Fix: raise samples_per_caption or use 'batch_mean'.")
        if self.beta < 0 or self.target_kl < 0:
            raise ConfigError("RLConfig.beta and target_kl must be >= 0.")


@flax.struct.dataclass
class RLState:
    step: jax.Array
    params: Any
    opt_state: Any
    beta: jax.Array  # current KL coefficient (adapted when target_kl > 0)


# --- estimators (pure functions of arrays) -------------------------------------------------

def advantages(rewards: jax.Array, group_size: int, baseline: str = "rloo") -> jax.Array:
    """rewards [B] laid out as consecutive groups of `group_size` samples of one caption.

    'none': A = r. 'batch_mean': A = r - mean(r). 'rloo': A_i = r_i - mean_{j != i in group} r_j
    = group_size / (group_size - 1) * (r_i - mean(group)), unbiased since the baseline does not
    depend on the sample it is subtracted from.
    """
    rewards = rewards.astype(jnp.float32)
    if baseline == "none":
        return rewards
    if baseline == "batch_mean":
        return rewards - rewards.mean()
    if baseline == "rloo":
        if group_size < 2:
            raise ConfigError("rloo baseline needs group_size >= 2.")
        groups = rewards.reshape(-1, group_size)
        loo = (groups.sum(-1, keepdims=True) - groups) / (group_size - 1)
        return (groups - loo).reshape(rewards.shape)
    raise ConfigError(f"baseline={baseline!r}; expected one of {list(BASELINES)}.")


def whiten(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return (x - x.mean()) / (x.std() + eps)


def kl_per_sequence(policy_token_logprobs, reference_token_logprobs, mask,
                    estimator: str = "k1") -> jax.Array:
    """Sum over [B, ...] positions where `mask` of a per-token KL(pi || pi_ref) estimate -> [B]."""
    log_ratio = (reference_token_logprobs - policy_token_logprobs).astype(jnp.float32)
    if estimator == "k1":
        per_token = -log_ratio
    elif estimator == "k2":
        per_token = 0.5 * jnp.square(log_ratio)
    elif estimator == "k3":
        per_token = jnp.expm1(log_ratio) - log_ratio
    else:
        raise ConfigError(f"kl_estimator={estimator!r}; expected one of {list(KL_ESTIMATORS)}.")
    mask = jnp.broadcast_to(mask, per_token.shape)
    per_token = jnp.where(mask, per_token, 0.0)
    return per_token.reshape(per_token.shape[0], -1).sum(-1)


def policy_gradient_loss(seq_logprobs: jax.Array, advantages: jax.Array) -> jax.Array:
    """REINFORCE surrogate: -mean(stop_gradient(A) * log pi(y|x))."""
    return -jnp.mean(jax.lax.stop_gradient(advantages) * seq_logprobs)


def importance_weighted_loss(seq_logprobs, old_seq_logprobs, advantages,
                             ratio_clip: float = 0.0) -> jax.Array:
    """-mean(A * pi/pi_old) (PPO-clipped when ratio_clip > 0); equals `policy_gradient_loss` in
    value-gradient at pi = pi_old."""
    adv = jax.lax.stop_gradient(advantages)
    ratio = jnp.exp(seq_logprobs - jax.lax.stop_gradient(old_seq_logprobs))
    objective = adv * ratio
    if ratio_clip > 0:
        objective = jnp.minimum(objective, adv * jnp.clip(ratio, 1 - ratio_clip, 1 + ratio_clip))
    return -jnp.mean(objective)


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

def _stats(prefix, x):
    return {f"{prefix}_mean": x.mean(), f"{prefix}_min": x.min(), f"{prefix}_max": x.max()}


def make_rl_step(lm_config: music_lm.MusicLMConfig, tx: optax.GradientTransformation,
                 reward_fn: Callable, rl_config: RLConfig) -> Callable:
    """Returns pure rl_step(state, reference_params, reward_params, caption_tokens, rng)
    -> (state, metrics). reward_fn(reward_params, caption_tokens, audio_codes) -> (total [B],
    {name: raw [B]}) like `RewardCombination.reward_fn`."""
    cfg = rl_config
    group = cfg.samples_per_caption

    def rl_step(state: RLState, reference_params, reward_params, caption_tokens, rng):
        captions = jnp.repeat(caption_tokens, group, axis=0)  # [c0]*group, [c1]*group, ...
        batch = captions.shape[0]
        rngs = decoding.example_rngs(jax.random.fold_in(rng, 0), batch)
        codes = decoding.sample(lm_config, state.params, captions, rngs,
                                num_frames=cfg.num_frames, sampling=cfg.sampling)["codes"]
        codes = jax.lax.stop_gradient(codes)
        reward_params = jax.lax.stop_gradient(reward_params)
        reference_params = jax.lax.stop_gradient(reference_params)

        total, components = reward_fn(reward_params, captions, codes)
        total = total.astype(jnp.float32)
        ref_lp, _, mask = policy_token_stats(lm_config, reference_params, captions, codes)
        old_lp, old_entropy, _ = policy_token_stats(lm_config, state.params, captions, codes)
        old_lp = jax.lax.stop_gradient(old_lp)
        old_seq = old_lp.sum(axis=(1, 2))
        kl_seq = kl_per_sequence(old_lp, ref_lp, mask, cfg.kl_estimator)
        beta = state.beta

        shaped = total - beta * kl_seq if cfg.kl_mode == "reward" else total
        if cfg.reward_normalization == "batch_whiten":
            shaped = whiten(shaped)
        adv = advantages(shaped, group, cfg.baseline)
        num_valid = jnp.maximum(jnp.broadcast_to(mask, old_lp.shape).sum(), 1)

        def loss_fn(params):
            token_lp, entropy, _ = policy_token_stats(lm_config, params, captions, codes)
            seq = token_lp.sum(axis=(1, 2))
            if cfg.updates_per_batch == 1:
                pg = policy_gradient_loss(seq, adv)
            else:
                pg = importance_weighted_loss(seq, old_seq, adv, cfg.ratio_clip)
            mean_entropy = entropy.sum() / num_valid
            loss = pg - cfg.entropy_bonus * mean_entropy
            kl_loss = jnp.zeros(())
            if cfg.kl_mode == "loss":
                kl_loss = kl_per_sequence(token_lp, ref_lp, mask, cfg.kl_estimator).mean()
                loss = loss + beta * kl_loss
            return loss, {"pg_loss": pg, "kl_loss": kl_loss, "loss": loss}

        def update(carry, _):
            params, opt_state = carry
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), {**aux, "grad_norm": optax.tree.norm(grads)}

        (params, opt_state), per_update = jax.lax.scan(
            update, (state.params, state.opt_state), None, length=cfg.updates_per_batch)
        kl_mean = kl_seq.mean()
        new_beta = adapt_beta(beta, kl_mean, cfg.target_kl, cfg.adaptive_kl_rate)

        metrics = {**_stats("reward", total), **_stats("kl", kl_seq),
                   "kl": kl_mean, "kl_k3": kl_per_sequence(old_lp, ref_lp, mask, "k3").mean(),
                   "entropy": old_entropy.sum() / num_valid, "beta": beta,
                   "advantage_std": adv.std(), "shaped_reward_mean": shaped.mean(),
                   "sample_logprob": old_seq.mean()}
        for name, raw in components.items():
            metrics.update(_stats(f"reward/{name}", raw.astype(jnp.float32)))
        # First update's loss/grad norm (on-policy), last update's for updates_per_batch > 1.
        metrics.update({k: v[0] for k, v in per_update.items()})
        if cfg.updates_per_batch > 1:
            metrics.update({f"{k}_last": v[-1] for k, v in per_update.items()})
        new_state = RLState(step=state.step + 1, params=params, opt_state=opt_state,
                            beta=new_beta)
        return new_state, metrics

    return rl_step


# --- state, shardings, jit -----------------------------------------------------------------

def lm_param_shardings(lm_config: music_lm.MusicLMConfig, mesh, rules=None):
    """NamedShardings of the LM's params under the logical axis rules (boxed abstract init)."""
    boxed = jax.eval_shape(music_lm.init_params, lm_config, jax.random.PRNGKey(0))
    return partitioning.tree_shardings(boxed, mesh, rules)


def create_rl_state(lm_config: music_lm.MusicLMConfig, tx, params, mesh, rl_config: RLConfig,
                    rules=None):
    """RLState initialised from (pretrained, unboxed) `params`, sharded on `mesh` by the logical
    rules like `trainer.create_train_state`; returns (state, state_shardings, param_shardings).
    The policy starts at `params`; keep the same `params` as the frozen reference."""
    def init(rng):
        boxed = music_lm.init_params(lm_config, rng)
        return RLState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=tx.init(boxed),
                       beta=jnp.asarray(rl_config.beta, jnp.float32))

    _, state_shardings = partitioning.abstract_with_shardings(init, mesh, jax.random.PRNGKey(0),
                                                              rules=rules)
    param_shardings = state_shardings.params
    params = jax.device_put(params, param_shardings)

    def build(p):
        # Copy so the policy never aliases the caller's arrays (jit forwards unchanged inputs,
        # and a donated RL step would otherwise delete the frozen reference's buffers).
        p = jax.tree.map(jnp.copy, p)
        return RLState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                       beta=jnp.asarray(rl_config.beta, jnp.float32))

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


def make_rl_eval(lm_config: music_lm.MusicLMConfig, reward_fn: Callable,
                 rl_config: RLConfig) -> Callable:
    """Returns pure rl_eval(params, reference_params, reward_params, caption_tokens, rng) ->
    (metrics, codes): one clip per caption from the policy, its reward components and its KL to
    the reference. Called with the same rng at every evaluation, so the numbers move only
    because the policy does (common random numbers)."""
    cfg = rl_config

    def rl_eval(params, reference_params, reward_params, caption_tokens, rng):
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
             show_progress: bool = True, mesh=None) -> dict[str, Any]:
    """RL fine-tuning loop: `num_steps` rl_steps on `captions_per_step` captions each (from
    `caption_source.train_batch(step, n)["caption_tokens"]`), resuming from
    `workdir/checkpoints` (a resumed run takes exactly the steps an uninterrupted one would:
    captions and rngs are functions of the step). The policy starts at `policy_params`; the
    frozen reference is `reference_params` (default: `policy_params`). The optimizer is `tx`,
    else `optimizer(total_steps=num_steps)[0]` (gin: `train_rl.optimizer = @rl/make_optimizer`
    sets RL's learning rate apart from pretraining's).

    Logged to `workdir/metrics.jsonl` and TensorBoard: every `log_every` steps the step's
    metrics (reward components mean/min/max, KL, entropy, losses, grad norm) with samples/s and
    tokens/s; every `eval_every` steps (and at step 0) the policy on the first
    `num_eval_captions` held-out captions of `eval_source`; every `audio_every` steps
    `num_audio_samples` of those clips as WAV (`workdir/samples/`) and TensorBoard audio
    (needs `tokenizer_dir`). SIGTERM saves a checkpoint and stops.
    Returns {'step', 'train': last metrics, 'eval': {step: eval metrics}, 'state'}."""

    rl_config = rl_config or RLConfig()
    mesh = partitioning.make_mesh() if mesh is None else mesh
    partitioning.check_batch_size(captions_per_step, mesh, "train_rl.captions_per_step")
    tx = optimizer(total_steps=num_steps)[0] if tx is None else tx
    if audio_every and not tokenizer_dir:
        raise ConfigError("train_rl.audio_every > 0 needs train_rl.tokenizer_dir (the audio "
                          "tokenizer that decodes the policy's codes). Fix: set it, or set "
                          "audio_every = 0.")
    os.makedirs(workdir, exist_ok=True)
    rules = partitioning.logical_axis_rules()
    reference_params = policy_params if reference_params is None else reference_params
    with partitioning.mesh_context(mesh, rules):
        state, state_shardings, param_shardings = create_rl_state(
            lm_config, tx, policy_params, mesh, rl_config, rules)
        reference = jax.device_put(reference_params, param_shardings)
        reward_shardings = existing_shardings(reward_params, mesh)
        reward_params = jax.device_put(reward_params, reward_shardings)
        step_fn = jit_rl_step(make_rl_step(lm_config, tx, reward_fn, rl_config), state_shardings,
                              param_shardings, mesh, reward_shardings)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=checkpoint_every,
                                keep=keep_checkpoints, kind="music_rl")
    if checkpointer.latest_step() is not None:
        state = checkpointer.restore(abstract_like(state, state_shardings))
    start = int(state.step)
    model_meta = {"model_config": dataclasses.asdict(lm_config)}  # export reads it

    eval_fn = eval_captions = None
    if eval_source is not None and eval_every:
        eval_captions = np.asarray(eval_source.arrays["caption_tokens"][:num_eval_captions],
                                   np.int32)
        partitioning.check_batch_size(len(eval_captions), mesh, "train_rl.num_eval_captions")
        replicated = NamedSharding(mesh, PartitionSpec())
        with partitioning.mesh_context(mesh, rules):
            eval_fn = jax.jit(make_rl_eval(lm_config, reward_fn, rl_config),
                              in_shardings=(param_shardings, param_shardings, reward_shardings,
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

    def run_eval(done):
        with partitioning.mesh_context(mesh, rules):
            captions = partitioning.shard_batch({"c": eval_captions}, mesh)["c"]
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
                if done % log_every == 0 or done == num_steps or done == start + 1:
                    last = metrics_to_host(metrics)
                    check_finite(last, done, "RL fine-tuning")
                    last["samples_per_sec"] = samples_per_step * log.steps_per_sec(done)
                    last["tokens_per_sec"] = last["samples_per_sec"] * tokens_per_sample
                    log.record(done, last)
                    log.progress.set_postfix(reward=f"{last['reward_mean']:.3f}",
                                         kl=f"{last['kl']:.2f}")
                if done == start + 1:
                    write_operative_config(workdir)
                if eval_fn and (done % eval_every == 0 or done == num_steps):
                    run_eval(done)
                    log.restart_clock(done)
                checkpointer.save(done, state, meta=model_meta,
                                  force=done == num_steps or preemption.requested)
                log.progress.update(1)
                if preemption.requested:
                    logging.warning("SIGTERM: saved RL step %d, stopping.", done)
                    break
    finally:
        log.close()
        checkpointer.close()
    return {"step": int(state.step), "train": last, "eval": evals, "state": state}


__all__ = ["RLConfig", "RLState", "advantages", "kl_per_sequence", "policy_gradient_loss",
           "importance_weighted_loss", "adapt_beta", "policy_token_stats", "make_rl_step",
           "create_rl_state", "jit_rl_step", "train_rl", "lm_param_shardings", "existing_shardings",
           "whiten"]
