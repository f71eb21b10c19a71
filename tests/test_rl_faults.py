"""Numerical faults in RL: a NaN/Inf reward or an overflowing log-ratio stops the run naming the
step and the component, with nothing of that state saved; RLConfig.nonfinite='drop' leaves
those samples out of the update instead and counts them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer, abstract_like
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import rl
from musicrl_jax.training.trainer import TrainingDivergedError

import test_rl  # tests/test_rl.py: captions, the toy reward

POISON = 0  # a first caption token _captions never draws (it draws 2..vocab-1)
CAPTIONS = test_rl.NUM_CAPTIONS
SAMPLES = CAPTIONS * 4  # samples_per_caption = 4
STOP = rl.RLConfig(samples_per_caption=4, beta=0.1, num_frames=8)
DROP = rl.RLConfig(samples_per_caption=4, beta=0.1, num_frames=8, nonfinite="drop")


def nan_reward_fn(params, caption_tokens, audio_codes, audio_mask=None):
    """The toy reward, NaN for the samples of a caption that starts with POISON."""
    _, parts = test_rl.toy_reward_fn(params, caption_tokens, audio_codes)
    fraction = jnp.where(caption_tokens[:, 0] == POISON, jnp.nan, parts["target_fraction"])
    return params["scale"] * fraction, {"target_fraction": fraction}


class CaptionsPoisonedAt:
    """A caption source whose batch for step `poisoned` (1-based, as the loop reports steps)
    starts its first caption with POISON."""

    def __init__(self, config, poisoned: int | None):
        self.config, self.poisoned = config, poisoned

    def train_batch(self, step, batch_size):
        captions = test_rl._captions(self.config, batch_size, seed=step)
        if step + 1 == self.poisoned:
            captions[0, 0] = POISON
        return {"caption_tokens": captions}


@pytest.fixture(scope="module")
def mesh():
    return partitioning.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def stop_step(tiny_config, tiny_params, mesh):
    return _step(tiny_config, tiny_params, mesh, STOP)


@pytest.fixture(scope="module")
def drop_step(tiny_config, tiny_params, mesh):
    return _step(tiny_config, tiny_params, mesh, DROP)


def _step(config, params, mesh, rl_config):
    tx = optax.adam(5e-3)
    with partitioning.mesh_context(mesh):
        state, state_shardings, param_shardings = rl.create_rl_state(config, tx, params, mesh,
                                                                     rl_config)
        reference = jax.device_put(params, param_shardings)
        step = rl.jit_rl_step(rl.make_rl_step(config, tx, nan_reward_fn, rl_config),
                              state_shardings, param_shardings, mesh, donate_state=False)
    reward_params = {"scale": jnp.asarray(test_rl.REWARD_SCALE)}

    def run(captions, seed=0):
        with partitioning.mesh_context(mesh):
            captions = jax.device_put(captions, partitioning.batch_sharding(mesh, 2))
            new, metrics = step(state, reference, reward_params, captions,
                                jax.random.PRNGKey(seed))
        return state, new, rl.metrics_to_host(metrics)

    return run


def _poisoned_captions(config):
    captions = test_rl._captions(config)
    captions[1, 0] = POISON  # the second caption: samples 4..7
    return captions


def _finite(tree):
    return all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(tree)))


# --- the config ----------------------------------------------------------------------------

def test_an_unknown_nonfinite_setting_is_rejected():
    with pytest.raises(ConfigError, match=r"RLConfig.nonfinite='skip'; expected one of "
                                          r"\['stop', 'drop'\]"):
        rl.RLConfig(nonfinite="skip")


# --- detection and masking on arrays -------------------------------------------------------

def test_faults_are_found_per_sample_and_component():
    mask = jnp.array([[[True, True], [True, False]]])  # [1, L=2, K=2]
    policy = jnp.full((5, 2, 2), -1.0)
    reference = jnp.full((5, 2, 2), -2.0)
    reference = reference.at[1, 0, 1].set(-np.inf)  # k1 infinite
    reference = reference.at[2, 0, 0].set(100.0)  # finite, but exp(100) overflows float32
    reference = reference.at[3, 1, 1].set(np.nan)  # off the mask: ignored
    policy = policy.at[4, 1, 0].set(np.nan)
    total = jnp.array([1.0, 2.0, np.inf, 0.0, 1.0])
    components = {"quality": jnp.array([np.nan, 0.5, 0.5, 0.5, 0.5])}
    faults = jax.device_get(rl.nonfinite_by_component(components, total, policy, reference,
                                                      mask))
    np.testing.assert_array_equal(faults["reward/quality"], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(faults["reward"], [0, 0, 1, 0, 0])
    np.testing.assert_array_equal(faults["log_ratio"], [0, 1, 1, 0, 1])
    # A log-ratio of 81 still exponentiates (and sums: 3 tokens); a very negative one only
    # makes exp underflow.
    clean = jnp.full((5, 2, 2), -1.0)
    for fine in (clean + 82.0, clean - 1e30):
        assert not rl.nonfinite_by_component({}, total, clean, fine, mask)["log_ratio"].any()
    # Finite per token, but their sum (the sequence's k1) or exp-sum (k3) overflows.
    for overflowing in (clean - 2e38, clean + 88.5):
        assert rl.nonfinite_by_component({}, total, clean, overflowing, mask)[
            "log_ratio"].all()


@pytest.mark.parametrize("baseline", ["none", "batch_mean", "rloo", "group_mean", "group_norm"])
def test_advantages_of_valid_samples_ignore_the_others(baseline):
    rewards = jnp.array([1.0, np.nan, 3.0, 0.5, 2.0, -1.0, np.inf, 4.0])
    valid = jnp.isfinite(rewards)
    got = rl.advantages(rewards, 4, baseline, valid=valid)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(valid)], 0.0)
    # Each group's valid samples get the advantages of a group made of them alone.
    for group in (jnp.array([1.0, 3.0, 0.5]), jnp.array([2.0, -1.0, 4.0])):
        alone = rl.advantages(group, 3, baseline)
        if baseline == "batch_mean":
            alone = group - jnp.array([1.0, 3.0, 0.5, 2.0, -1.0, 4.0]).mean()
        shown = got[:4][valid[:4]] if group[0] == 1.0 else got[4:][valid[4:]]
        np.testing.assert_allclose(shown, alone, rtol=1e-6, atol=1e-6)
    mean, std = rl.masked_mean_std(jnp.array([1.0, np.nan, 3.0, -np.inf]),
                                   jnp.array([True, False, True, False]))
    assert (float(mean), float(std)) == (2.0, 1.0)
    # A group left with one valid sample has no baseline: advantage 0 (not 0/0).
    lone = rl.advantages(jnp.array([2.0, np.nan]), 2, "rloo", valid=jnp.array([True, False]))
    np.testing.assert_array_equal(lone, [0.0, 0.0])


@pytest.mark.parametrize("options", [
    dict(kl_mode="reward", kl_estimator="k1"),
    dict(kl_mode="loss", kl_estimator="k3", reward_normalization="batch_whiten"),
    dict(kl_mode="reward", kl_estimator="k3", reward_normalization="batch_whiten"),
])
def test_dropped_samples_leave_the_loss_of_the_kept_ones(options):
    """A dropped group (NaN rewards, NaN/Inf reference log-probs) changes neither the loss nor
    its gradient beyond the 1/B of the sequence_sum mean: they equal the kept samples' own,
    scaled by kept/B, and stay finite (NaN * 0 would not)."""
    cfg = rl.RLConfig(samples_per_caption=2, beta=0.3, **options)
    rng = np.random.default_rng(0)
    shape = (6, 3, 2)  # 3 groups of 2 samples, L=3, K=2
    logits = jnp.asarray(rng.normal(size=shape + (5,)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 5, shape))
    ref_lp = jnp.asarray(rng.normal(size=shape) - 2.0, jnp.float32)
    rewards = jnp.asarray(rng.normal(size=6), jnp.float32)
    entropy = jnp.ones(shape)
    mask = jnp.ones((1, 3, 2), bool)
    # The middle group is unusable.
    ref_lp = ref_lp.at[2, 0, 0].set(np.nan).at[3, 1, 1].set(np.inf)
    rewards = rewards.at[2].set(np.nan)
    keep = jnp.array([True, True, False, False, True, True])

    def loss(theta, rows, keep):
        token_lp = jnp.take_along_axis(jax.nn.log_softmax(theta[rows]), tokens[rows, ..., None],
                                       -1)[..., 0]
        return rl.rl_loss(cfg, token_lp, jax.lax.stop_gradient(token_lp), ref_lp[rows],
                          entropy[rows], mask, rewards[rows], 0.3, keep)

    all_rows, kept_rows = np.arange(6), np.array([0, 1, 4, 5])
    (value, aux), grad = jax.value_and_grad(loss, has_aux=True)(logits, all_rows, keep)
    (alone, alone_aux), alone_grad = jax.value_and_grad(loss, has_aux=True)(logits, kept_rows,
                                                                             None)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(value, alone * 4 / 6, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["kl_loss"], alone_aux["kl_loss"] * 4 / 6, rtol=1e-5)
    np.testing.assert_allclose(grad[kept_rows], alone_grad[kept_rows] * 4 / 6, rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_array_equal(grad[2:4], 0.0)


# --- the jitted step -----------------------------------------------------------------------

def test_a_step_with_a_nan_reward_keeps_its_state_and_counts_the_samples(tiny_config,
                                                                        stop_step):
    state, new, metrics = stop_step(_poisoned_captions(tiny_config))
    assert metrics["nonfinite/reward/target_fraction"] == metrics["nonfinite_samples"] == 4
    assert metrics["nonfinite/log_ratio"] == 0
    assert metrics["nonfinite/update"] == 1  # the NaN rewards made the loss NaN
    # Not applied: the state it returns is the one it started from, bit for bit.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new), jax.device_get(state))


def test_drop_mode_updates_on_the_finite_samples_and_counts_the_others(tiny_config, stop_step,
                                                                       drop_step):
    state, new, metrics = drop_step(_poisoned_captions(tiny_config))
    assert metrics["nonfinite_samples"] == metrics["nonfinite/reward/target_fraction"] == 4
    assert metrics["nonfinite/update"] == 0 and int(new.step) == 1
    assert _finite(new.params)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                           jax.device_get(new.params),
                                           jax.device_get(state.params)))
    assert any(changed)
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    # With nothing to drop, 'drop' takes the step 'stop' takes.
    _, clean_drop, drop_metrics = drop_step(test_rl._captions(tiny_config))
    _, clean_stop, stop_metrics = stop_step(test_rl._captions(tiny_config))
    assert drop_metrics["nonfinite_samples"] == 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(clean_drop.params), jax.device_get(clean_stop.params))
    for key in ("reward_mean", "kl", "pg_loss", "grad_norm", "advantage_std"):
        assert drop_metrics[key] == pytest.approx(stop_metrics[key], rel=1e-5, abs=1e-7), key


# --- the loop ------------------------------------------------------------------------------

def _train(tmp_path, tiny_config, tiny_params, mesh, name, poisoned, rl_config, **options):
    args = dict(lm_config=tiny_config, policy_params=tiny_params, reward_fn=nan_reward_fn,
                reward_params={"scale": jnp.asarray(test_rl.REWARD_SCALE)},
                caption_source=CaptionsPoisonedAt(tiny_config, poisoned), rl_config=rl_config,
                tx=optax.adam(5e-3), captions_per_step=CAPTIONS, num_steps=6, log_every=10,
                checkpoint_every=2, show_progress=False, mesh=mesh,
                workdir=str(tmp_path / name))
    return rl.train_rl(**{**args, **options})


def _rows(path):
    with open(path) as f:
        return {row["step"]: row for row in map(json.loads, f) if "eval" not in row}


def test_a_nan_reward_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, tiny_config, tiny_params, mesh):
    # Step 3 is neither logged (log_every=10) nor saved (every 2): the fault is read before
    # step 4's checkpoint, which must not be written.
    with pytest.raises(TrainingDivergedError) as err:
        _train(tmp_path, tiny_config, tiny_params, mesh, "stop", 3, STOP)
    message = str(err.value)
    assert message.startswith("RL step 3: reward 'target_fraction' returned NaN/Inf for 4 of "
                              f"{SAMPLES} samples. Its update was not applied"), message
    assert "the latest checkpoint, step 2, is the last good state" in message
    assert "RLConfig.nonfinite = 'drop'" in message
    checkpoints = Checkpointer(str(tmp_path / "stop" / "checkpoints"), kind="music_rl")
    assert checkpoints.latest_step() == 2
    template = rl.create_rl_state(tiny_config, optax.adam(5e-3), tiny_params, mesh, STOP)
    restored = checkpoints.restore(abstract_like(template[0], template[1]))
    assert int(restored.step) == 2 and _finite(restored)


def test_drop_mode_runs_through_a_nan_reward_and_logs_the_dropped_samples(
        tmp_path, tiny_config, tiny_params, mesh):
    result = _train(tmp_path, tiny_config, tiny_params, mesh, "drop", 3, DROP, log_every=1)
    assert result["step"] == 6 and _finite(result["state"].params)
    rows = _rows(tmp_path / "drop" / "metrics.jsonl")
    assert {step: rows[step]["nonfinite_samples"] for step in rows} == {
        1: 0, 2: 0, 3: 4, 4: 0, 5: 0, 6: 0}
    assert rows[3]["nonfinite/reward/target_fraction"] == 4
    assert np.isfinite(rows[3]["reward_mean"]) and np.isfinite(rows[3]["grad_norm"])


def test_an_overflowing_log_ratio_stops_the_run_before_any_checkpoint(
        tmp_path, tiny_config, tiny_params, mesh):
    # A reference whose output heads are scaled to float32's edge: its log-probs reach
    # -1e38 or -Inf, so the log-ratio's sums (the KL estimates) overflow.
    reference = {**tiny_params, "heads": tiny_params["heads"] * 1e38}
    with pytest.raises(TrainingDivergedError) as err:
        _train(tmp_path, tiny_config, tiny_params, mesh, "ratio", None, STOP,
               reference_params=reference)
    message = str(err.value)
    assert message.startswith(f"RL step 1: the policy/reference log-ratio overflowed (NaN/Inf, "
                              f"or beyond exp's float32 range) for {SAMPLES} of {SAMPLES} "
                              "samples"), message
    assert "no checkpoint was written yet" in message and "raise RLConfig.beta" in message
    assert Checkpointer(str(tmp_path / "ratio" / "checkpoints")).latest_step() is None


# --- the host's reading of the counts ------------------------------------------------------

def _counts(**nonzero):
    counts = {"nonfinite/reward/quality": 0, "nonfinite/reward": 0, "nonfinite/log_ratio": 0,
              "nonfinite_samples": 0, "nonfinite/update": 0, "nonfinite/importance_ratio": 0}
    counts.update({k.replace("__", "/"): v for k, v in nonzero.items()})
    return {k: jnp.asarray(v, jnp.int32) for k, v in counts.items()}


def test_the_first_faulty_step_is_reported_with_each_component():
    cfg = rl.RLConfig(updates_per_batch=3, samples_per_caption=4)
    unread = [(5, _counts()),
              (6, {**_counts(nonfinite__importance_ratio=1, nonfinite__update=2)}),
              (7, _counts(nonfinite__reward=2, nonfinite_samples=2))]
    with pytest.raises(TrainingDivergedError, match=(
            r"^RL step 6: the importance ratio pi/pi_old overflowed in 1 of the 2 later "
            r"updates; the loss or gradient norm was NaN/Inf in 2 of 3 updates\. Its update "
            r"was not applied and nothing from step 6 on was saved: the latest checkpoint, "
            r"step 4, is the last good state\. Fix: if the policy diverged")):
        rl.raise_on_nonfinite(unread, cfg, 32, 4)
    assert unread == []
    with pytest.raises(TrainingDivergedError, match=r"^RL step 7: the combined reward was "
                                                    r"NaN/Inf \(its components finite\)"):
        rl.raise_on_nonfinite([(7, _counts(nonfinite__reward=2, nonfinite_samples=2))], cfg,
                              32, None)


def test_drop_mode_logs_dropped_samples_but_stops_on_a_broken_update(caplog):
    cfg = rl.RLConfig(samples_per_caption=4, nonfinite="drop")
    counts = _counts(nonfinite__reward__quality=3, nonfinite__reward=3, nonfinite_samples=3)
    with caplog.at_level("WARNING"):
        rl.raise_on_nonfinite([(7, counts)], cfg, 32, 6)
    assert ("RL step 7: dropped 3 of 32 samples: reward 'quality' returned NaN/Inf for 3 of 32 "
            "samples.") in caplog.text
    with pytest.raises(TrainingDivergedError, match=r"^RL step 8: the loss or gradient norm was "
                                                    r"NaN/Inf in 1 of 1 updates"):
        rl.raise_on_nonfinite([(8, _counts(nonfinite__update=1))], cfg, 32, 6)
