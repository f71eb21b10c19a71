import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from musicrl_jax import partitioning
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import music_lm
from musicrl_jax.training import rl

import lm_by_hand  # tests/lm_by_hand.py

TARGET_TOKEN = 7
NUM_CAPTIONS = 4


# --- estimators on toy arrays --------------------------------------------------------------

def test_policy_gradient_matches_hand_derived_gradient():
    theta = jnp.array([0.3, -1.2, 0.8])
    actions = jnp.array([0, 2, 2, 1, 0])
    adv = jnp.array([1.5, -0.5, 2.0, 0.7, -1.0])

    def loss(t):
        return rl.policy_gradient_loss(jax.nn.log_softmax(t)[actions], adv)

    grad = jax.grad(loss)(theta)
    probs = jax.nn.softmax(theta)
    expected = -jnp.mean(adv[:, None] * (jax.nn.one_hot(actions, 3) - probs[None]), axis=0)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)
    # Advantages are constants: no gradient flows into them.
    adv_grad = jax.grad(
        lambda a: rl.policy_gradient_loss(jax.nn.log_softmax(theta)[actions], a))(adv)
    np.testing.assert_array_equal(adv_grad, 0.0)
    # The per-token ratio surrogate (updates_per_batch > 1) has the same gradient at pi_old.
    old = jax.nn.log_softmax(theta)[actions]
    iw = jax.grad(lambda t: -rl.clipped_token_objective(
        jax.nn.log_softmax(t)[actions], old, adv, ratio_clip=0.2).mean())(theta)
    np.testing.assert_allclose(iw, expected, rtol=1e-6, atol=1e-7)


def test_token_ratios_clip_per_token_not_per_sequence():
    """Off-policy by 0.1 nats on each of 1,000 tokens: a sequence ratio e^100 would be clipped
    to nothing; per-token ratios e^0.1 stay inside a 0.2 clip and keep every gradient."""
    old = jnp.full((2, 1000), -1.0)
    new = old + 0.1
    adv = jnp.array([[1.0], [-1.0]]) * jnp.ones((2, 1000))
    grads = jax.grad(lambda lp: rl.clipped_token_objective(lp, old, adv, 0.2).sum())(new)
    np.testing.assert_allclose(grads, adv * jnp.exp(0.1), rtol=1e-5)
    far = old + 0.5  # beyond the clip: the positive-advantage tokens stop pulling
    grads = jax.grad(lambda lp: rl.clipped_token_objective(lp, old, adv, 0.2).sum())(far)
    assert (grads[0] == 0).all() and (grads[1] < 0).all()


def test_loss_aggregations_differ_only_with_ragged_masks():
    per_token = jnp.arange(12.0).reshape(2, 3, 2)
    full = jnp.ones((1, 3, 2), bool)
    values = {how: float(rl.aggregate(per_token, full, how)) for how in
              ("sequence_sum", "sequence_mean", "token_mean", "constant")}
    assert values["sequence_sum"] == pytest.approx(66.0 / 2)
    assert values["sequence_mean"] == values["token_mean"] == values["constant"] == 66.0 / 12
    ragged = jnp.array([[[1, 1], [1, 1], [1, 1]], [[1, 0], [0, 0], [0, 0]]], bool)
    # sequence 0 sums 15 over 6 tokens, sequence 1 holds one token, 6.
    assert float(rl.aggregate(per_token, ragged, "sequence_mean")) == pytest.approx(
        (15 / 6 + 6 / 1) / 2)
    assert float(rl.aggregate(per_token, ragged, "token_mean")) == pytest.approx(21 / 7)
    assert float(rl.aggregate(per_token, ragged, "constant")) == pytest.approx(21 / 12)


def test_reward_to_go_sums_later_steps_and_all_codebooks():
    per_token = jnp.array([[[1.0, 2.0], [3.0, 0.0], [0.5, 0.5]]])
    np.testing.assert_allclose(rl.reward_to_go(per_token), [[7.0, 4.0, 1.0]])


def test_kl_estimators_zero_at_reference_and_k3_nonnegative():
    rng = np.random.default_rng(0)
    logp = jnp.asarray(np.log(rng.uniform(0.01, 1.0, (3, 5, 2))), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=(1, 5, 2)) > 0.3)
    for est in rl.KL_ESTIMATORS:
        np.testing.assert_allclose(rl.kl_per_sequence(logp, logp, mask, est), 0.0, atol=1e-7)
    other = jnp.asarray(np.log(rng.uniform(0.01, 1.0, (3, 5, 2))), jnp.float32)
    for a, b in ((logp, other), (other, logp), (logp, logp + 3.0), (logp, logp - 3.0)):
        per_token = rl.kl_per_sequence(a, b, jnp.ones((1, 5, 2), bool), "k3")
        assert (per_token >= 0).all()
        assert (rl.kl_per_sequence(a, b, mask, "k2") >= 0).all()
    # Masked positions do not count.
    k1 = rl.kl_per_sequence(logp, other, mask, "k1")
    np.testing.assert_allclose(k1, jnp.where(mask, logp - other, 0).sum((1, 2)), rtol=1e-5)
    # k1 and k3 are unbiased for KL(p || q) when tokens are drawn from p.
    p, q = jnp.array([0.6, 0.3, 0.1]), jnp.array([0.2, 0.5, 0.3])
    exact = float(jnp.sum(p * jnp.log(p / q)))
    draws = jax.random.categorical(jax.random.PRNGKey(0), jnp.log(p), shape=(200_000,))
    lp, lq = jnp.log(p)[draws][:, None], jnp.log(q)[draws][:, None]
    for est in ("k1", "k3"):
        np.testing.assert_allclose(rl.kl_per_sequence(lp, lq, True, est).mean(), exact, rtol=0.03)


