"""Reward scorers: restore from checkpoints, clear errors, one jitted combination on a mesh."""

import json
import os

import gin
import jax
import numpy as np
import pytest

from conftest import TINY
from musicrl_jax import partitioning, rewards
from musicrl_jax.checkpoints import Checkpointer
from musicrl_jax.data import toy
from musicrl_jax.data.sources import ArraySource
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import trainer
from musicrl_jax.training.reward_tasks import (PreferenceRewardTask, QualityRewardTask,
                                               TextRewardTask)

TASKS = {"text": TextRewardTask(config=TINY, num_audio_layers=1, projection_dim=16),
         "quality": QualityRewardTask(config=TINY, num_audio_layers=1),
         "preference": PreferenceRewardTask(config=TINY, num_audio_layers=1, use_caption=True)}


def _write_checkpoint(task, workdir, seed):
    """What `trainer.train` leaves behind, without the training steps (params at init)."""
    mesh = partitioning.make_mesh(data=1, devices=jax.devices()[:1])
    tx, _ = trainer.make_optimizer(total_steps=1)
    with partitioning.mesh_context(mesh):
        state, _ = trainer.create_train_state(task, tx, mesh, seed)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), kind=task.kind)
    checkpointer.save(1, state, force=True)
    checkpointer.close()
    return jax.device_get(state.params)


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_runs")
    saved = {}
    for seed, (name, task) in enumerate(TASKS.items()):
        saved[name] = (str(root / name), _write_checkpoint(task, str(root / name), seed))
    return saved


def _clips(batch=8, seed=0):
    arrays = toy.toy_examples(batch, TINY.max_frames, TINY.num_codebooks, TINY.codebook_size,
                              TINY.max_caption_length, noise=0.1, seed=seed)
    mask = np.ones((batch, TINY.max_frames), np.int32)
    mask[1, 9:] = 0  # one shorter clip
    return arrays["caption_tokens"], arrays["audio_codes"], mask


def _mesh_8():
    return partitioning.make_mesh(data=2, fsdp=2, tensor=2)


def test_three_scorers_in_one_jit_on_sharded_mesh_match_unsharded(reward_dirs, tmp_path):
    mesh = _mesh_8()
    models = {name: rewards.load_reward_model(TASKS[name], reward_dirs[name][0], mesh=mesh)
              for name in TASKS}
    # Restored params equal what was saved, and are sharded by the logical rules.
    for name, model in models.items():
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params),
                     reward_dirs[name][1])
    table = models["quality"].params["audio_tower"]["layer_0"]["mlp"]["wi_gate"]
    assert table.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")

    ref_captions, ref_codes, ref_mask = _clips(seed=1)
    reference = ArraySource({"caption_tokens": ref_captions, "audio_codes": ref_codes,
                             "audio_mask": ref_mask})
    stats_path = str(tmp_path / "reference_stats.json")
    weights = {"text": 1.0, "quality": 0.5, "preference": 2.0}
    combination = rewards.RewardCombination(models, weights, stats_path=stats_path,
                                            reference_source=reference, reference_batch_size=8,
                                            mesh=mesh)
    stored = json.load(open(stats_path))
    assert set(stored) == set(TASKS) and all(s["count"] == 8 for s in stored.values())

    captions, codes, mask = _clips()
    total, raw = combination(captions, codes, mask)
    assert total.shape == (8,) and total.sharding.is_fully_replicated

    unsharded = jax.jit(combination.reward_fn)
    unsharded_params = jax.device_get(combination.params)
    expected_total, expected_raw = unsharded(unsharded_params, captions, codes, mask)
    np.testing.assert_allclose(np.asarray(total), np.asarray(expected_total), rtol=1e-4,
                               atol=1e-4)
    for name in TASKS:
        np.testing.assert_allclose(np.asarray(raw[name]), np.asarray(expected_raw[name]),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(total), sum(w * (np.asarray(raw[n]) - stored[n]["mean"]) / stored[n]["std"]
                               for n, w in weights.items()), rtol=1e-4, atol=1e-4)
    # Normalised by the reference set: over it, each reward has mean 0 and std 1.
    _, raw_ref = unsharded(unsharded_params, ref_captions, ref_codes, ref_mask)
    for name, stats in stored.items():
        normalised = (np.asarray(raw_ref[name]) - stats["mean"]) / stats["std"]
        assert abs(normalised.mean()) < 1e-3 and abs(normalised.std() - 1) < 1e-3
    # Cosine similarity is bounded; the quality model predicts on the 1-5 scale.
    assert np.all(np.abs(np.asarray(raw["text"])) <= 1.0 + 1e-5)
    assert np.all((np.asarray(raw["quality"]) >= 1) & (np.asarray(raw["quality"]) <= 5))

    # A second combination reads the stored statistics instead of recomputing them.
    again = rewards.RewardCombination(models, weights, stats_path=stats_path)
    assert again.stats == stored


