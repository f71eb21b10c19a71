"""Exact-gradient test bed for the RL estimators.

A music LM small enough to enumerate every clip (3 codes, 2 codebooks, 2 frames: 81 clips)
gives the exact objective J = E_pi[r] - beta * KL(pi || pi_ref) and its gradient. Every setting
`RLConfig` accepts for algorithm='reinforce' must give a Monte-Carlo gradient that matches it
(cosine and relative norm), and the jitted RL step must apply that gradient.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from musicrl_jax import decoding, partitioning
from musicrl_jax.models import music_lm
from musicrl_jax.training import rl

CONFIG = music_lm.MusicLMConfig(caption_vocab_size=8, codebook_size=3, num_codebooks=2,
                                embed_dim=8, num_heads=1, head_dim=8, mlp_dim=16,
                                num_encoder_layers=1, num_decoder_layers=1,
                                max_caption_length=4, max_frames=2)
FRAMES = 2
BETA = 0.5
GROUP = 4
NUM_SAMPLES = 16_384
CAPTION = np.array([[3, 5, 1, 0]], np.int32)
ALL_CODES = jnp.asarray(list(itertools.product(range(CONFIG.codebook_size),
                                               repeat=FRAMES * CONFIG.num_codebooks)),
                        jnp.int32).reshape(-1, FRAMES, CONFIG.num_codebooks)


def _params(seed, sharpness):
    # Jitted: the same params as eager init, bit for bit, without compiling op by op.
    params = dict(partitioning.unbox(jax.jit(music_lm.init_params, static_argnums=0)(
        CONFIG, jax.random.PRNGKey(seed))))
    params["heads"] = params["heads"] * sharpness  # a peaked, non-uniform policy
    return params


POLICY = _params(0, 3.0)
# A reference near the policy, as in RL (KL ~1 nat): a far one makes k3 heavy-tailed (e^r_t
# reaches thousands on clips the policy rarely draws) and the test would need far more samples.
REFERENCE = jax.tree.map(
    lambda p, q: p + 0.3 * (q - p), POLICY, _params(1, 3.0))
REWARD_TABLE = jax.random.normal(jax.random.PRNGKey(2), (len(ALL_CODES),)) + 2.0


def clip_index(codes):
    digits = codes.reshape(codes.shape[0], -1)
    powers = CONFIG.codebook_size ** jnp.arange(digits.shape[1] - 1, -1, -1)
    return (digits * powers).sum(-1)


def reward_fn(params, caption_tokens, audio_codes, audio_mask=None):
    del caption_tokens, audio_mask
    reward = params["table"][clip_index(audio_codes)]
    return reward, {"table": reward}


def seq_logprobs(params, codes):
    captions = jnp.broadcast_to(jnp.asarray(CAPTION), (codes.shape[0], CAPTION.shape[1]))
    return music_lm.token_logprobs(CONFIG, params, captions, codes)[0].sum((1, 2))


def objective(params):
    """Exact J over all 81 clips."""
    lp = seq_logprobs(params, ALL_CODES)
    ref = seq_logprobs(REFERENCE, ALL_CODES)
    probs = jnp.exp(lp)
    return jnp.sum(probs * REWARD_TABLE) - BETA * jnp.sum(probs * (lp - ref))


@pytest.fixture(scope="module")
def exact():
    # The exact quantities are jitted (one compile each, not one per eager op).
    probs = jnp.exp(jax.jit(seq_logprobs)(POLICY, ALL_CODES))
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)  # the enumeration is complete
    return jax.jit(jax.grad(objective))(POLICY)


@pytest.fixture(scope="module")
def samples():
    """NUM_SAMPLES clips from the policy by the KV-cache sampler, in groups of GROUP."""
    captions = jnp.broadcast_to(jnp.asarray(CAPTION), (NUM_SAMPLES, CAPTION.shape[1]))
    rngs = decoding.example_rngs(jax.random.PRNGKey(3), NUM_SAMPLES)
    codes = decoding.sample(CONFIG, POLICY, captions, rngs, num_frames=FRAMES)["codes"]
    token_stats = jax.jit(rl.policy_token_stats, static_argnums=0)
    ref_lp, _, mask = token_stats(CONFIG, REFERENCE, captions, codes)
    old_lp, _, _ = token_stats(CONFIG, POLICY, captions, codes)
    rewards, _ = reward_fn({"table": REWARD_TABLE}, captions, codes)
    return dict(captions=captions, codes=codes, ref_lp=ref_lp, old_lp=old_lp, mask=mask,
                rewards=rewards)


def monte_carlo_gradient(cfg, samples):
    """-grad of the RL loss on the samples (the ascent direction), as the step computes it."""
    def loss(params):
        token_lp, entropy, _ = rl.policy_token_stats(CONFIG, params, samples["captions"],
                                                     samples["codes"])
        return rl.rl_loss(cfg, token_lp, samples["old_lp"], samples["ref_lp"], entropy,
                          samples["mask"], samples["rewards"], jnp.float32(BETA))[0]
    return jax.tree.map(jnp.negative, jax.jit(jax.grad(loss))(POLICY))


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def compare(estimate, exact):
    a, b = flat(estimate), flat(exact)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), float(
        np.linalg.norm(a) / np.linalg.norm(b))


# updates_per_batch does not enter the loss of the first update (its ratios are 1), so the
# settings here are (baseline, kl_mode, estimator); the jitted-step test below runs U = 1 and 2.
ACCEPTED = [dict(baseline=b, kl_mode=m, kl_estimator=e)
            for b in ("rloo", "batch_mean", "none") for m in ("reward", "loss")
            for e in ("k1", "k3")]


@pytest.mark.parametrize("setting", ACCEPTED, ids=lambda s: "-".join(map(str, s.values())))
def test_every_accepted_setting_estimates_the_exact_gradient(setting, exact, samples):
    cfg = rl.RLConfig(samples_per_caption=GROUP, num_frames=FRAMES, beta=BETA, **setting)
    cosine, norm_ratio = compare(monte_carlo_gradient(cfg, samples), exact)
    print(f"{setting}: cosine {cosine:.4f}, norm ratio {norm_ratio:.3f}")
    assert cosine > 0.99 and abs(norm_ratio - 1) < 0.03, (cosine, norm_ratio)


def test_whitened_rewards_keep_the_gradient_direction(exact, samples):
    cfg = rl.RLConfig(samples_per_caption=GROUP, num_frames=FRAMES, beta=BETA,
                      reward_normalization="batch_whiten", kl_estimator="k3")
    cosine, _ = compare(monte_carlo_gradient(cfg, samples), exact)
    assert cosine > 0.99, cosine


def pathwise_kl_gradient(samples, estimator):
    """grad of mean_b sum_t k_t(theta) with the samples fixed (a per-token KL loss's)."""
    def per_token_kl(params):
        token_lp, _, _ = rl.policy_token_stats(CONFIG, params, samples["captions"],
                                               samples["codes"])
        return rl.kl_per_sequence(token_lp, samples["ref_lp"], samples["mask"], estimator).mean()
    return jax.jit(jax.grad(per_token_kl))(POLICY)


@pytest.mark.parametrize("kl_estimator, kl_mode", [("k3", "reward"), ("k3", "loss"),
                                                   ("k1", "loss")])
def test_the_gradient_needs_every_term(kl_estimator, kl_mode, exact, samples):
    """Each KL term is load-bearing. With the reward zeroed the estimate must be -beta grad KL;
    without k3's pathwise term, or with only a per-token pathwise KL loss (no score-function
    term for the prefix, as GRPO's KL loss), it is not."""
    cfg = rl.RLConfig(samples_per_caption=GROUP, num_frames=FRAMES, beta=BETA,
                      kl_estimator=kl_estimator, kl_mode=kl_mode)
    kl_only = dict(samples, rewards=jnp.zeros_like(samples["rewards"]))
    target = jax.tree.map(lambda g: -BETA * g, exact_kl_gradient(POLICY))
    good = monte_carlo_gradient(cfg, kl_only)
    cosine, ratio = compare(good, target)
    assert cosine > 0.99 and abs(ratio - 1) < 0.03, (cosine, ratio)
    pathwise = pathwise_kl_gradient(samples, kl_estimator)
    if kl_mode == "reward":
        bad = jax.tree.map(lambda g, p: g + BETA * p, good, pathwise)
    else:
        bad = jax.tree.map(lambda p: -BETA * p, pathwise)
    cosine, ratio = compare(bad, target)
    print(f"{kl_estimator} {kl_mode} without its term: cosine {cosine:.4f}, ratio {ratio:.3f}")
    assert cosine < 0.97 or abs(ratio - 1) > 0.1, (cosine, ratio)


def exact_kl(params):
    lp = seq_logprobs(params, ALL_CODES)
    return jnp.sum(jnp.exp(lp) * (lp - seq_logprobs(REFERENCE, ALL_CODES)))


exact_kl_gradient = jax.jit(jax.grad(exact_kl))


@pytest.mark.parametrize("updates_per_batch", [1, 2])
def test_the_jitted_step_applies_that_gradient(updates_per_batch, exact):
    """rl_step with SGD at a tiny learning rate moves the params by lr * U * (its gradient);
    averaged over steps from the same start that is the exact gradient."""
    lr, repeats, captions = 1e-3, 8, 1024
    cfg = rl.RLConfig(samples_per_caption=GROUP, num_frames=FRAMES, beta=BETA,
                      updates_per_batch=updates_per_batch)
    tx = optax.sgd(lr)
    step = jax.jit(rl.make_rl_step(CONFIG, tx, reward_fn, cfg))
    state = rl.RLState(step=jnp.zeros((), jnp.int32), params=POLICY, opt_state=tx.init(POLICY),
                       beta=jnp.float32(BETA))
    caption_batch = jnp.broadcast_to(jnp.asarray(CAPTION), (captions, CAPTION.shape[1]))
    moves = []
    for i in range(repeats):
        new_state, _ = step(state, REFERENCE, {"table": REWARD_TABLE}, caption_batch,
                            jax.random.PRNGKey(10 + i))
        moves.append(jax.tree.map(lambda new, old: (new - old) / (lr * updates_per_batch),
                                  new_state.params, POLICY))
    mean_move = jax.tree.map(lambda *m: sum(m) / len(m), *moves)
    cosine, norm_ratio = compare(mean_move, exact)
    print(f"updates_per_batch={updates_per_batch}: cosine {cosine:.4f}, ratio {norm_ratio:.3f}")
    assert cosine > 0.99 and abs(norm_ratio - 1) < 0.03, (cosine, norm_ratio)