def test_advantage_baselines():
    rewards = jnp.array([1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 10.0, 10.0])
    np.testing.assert_allclose(rl.advantages(rewards, 4, "none"), rewards)
    np.testing.assert_allclose(rl.advantages(rewards, 4, "batch_mean"), rewards - rewards.mean())
    rloo = rl.advantages(rewards, 4, "rloo")
    np.testing.assert_allclose(rloo[:4], [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2], rtol=1e-6)
    np.testing.assert_allclose(rloo[4:], 0.0)
    with pytest.raises(ConfigError, match="samples_per_caption >= 2"):
        rl.RLConfig(samples_per_caption=1)
    np.testing.assert_allclose(rl.advantages(rewards, 4, "group_mean")[:4],
                               [-2.0, -1.0, 0.0, 3.0])
    np.testing.assert_allclose(rl.advantages(rewards, 4, "group_norm")[:4],
                               np.array([-2.0, -1.0, 0.0, 3.0]) / np.std([1, 2, 3, 6]),
                               rtol=1e-5)
    np.testing.assert_allclose(rl.advantages(rewards, 4, "group_norm")[4:], 0.0)
    # The beta controller raises beta when KL is above target and lowers it below.
    assert float(rl.adapt_beta(0.1, 2.0, 1.0, 0.1)) > 0.1 > float(rl.adapt_beta(0.1, 0.5, 1.0, 0.1))
    assert float(rl.adapt_beta(0.1, 2.0, 0.0, 0.1)) == 0.1


def test_rloo_gradient_is_unbiased_and_lower_variance():
    theta = jnp.array([0.5, -0.3, 0.1])
    reward_table = jnp.array([1.0, 2.0, 5.0]) + 10.0  # a large offset makes baselines matter
    exact = jax.grad(lambda t: jnp.sum(jax.nn.softmax(t) * reward_table))(theta)
    group = 4

    def estimate(key, baseline, size):
        actions = jax.random.categorical(key, theta, shape=(size,))
        adv = rl.advantages(reward_table[actions], size, baseline)
        return -jax.grad(
            lambda t: rl.policy_gradient_loss(jax.nn.log_softmax(t)[actions], adv))(theta)

    keys = jax.random.split(jax.random.PRNGKey(0), 20_000)
    draws = {name: jax.jit(jax.vmap(lambda k, b=b, s=s: estimate(k, b, s)))(keys)
             for name, b, s in (("rloo4", "rloo", group), ("none4", "none", group),
                                ("none1", "none", 1))}
    for name, values in draws.items():
        stderr = values.std(0) / np.sqrt(len(keys))
        assert np.all(np.abs(values.mean(0) - exact) < 5 * stderr + 1e-3), (
            name, values.mean(0), exact)
    variance = {name: float(values.var(0).sum()) for name, values in draws.items()}
    assert variance["rloo4"] < 0.1 * variance["none4"] < variance["none1"], variance


# --- the RL step on the tiny LM ------------------------------------------------------------

def toy_reward_fn(params, caption_tokens, audio_codes, audio_mask=None):
    """Fraction of codebook-0 tokens equal to TARGET_TOKEN (pure, jittable, dummy params)."""
    del caption_tokens, audio_mask
    hits = (audio_codes[..., 0] == TARGET_TOKEN).astype(jnp.float32).mean(-1)
    return params["scale"] * hits, {"target_fraction": hits}


RL_CONFIG = rl.RLConfig(samples_per_caption=4, baseline="rloo", kl_mode="reward",
                        kl_estimator="k1", beta=0.1, num_frames=8)
REWARD_SCALE = 10.0  # reward = 10 * fraction, so one extra hit is worth 1.25 vs ~3.5 nats of KL


def _captions(config, batch=NUM_CAPTIONS, seed=0):
    rng = np.random.default_rng(seed)
    captions = np.zeros((batch, config.max_caption_length), np.int32)
    captions[:, :4] = rng.integers(2, config.caption_vocab_size, (batch, 4))
    captions[:, 4] = 1
    return captions


def _setup(config, params, mesh, rl_config=RL_CONFIG, tx=None):
    tx = optax.adam(5e-3) if tx is None else tx
    with partitioning.mesh_context(mesh):
        state, state_shardings, param_shardings = rl.create_rl_state(config, tx, params, mesh,
                                                                     rl_config)
        reference = jax.device_put(params, param_shardings)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        reward_params = jax.device_put({"scale": jnp.asarray(REWARD_SCALE)}, replicated)
        step = rl.jit_rl_step(rl.make_rl_step(config, tx, toy_reward_fn, rl_config),
                              state_shardings, param_shardings, mesh)  # donated like train_rl's
    return dict(state=state, reference=reference, reward_params=reward_params, step=step,
                mesh=mesh, state_shardings=state_shardings)