def test_musicrl_r_and_u_are_gin_configs(reward_dirs):
    gin.parse_config(f"""
        from musicrl_jax import rewards
        from musicrl_jax.training import reward_tasks
        text/TextRewardTask.num_audio_layers = 1
        text/TextRewardTask.projection_dim = 16
        quality/QualityRewardTask.num_audio_layers = 1
        text_model/load_reward_model.task = @text/TextRewardTask()
        text_model/load_reward_model.checkpoint_dir = '{reward_dirs["text"][0]}'
        quality_model/load_reward_model.task = @quality/QualityRewardTask()
        quality_model/load_reward_model.checkpoint_dir = '{reward_dirs["quality"][0]}'
        musicrl_r/RewardCombination.rewards = {{
            'text': @text_model/load_reward_model(), 'quality': @quality_model/load_reward_model()}}
        musicrl_r/RewardCombination.weights = {{'text': 1.0, 'quality': 1.0}}
        musicrl_r/RewardCombination.reference_stats = {{
            'text': {{'mean': 0.0, 'std': 0.5}}, 'quality': {{'mean': 3.0, 'std': 1.0}}}}
    """)
    gin.bind_parameter("TextRewardTask.config", TINY)
    gin.bind_parameter("QualityRewardTask.config", TINY)
    with gin.config_scope("musicrl_r"):
        combination = rewards.RewardCombination()
    captions, codes, _ = _clips(4)
    total, raw = combination(captions, codes)
    expected = raw["text"] / 0.5 + (raw["quality"] - 3.0)
    np.testing.assert_allclose(np.asarray(total), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_missing_wrong_kind_and_empty_checkpoints_are_clear(reward_dirs, tmp_path):
    with pytest.raises(ConfigError, match="No quality_reward checkpoint directory at .*nowhere"):
        rewards.load_reward_model(TASKS["quality"], str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "nowhere")  # a typo is not turned into a directory
    with pytest.raises(ConfigError, match="holds a 'text_reward' model, but a 'quality_reward' "
                                          "model was expected"):
        rewards.load_reward_model(TASKS["quality"], reward_dirs["text"][0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="No complete checkpoint"):
        rewards.load_reward_model(TASKS["preference"], str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not a reward task"):
        rewards.load_reward_model(object(), reward_dirs["text"][0])


def test_tokens_outside_the_vocabulary_are_rejected_before_jit(reward_dirs):
    model = rewards.load_reward_model(TASKS["quality"], reward_dirs["quality"][0])
    combination = rewards.RewardCombination(
        {"quality": model}, {"quality": 1.0},
        reference_stats={"quality": {"mean": 3.0, "std": 1.0}})
    captions, codes, _ = _clips(4)
    codes = codes.copy()
    codes[2, 5, 1] = TINY.codebook_size
    with pytest.raises(ConfigError, match=r"audio_codes hold id 32 at index \(2, 5, 1\), "
                                          r"outside the model's vocabulary \[0, 32\)"):
        combination(captions, codes)
    captions = captions.copy()
    captions[0, 0] = TINY.caption_vocab_size + 3
    with pytest.raises(ConfigError, match="caption_tokens hold id 67"):
        rewards.validate_tokens(TINY, captions, codes[:, :, :] % TINY.codebook_size)
    with pytest.raises(ConfigError, match=r"expected \[batch, frames, 2\]"):
        rewards.validate_tokens(TINY, captions, codes[:, :, :1])
    with pytest.raises(ConfigError, match="weights name"):
        rewards.RewardCombination({"quality": model}, {"text": 1.0},
                                  reference_stats={"quality": {"mean": 0.0, "std": 1.0}})


def test_reward_task_without_data_says_which_binding_is_missing():
    with pytest.raises(ConfigError, match="train_source is not bound"):
        TextRewardTask(config=TINY).train_source.train_batch(0, 8)


def test_rl_step_with_the_sharded_reward_combination_matches_one_device(reward_dirs, tiny_params):
    """The real reward combination (three restored reward models) sharded over the 8-device
    mesh inside the jitted RL step: the same rewards, metrics and update as on one device."""
    import optax

    from musicrl_jax.training import rl
    rl_config = rl.RLConfig(samples_per_caption=2, baseline="rloo", kl_mode="reward",
                            kl_estimator="k1", beta=0.1, num_frames=8)
    weights = {"text": 1.0, "quality": 0.5, "preference": 2.0}
    stats = {name: {"mean": 0.1 * i, "std": 0.5 + i} for i, name in enumerate(TASKS)}
    captions = _clips(batch=4)[0]
    results = {}
    for name, mesh in (("one", partitioning.make_mesh(devices=jax.devices()[:1])),
                       ("eight", _mesh_8())):
        models = {n: rewards.load_reward_model(TASKS[n], reward_dirs[n][0], mesh=mesh)
                  for n in TASKS}
        combination = rewards.RewardCombination(models, weights, reference_stats=stats,
                                                mesh=mesh)
        tx = optax.adam(1e-2)
        with partitioning.mesh_context(mesh):
            state, state_shardings, param_shardings = rl.create_rl_state(
                TINY, tx, tiny_params, mesh, rl_config)
            reference = jax.device_put(tiny_params, param_shardings)
            reward_shardings = rl.existing_shardings(combination.params, mesh)
            step = rl.jit_rl_step(rl.make_rl_step(TINY, tx, combination.reward_fn, rl_config),
                                  state_shardings, param_shardings, mesh, reward_shardings)
            batch = jax.device_put(captions, partitioning.batch_sharding(mesh, 2))
            state, metrics = step(state, reference, combination.params, batch,
                                  jax.random.PRNGKey(3))
        results[name] = (jax.device_get(state.params), rl.metrics_to_host(metrics))
    # The step really took the reward models sharded, not replicated copies.
    spec = reward_shardings["quality"]["audio_tower"]["layer_0"]["mlp"]["wi_gate"].spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    (params_one, metrics_one), (params_eight, metrics_eight) = results["one"], results["eight"]
    assert metrics_one["grad_norm"] > 0 and abs(metrics_one["reward_mean"]) > 1e-4
    for key, value in metrics_one.items():
        np.testing.assert_allclose(metrics_eight[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 params_eight, params_one)