def _fresh_state(setup):
    """A copy of the initial state (the jitted step donates its state argument)."""
    return jax.tree.map(lambda x: x.copy(), setup["state"])


def _run(setup, state, captions, rng):
    mesh = setup["mesh"]
    with partitioning.mesh_context(mesh):
        captions = jax.device_put(captions, partitioning.batch_sharding(mesh, 2))
        return setup["step"](state, setup["reference"], setup["reward_params"], captions, rng)


@pytest.fixture(scope="module")
def one_device(tiny_config, tiny_params):
    return _setup(tiny_config, tiny_params, partitioning.make_mesh(devices=jax.devices()[:1]))


def test_policy_token_stats_match_a_forward_pass_done_by_hand(tiny_config, tiny_params):
    """Log-probs and entropies against the raw logits of one forward pass, with the delay
    pattern, the shift and a float64 log-softmax rebuilt in the test (not against
    music_lm.token_logprobs, which policy_token_stats calls)."""
    captions = _captions(tiny_config, 2)
    codes = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, 8, tiny_config.num_codebooks),
                                          0, tiny_config.codebook_size))
    token_lp, entropy, mask = jax.jit(rl.policy_token_stats, static_argnums=0)(
        tiny_config, tiny_params, jnp.asarray(captions), jnp.asarray(codes))
    log_probs, targets, want_mask = lm_by_hand.log_softmax_by_hand(tiny_config, tiny_params,
                                                                   captions, codes)
    shape = token_lp.shape
    np.testing.assert_array_equal(np.broadcast_to(mask, shape),
                                  np.broadcast_to(want_mask, shape))
    np.testing.assert_allclose(token_lp, lm_by_hand.picked(log_probs, targets, want_mask),
                               atol=2e-5)
    want_entropy = np.where(want_mask, -(np.exp(log_probs) * log_probs).sum(-1), 0.0)
    np.testing.assert_allclose(entropy, want_entropy, atol=2e-5)


def _train(setup, state, captions, steps):
    history = []
    for i in range(steps):
        state, metrics = _run(setup, state, captions, jax.random.PRNGKey(100 + i))
        history.append(rl.metrics_to_host(metrics))
    return state, history


def test_rl_raises_toy_reward_with_bounded_kl(one_device, tiny_config):
    captions = _captions(tiny_config)
    start = time.perf_counter()
    state, history = _train(one_device, _fresh_state(one_device), captions, 30)
    elapsed = time.perf_counter() - start
    fraction = [m["reward/target_fraction_mean"] for m in history]
    kl = [m["kl"] for m in history]
    print(f"30 RL steps in {elapsed:.1f}s: target fraction {fraction[0]:.3f} -> "
          f"{np.mean(fraction[-5:]):.3f}, kl {kl[-1]:.2f} nats, "
          f"entropy {history[-1]['entropy']:.3f}")
    assert np.mean(fraction[:3]) < 0.2 and np.mean(fraction[-5:]) > 0.8, fraction
    # The KL stays bounded: near the ~8 * ln(32) = 28 nats that making all 8 codebook-0 tokens
    # 7 needs (the reference gives 7 about 1/32), not drifting on the unrewarded codebook.
    assert max(kl) < 60.0 and np.mean(kl[-5:]) < 1.5 * np.mean(kl[-15:-10]) + 1.0, kl
    for m in history:
        assert all(np.isfinite(v) for v in m.values()), m
        assert m["reward_min"] <= m["reward_mean"] <= m["reward_max"]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # policy starts at the reference
    assert set(history[0]) >= {"reward/target_fraction_mean", "kl_mean", "entropy", "pg_loss",
                               "grad_norm", "beta"}
    assert int(state.step) == 30
    # A larger beta (carried in the state, so no recompile) keeps the policy closer to pi_ref.
    strong = _fresh_state(one_device).replace(beta=jnp.asarray(2.0, jnp.float32))
    _, strong_history = _train(one_device, strong, captions, 15)
    strong_kl = np.mean([m["kl"] for m in strong_history[-5:]])
    print(f"beta=2 after 15 steps: kl {strong_kl:.2f} vs {np.mean(kl[10:15]):.2f} at beta=0.1")
    assert strong_kl < 0.5 * np.mean(kl[10:15]), (strong_kl, kl[10:15])


def test_grpo_raises_toy_reward_with_bounded_kl(tiny_config, tiny_params):
    config = rl.RLConfig(algorithm="grpo", samples_per_caption=4, beta=0.1, num_frames=8,
                         updates_per_batch=2)
    setup = _setup(tiny_config, tiny_params, partitioning.make_mesh(devices=jax.devices()[:1]),
                   config)
    _, history = _train(setup, _fresh_state(setup), _captions(tiny_config), 30)
    fraction = [m["reward/target_fraction_mean"] for m in history]
    kl = [m["kl"] for m in history]
    print(f"GRPO: target fraction {fraction[0]:.3f} -> {np.mean(fraction[-5:]):.3f}, "
          f"kl {kl[-1]:.2f}")
    assert np.mean(fraction[:3]) < 0.2 and np.mean(fraction[-5:]) > 0.6, fraction
    assert max(kl) < 60.0, kl
    assert history[0]["kl_loss"] == pytest.approx(0.0, abs=1e-5)  # starts at the reference
    assert history[-1]["kl_loss"] > 0 and "pg_loss_last" in history[-1]


def test_sharded_step_equals_one_device_step(tiny_config, tiny_params):
    # SGD at lr 1: each param moves by exactly its gradient, so the params compare the two
    # layouts' gradients. (Adam's first step, lr * g / (|g| + eps), turns the layouts' different
    # round-off in a near-zero gradient into a visible fraction of lr.)
    tx = optax.sgd(1.0)
    one_device = _setup(tiny_config, tiny_params, partitioning.make_mesh(devices=jax.devices()[:1]),
                        tx=tx)
    eight = _setup(tiny_config, tiny_params, partitioning.make_mesh(data=2, fsdp=2, tensor=2),
                   tx=tx)
    kernel = eight["state"].params["decoder_0"]["mlp"]["wi_gate"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    captions, rng = _captions(tiny_config), jax.random.PRNGKey(5)
    state_one, metrics_one = _run(one_device, _fresh_state(one_device), captions, rng)
    state_eight, metrics_eight = _run(eight, eight["state"], captions, rng)
    metrics_one, metrics_eight = rl.metrics_to_host(metrics_one), rl.metrics_to_host(metrics_eight)
    assert metrics_one["grad_norm"] > 0
    for key, value in metrics_one.items():
        np.testing.assert_allclose(metrics_eight[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert state_eight.params["decoder_0"]["mlp"]["wi_gate"].sharding.spec == kernel.sharding.spec
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.device_get(state_eight.params), jax.device_get(state_one.params))


@pytest.mark.parametrize("options, message", [
    (dict(kl_estimator="k4"), "kl_estimator='k4' is not accepted"),
    (dict(kl_estimator="k2"), "E\\[k2\\] is not the KL"),
    (dict(kl_mode="loss", kl_estimator="k2"), "E\\[k2\\] is not the KL"),
    (dict(kl_mode="token_loss"), "reverse KL"),
    (dict(baseline="group_norm"), "reweights captions"),
    (dict(algorithm="grpo", kl_mode="reward"), "Fix: use one of \\['token_loss'\\]"),
    (dict(algorithm="grpo", loss_aggregation="sequence_sum"), "sequence_mean"),
    (dict(sampling=rl.SamplingConfig(temperature=0.8)), "off-policy"),
    (dict(sampling=rl.SamplingConfig(top_k=20)), "off-policy"),
    (dict(sampling=rl.SamplingConfig(guidance_weight=3.0)), "off-policy"),
    (dict(samples_per_caption=1), "samples_per_caption >= 2"),
    (dict(algorithm="ppo"), "algorithm='ppo'"),
])
def test_settings_without_a_correct_gradient_are_rejected(options, message):
    with pytest.raises(ConfigError, match=message):
        rl.RLConfig(**options)


def test_algorithm_defaults():
    default = rl.RLConfig()
    assert (default.baseline, default.kl_mode, default.kl_estimator, default.loss_aggregation,
            default.ratio_clip) == ("rloo", "reward", "k1", "sequence_sum", 0.0)
    grpo = rl.RLConfig(algorithm="grpo")
    assert (grpo.baseline, grpo.kl_mode, grpo.kl_estimator, grpo.loss_aggregation,
            grpo.ratio_clip) == ("group_norm", "token_loss", "k3", "sequence_mean", 0.2)


@pytest.mark.parametrize("options", [
    dict(kl_mode="loss", kl_estimator="k3", updates_per_batch=2, ratio_clip=0.2),
    dict(algorithm="grpo", loss_aggregation="token_mean", updates_per_batch=2),
    dict(baseline="batch_mean", reward_normalization="batch_whiten", entropy_bonus=0.01,
         kl_estimator="k3", target_kl=5.0),
])
def test_other_options_trace_with_consistent_shapes(tiny_config, tiny_params, options):
    """Every option combination traces to the same state/metric structure (no compile)."""
    config = rl.RLConfig(samples_per_caption=4, num_frames=8, **options)
    tx = optax.adam(1e-3)
    step = rl.make_rl_step(tiny_config, tx, toy_reward_fn, config)
    state = rl.RLState(step=jnp.zeros((), jnp.int32), params=tiny_params,
                       opt_state=tx.init(tiny_params), beta=jnp.asarray(config.beta))
    new_state, metrics = jax.eval_shape(step, state, tiny_params, {"scale": jnp.ones(())},
                                        jnp.asarray(_captions(tiny_config)), jax.random.PRNGKey(0))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert all(m.shape == () for m in metrics.values())
    if config.updates_per_batch > 1:
        assert "grad_norm_last" in metrics


def _read_jsonl(path):
    import json
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_train_rl_logs_evaluates_writes_audio_and_resumes_identically(
        tmp_path, tiny_config, tiny_params, tiny_tokenizer, one_device):
    from conftest import toy_task
    task = toy_task()
    tokenizer_dir = str(tmp_path / "tokenizer")
    tiny_tokenizer.save(tokenizer_dir)
    args = dict(lm_config=tiny_config, policy_params=tiny_params, reward_fn=toy_reward_fn,
                reward_params={"scale": jnp.asarray(REWARD_SCALE)},
                caption_source=task.train_source, eval_source=task.eval_source,
                num_eval_captions=8, eval_every=2, tokenizer_dir=tokenizer_dir, audio_every=2,
                num_audio_samples=2, rl_config=RL_CONFIG, tx=optax.adam(5e-3),
                captions_per_step=NUM_CAPTIONS, log_every=1, checkpoint_every=2,
                show_progress=False, mesh=one_device["mesh"])
    params_before = jax.tree.map(np.array, jax.device_get(tiny_params))  # host copies
    straight = rl.train_rl(num_steps=4, workdir=str(tmp_path / "straight"), **args)
    # An interrupted run: stops after step 2 (its checkpoint), then a new call resumes it.
    rl.train_rl(num_steps=2, workdir=str(tmp_path / "resumed"), **args)
    resumed = rl.train_rl(num_steps=4, workdir=str(tmp_path / "resumed"), **args)
    assert straight["step"] == resumed["step"] == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b),
                 jax.device_get(straight["state"].params), jax.device_get(resumed["state"].params))
    rows = {name: _read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("straight", "resumed")}
    train = {name: {r["step"]: r for r in rs if "eval" not in r} for name, rs in rows.items()}
    assert sorted(train["resumed"]) == [1, 2, 3, 4]  # the resumed call started at step 3
    for step in (3, 4):
        for key in ("reward_mean", "kl", "pg_loss", "grad_norm"):
            assert train["resumed"][step][key] == train["straight"][step][key], (step, key)
    row = train["straight"][4]
    assert row["samples_per_sec"] > 0
    assert row["tokens_per_sec"] == pytest.approx(
        row["samples_per_sec"] * RL_CONFIG.num_frames * tiny_config.num_codebooks)
    assert {"reward/target_fraction_min", "reward/target_fraction_max", "entropy", "kl_max",
            "grad_norm", "pg_loss"} <= set(row)
    evals = {r["step"]: r["eval"] for r in rows["straight"] if "eval" in r}
    assert sorted(evals) == [0, 2, 4] and evals[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert evals[4]["kl"] > 0 and "reward/target_fraction" in evals[4]
    for step in (0, 2, 4):
        wavs = sorted((tmp_path / "straight" / "samples" / f"step_{step:06d}").glob("*.wav"))
        assert len(wavs) == 2 and all(w.stat().st_size > 1000 for w in wavs)
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))
    # The checkpoint records the model config, so an export needs nothing else.
    from musicrl_jax.checkpoints import Checkpointer
    meta = Checkpointer(str(tmp_path / "straight" / "checkpoints")).meta()
    assert music_lm.MusicLMConfig(**meta["model_config"]) == tiny_config
    assert meta["kind"] == "music_rl"
    # The caller's params (the reference) are untouched by the donated steps: every leaf still
    # readable (not donated away) and equal to its value before the runs.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tiny_params), params_before)
    with pytest.raises(ConfigError, match="tokenizer_dir"):
        rl.train_rl(num_steps=1, workdir=str(tmp_path / "x"), **{**args, "tokenizer_dir": None})


def test_rl_finetune_runs_r_then_ru_from_checkpoints(tmp_path, tiny_config, one_device):
    import json

    import gin

    from conftest import toy_task
    from musicrl_jax.checkpoints import Checkpointer
    from musicrl_jax.rewards import RewardCombination, RewardModel
    from musicrl_jax.training import trainer
    from musicrl_jax.training.reward_tasks import TextRewardTask
    from musicrl_jax.training.rl_finetune import restore_policy_params, rl_finetune

    mesh = one_device["mesh"]
    task = toy_task()
    tx, _ = trainer.make_optimizer(total_steps=1)
    with partitioning.mesh_context(mesh):
        pretrained, _ = trainer.create_train_state(task, tx, mesh, seed=0)
    pretrain_dir = str(tmp_path / "pretrain")
    checkpointer = Checkpointer(os.path.join(pretrain_dir, "checkpoints"), kind="music_lm")
    checkpointer.save(1, pretrained, force=True)
    checkpointer.close()

    text = TextRewardTask(config=tiny_config, num_audio_layers=1, projection_dim=16)
    text_params = partitioning.unbox(text.fresh_params(jax.random.PRNGKey(1)))

    def rewards():
        return RewardCombination(rewards={"text": RewardModel(text, text_params)},
                                 weights={"text": 1.0},
                                 reference_stats={"text": {"mean": 0.0, "std": 0.1}})

    gin.bind_parameter("train_rl.num_steps", 2)
    gin.bind_parameter("train_rl.captions_per_step", NUM_CAPTIONS)
    gin.bind_parameter("train_rl.eval_every", 2)
    gin.bind_parameter("train_rl.num_eval_captions", 8)
    gin.bind_parameter("train_rl.show_progress", False)
    gin.bind_parameter("train_rl.rl_config", RL_CONFIG)
    common = dict(lm_config=tiny_config, rewards=rewards, mesh=mesh,
                  caption_source=lambda: task.train_source, eval_source=lambda: task.eval_source)
    r = rl_finetune(init_checkpoint=pretrain_dir, workdir=str(tmp_path / "r"), **common)
    summary = json.load(open(tmp_path / "r" / "summary.json"))
    assert summary["eval_first"]["step"] == 0 and summary["eval_last"]["step"] == 2
    assert summary["eval_first"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert "reward/text" in summary["eval_last"] and summary["rewards"] == {"text": 1.0}
    # MusicRL-RU's start: the RL checkpoint's policy, restored by kind.
    restored = restore_policy_params(tiny_config, str(tmp_path / "r"), mesh)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.device_get(restored),
                 jax.device_get(r["state"].params))
    ru = rl_finetune(init_checkpoint=str(tmp_path / "r"), reference_checkpoint=pretrain_dir,
                     workdir=str(tmp_path / "ru"), **common)
    assert ru["summary"]["eval_first"]["kl_k3"] > 1e-4  # starts at R's policy, anchored at pretrain
    assert ru["summary"]["reference_checkpoint"] == os.path.abspath(pretrain_dir)
    # With LoRA the checkpoint holds adapters; restoring it as a policy merges them with the
    # reference checkpoint it names.
    from musicrl_jax.models import lora
    gin.bind_parameter("train_rl.lora", lora.LoRAConfig(rank=4))
    lora_r = rl_finetune(init_checkpoint=pretrain_dir, workdir=str(tmp_path / "lora_r"),
                         **common)
    meta = Checkpointer(str(tmp_path / "lora_r" / "checkpoints")).meta()
    assert meta["lora"]["rank"] == 4
    assert meta["reference_checkpoint"] == os.path.abspath(pretrain_dir)
    restored = restore_policy_params(tiny_config, str(tmp_path / "lora_r"), mesh)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 jax.device_get(restored), jax.device_get(lora_r["policy_params"]))
    with pytest.raises(ConfigError, match="must start at the reference"):
        rl_finetune(init_checkpoint=str(tmp_path / "r"), reference_checkpoint=pretrain_dir,
                    workdir=str(tmp_path / "lora_ru"), **common)
    gin.bind_parameter("train_rl.lora", None)
    # A reward model of another tokenizer is refused before any step (not clamped in jit).
    import dataclasses
    other = TextRewardTask(config=dataclasses.replace(tiny_config, codebook_size=16),
                           num_audio_layers=1, projection_dim=16)

    def other_rewards():
        return RewardCombination(
            rewards={"text": RewardModel(other, other.fresh_params(jax.random.PRNGKey(1)))},
            weights={"text": 1.0}, reference_stats={"text": {"mean": 0.0, "std": 0.1}})

    with pytest.raises(ConfigError, match="codebook_size=16 but the policy has 32"):
        rl_finetune(init_checkpoint=pretrain_dir, workdir=str(tmp_path / "bad"),
                    **{**common, "rewards": other_rewards})
    assert not (tmp_path / "bad" / "checkpoints").exists()
    small_vocab = dataclasses.replace(tiny_config, caption_vocab_size=8)
    with pytest.raises(ConfigError, match="caption_vocab_size=8, smaller"):
        RewardCombination(
            rewards={"text": RewardModel(TextRewardTask(config=small_vocab), None)},
            weights={"text": 1.0}, reference_stats={"text": {"mean": 0.0, "std": 0.1}}
        ).check_policy(tiny_config)
    with pytest.raises(ConfigError, match="not a music LM policy"):
        text_dir = tmp_path / "text_reward" / "checkpoints"
        ck = Checkpointer(str(text_dir), kind="text_reward")
        ck.save(1, {"w": jnp.zeros(2)}, force=True)
        ck.close()
        restore_policy_params(tiny_config, str(tmp_path / "text_reward"), mesh)
    with pytest.raises(ConfigError, match="No music_rl|No policy|No complete"):
        restore_policy_params(tiny_config, str(tmp_path / "missing"), mesh)


def test_the_learning_rate_schedule_spans_every_optimizer_update(tmp_path, tiny_config,
                                                                 tiny_params, one_device):
    """With updates_per_batch=3 the optimizer steps 3x per RL step; the schedule (here decaying
    to 0) must be built for all of them, or later updates run at its floor."""
    from conftest import toy_task
    from musicrl_jax.training import trainer
    built = []

    def optimizer(total_steps):
        built.append(total_steps)
        return trainer.make_optimizer(total_steps, learning_rate=1e-3, warmup_steps=0,
                                      end_learning_rate_fraction=0.0)

    task = toy_task()
    config = rl.RLConfig(samples_per_caption=4, num_frames=8, updates_per_batch=3)
    result = rl.train_rl(lm_config=tiny_config, policy_params=tiny_params,
                         reward_fn=toy_reward_fn, reward_params={"scale": jnp.asarray(1.0)},
                         caption_source=task.train_source, workdir=str(tmp_path / "rl"),
                         rl_config=config, optimizer=optimizer, num_steps=2,
                         captions_per_step=NUM_CAPTIONS, show_progress=False,
                         mesh=one_device["mesh"])
    assert built == [6]
    counts = [int(x) for x in jax.tree.leaves(result["state"].opt_state)
              if getattr(x, "dtype", None) == jnp.int32 and x.ndim == 0]
    assert counts and set(counts) == {6}  # the optimizer took 2 x 3 steps


def test_host_rows_give_each_process_its_share(monkeypatch):
    rows = np.arange(8)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    np.testing.assert_array_equal(partitioning.host_rows(rows), [4, 5, 6, 7])
    with pytest.raises(ConfigError, match="not divisible by the 2 processes"):
        partitioning.host_rows(np.arange(7))


@pytest.mark.parametrize("gin_file, algorithm", [
    ("local/musicrl_r.gin", "reinforce"), ("local/musicrl_u.gin", "reinforce"),
    ("local/musicrl_ru.gin", "reinforce"), ("local/musicrl_u_grpo.gin", "grpo"),
    ("local/musicrl_u_lora.gin", "reinforce")])
def test_rl_experiments_parse_and_build_an_accepted_rl_config(gin_file, algorithm):
    import gin

    from musicrl_jax.main import parse_gin
    parse_gin([gin_file], [])
    config = rl.RLConfig()
    assert config.algorithm == algorithm and config.samples_per_caption >= 2
    if "lora" in gin_file:
        from musicrl_jax.models import lora
        assert gin.query_parameter("train_rl.lora").selector == "LoRAConfig"
        assert lora.LoRAConfig().rank == 8


def test_the_dpo_experiment_parses_into_a_dpo_training_job():
    import gin

    from musicrl_jax.main import parse_gin
    parse_gin(["local/musicrl_u_dpo.gin"], [])
    assert gin.query_parameter("train.task").selector == "DPOTask"
    assert gin.query_parameter("PRETRAIN_DIR/macro.value") == "runs/demo/pretrain"
    assert gin.query_parameter("PREFERENCES_DIR/macro.value") == (
        "runs/demo/feedback/preferences")


# --- LoRA ----------------------------------------------------------------------------------

def test_lora_starts_at_the_base_and_trains_only_its_adapters(tiny_config, tiny_params):
    from musicrl_jax.models import lora
    config = lora.LoRAConfig(rank=4, alpha=8.0)
    adapters = lora.init(config, tiny_params, jax.random.PRNGKey(0))
    merged = lora.merge(config, tiny_params, adapters)
    jax.tree.map(np.testing.assert_array_equal, merged, tiny_params)  # B = 0
    assert lora.num_params(adapters) < 0.25 * lora.num_params(tiny_params)
    # Every targeted kernel, and nothing else, is adapted.
    adapted = {path for path in lora.targeted(config, tiny_params)}
    assert {p[-1] for p in adapted} == set(config.targets)
    assert ("decoder_0", "cross_attention", "out") in adapted
    # After a step on B, the merged kernel moved by scale * A @ B and the others did not.
    grads = jax.grad(lambda a: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(
        lora.merge(config, tiny_params, a))))(adapters)
    assert float(jnp.abs(grads["decoder_0"]["mlp"]["wo"]["b"]).max()) > 0
    with pytest.raises(ConfigError, match="choose among"):
        lora.LoRAConfig(targets=("embedding",))


def test_rl_with_lora_raises_toy_reward_with_one_copy_of_the_weights(tmp_path, tiny_config,
                                                                     tiny_params, one_device):
    from conftest import toy_task
    from musicrl_jax.models import lora
    config = lora.LoRAConfig(rank=4, alpha=16.0)
    task = toy_task()
    args = dict(lm_config=tiny_config, policy_params=tiny_params, reward_fn=toy_reward_fn,
                reward_params={"scale": jnp.asarray(REWARD_SCALE)},
                caption_source=task.train_source, rl_config=RL_CONFIG, tx=optax.adam(2e-2),
                captions_per_step=NUM_CAPTIONS, log_every=1, show_progress=False,
                mesh=one_device["mesh"], lora=config)
    result = rl.train_rl(num_steps=30, workdir=str(tmp_path / "lora"), **args)
    rows = [r for r in _read_jsonl(tmp_path / "lora" / "metrics.jsonl") if "eval" not in r]
    fraction = [r["reward/target_fraction_mean"] for r in rows]
    print(f"LoRA RL: target fraction {fraction[0]:.3f} -> {np.mean(fraction[-5:]):.3f}, "
          f"kl {rows[-1]['kl']:.2f}")
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # starts at the reference
    assert np.mean(fraction[-5:]) > 0.5 > np.mean(fraction[:3]) + 0.3, fraction
    assert max(r["kl"] for r in rows) < 60.0
    # The state holds only the adapters (and their optimizer moments), not a copy of the LM.
    state_size = lora.num_params(result["state"].params)
    assert state_size == lora.num_params(lora.init(config, tiny_params, jax.random.PRNGKey(0)))
    assert state_size < 0.25 * lora.num_params(tiny_params)
    policy = result["policy_params"]
    assert any(float(jnp.abs(a - b).max()) > 1e-3 for a, b in zip(
        jax.tree.leaves(policy), jax.tree.leaves(tiny_params)))
    # LoRA needs the policy to start at the reference.
    other = jax.tree.map(lambda x: x + 0.0, tiny_params)
    with pytest.raises(ConfigError, match="must start at the reference"):
        rl.train_rl(num_steps=1, workdir=str(tmp_path / "x"), reference_params=other, **args)


def test_a_rejected_rl_setting_stops_the_run_when_gin_is_parsed():
    from musicrl_jax.main import parse_gin
    with pytest.raises(ConfigError, match="E\\[k2\\] is not the KL"):
        parse_gin(["local/musicrl_u.gin"], ["RLConfig.kl_estimator = 'k2'"])
    import gin
    gin.clear_config()
    with pytest.raises(ConfigError, match="off-policy"):
        parse_gin(["local/musicrl_u.gin"], ["train_rl.rl_config = @hot/RLConfig()",
                                             "hot/RLConfig.sampling = @hot/SamplingConfig()",
                                             "hot/SamplingConfig.temperature = 0.7"])


def test_entropy_bonus_and_adaptive_beta_act_with_numbers(tiny_config, tiny_params):
    """The entropy bonus raises the policy's entropy (a flipped sign lowers it), and with a
    target KL the controller raises beta while the KL is above the target."""
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    captions = _captions(tiny_config)

    def run(steps, **options):
        config = rl.RLConfig(samples_per_caption=4, num_frames=8, **options)
        setup = _setup(tiny_config, tiny_params, mesh, config)
        return _train(setup, _fresh_state(setup), captions, steps)[1]

    plain = run(8, beta=0.0)[-1]["entropy"]  # the toy reward alone lowers the entropy
    raised = run(8, beta=0.0, entropy_bonus=5.0)[-1]["entropy"]
    lowered = run(8, beta=0.0, entropy_bonus=-5.0)[-1]["entropy"]
    print(f"entropy after 8 steps: no bonus {plain:.3f}, +5 {raised:.3f}, -5 {lowered:.3f}")
    assert raised > plain + 0.1 and lowered < plain - 0.1, (plain, raised, lowered)
    history = run(8, beta=0.1, target_kl=0.5, adaptive_kl_rate=0.5)
    betas, kls = [m["beta"] for m in history], [m["kl"] for m in history]
    print(f"adaptive beta {betas[0]:.3f} -> {betas[-1]:.3f} while kl {kls[0]:.2f} -> {kls[-1]:.2f}")
    assert betas[0] == pytest.approx(0.1)
    for before, after, kl in zip(betas, betas[1:], kls):
        assert (after > before) == (kl > 0.5), (betas, kls)


def test_ppo_clipping_holds_later_updates_near_the_sampling_policy(tiny_config, tiny_params):
    """Several large updates per batch: with per-token clipping the last update's tokens sit
    outside the clip range and the step moves the policy less than without it."""
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    captions = _captions(tiny_config)
    moved = {}
    for clip in (0.0, 0.1):
        config = rl.RLConfig(samples_per_caption=4, num_frames=8, beta=0.0,
                             updates_per_batch=6, ratio_clip=clip)
        setup = _setup(tiny_config, tiny_params, mesh, config, tx=optax.sgd(1.0))
        state, metrics = _run(setup, _fresh_state(setup), captions, jax.random.PRNGKey(3))
        metrics = rl.metrics_to_host(metrics)
        moved[clip] = float(optax.tree.norm(jax.tree.map(
            lambda a, b: a - b, jax.device_get(state.params), tiny_params)))
        assert metrics["clip_fraction"] == 0.0  # the first update is on-policy
        if clip:
            assert metrics["clip_fraction_last"] > 0.05, metrics
    print(f"params moved: unclipped {moved[0.0]:.3f}, clip 0.1 {moved[0.1]:.3f}")
    assert moved[0.1] < 0.8 * moved[0.0], moved


def test_optimizer_at_keeps_rl_scope_bindings_but_sets_the_learning_rate():
    """A study's per-run learning rate keeps RL's other optimizer settings (warm-up, decay)."""
    import gin
    from musicrl_jax.training import rl_finetune
    with gin.unlock_config():
        gin.parse_config(["rl/make_optimizer.learning_rate = 1e-3",
                          "rl/make_optimizer.warmup_steps = 5"])
    try:
        _, schedule = rl_finetune.optimizer_at(3e-4)(60)
    finally:
        gin.clear_config()
    assert float(schedule(0)) == 0.0  # the rl scope's warm-up
    np.testing.assert_allclose(float(schedule(5)), 3e-4, rtol=1e-6)
