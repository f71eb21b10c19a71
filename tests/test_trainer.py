import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import toy_task
from musicrl_jax import partitioning
from musicrl_jax.training.trainer import eval_history, read_metrics
from musicrl_jax.training import trainer


def _train(tmp_path, name, task, mesh, **kwargs):
    args = dict(num_steps=6, batch_size=8, eval_every=3, log_every=1, checkpoint_every=100,
                show_progress=False)
    args.update(kwargs)
    return trainer.train(task=task, workdir=str(tmp_path / name), mesh=mesh, **args)


def _losses(tmp_path, name):
    return {row["step"]: row["loss"] for row in read_metrics(str(tmp_path / name))
            if "loss" in row}


def test_one_device_and_eight_device_runs_agree(tmp_path):
    task = toy_task()
    one = partitioning.make_mesh(devices=jax.devices()[:1])
    eight = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    result_one = _train(tmp_path, "one", task, one)
    result_eight = _train(tmp_path, "eight", task, eight)
    losses_one, losses_eight = _losses(tmp_path, "one"), _losses(tmp_path, "eight")
    assert sorted(losses_one) == list(range(1, 7))
    for step in losses_one:
        np.testing.assert_allclose(losses_eight[step], losses_one[step], rtol=2e-5)
    np.testing.assert_allclose(result_eight["eval"]["loss"], result_one["eval"]["loss"], rtol=2e-5)
    # The training state stays sharded through the jitted step (not gathered to one device).
    kernel = result_eight["state"].params["decoder_0"]["mlp"]["wi_gate"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    moment = result_eight["state"].opt_state[1][0].mu["decoder_0"]["mlp"]["wi_gate"]
    assert moment.sharding.spec == kernel.sharding.spec


def test_gradient_accumulation_equals_one_large_batch():
    task = toy_task(caption_dropout=0.0)
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    tx, _ = trainer.make_optimizer(total_steps=10, warmup_steps=0)
    batch = task.train_source.train_batch(0, 16)
    results = []
    for accum in (1, 2):
        state, shardings = trainer.create_train_state(task, tx, mesh, seed=0)
        with partitioning.mesh_context(mesh):
            step = trainer.jit_train_step(trainer.make_train_step(task, tx, 0, accum), shardings,
                                          mesh, batch)
            state, metrics = step(state, partitioning.shard_batch(batch, mesh))
        results.append((jax.device_get(state.params), float(metrics["loss"])))
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 results[1][0], results[0][0])


def test_pretraining_lowers_validation_loss(tmp_path):
    import gin
    gin.bind_parameter("make_optimizer.learning_rate", 3e-3)
    gin.bind_parameter("make_optimizer.warmup_steps", 10)
    mesh = partitioning.make_mesh(data=4, fsdp=2, tensor=1)
    _train(tmp_path, "pretrain", toy_task(num_train=512), mesh, num_steps=120, batch_size=16,
           eval_every=60, log_every=20)
    history = eval_history(str(tmp_path / "pretrain"))
    assert sorted(history) == [0, 60, 120]
    assert history[120]["loss"] < 0.5 * history[0]["loss"], history
    assert (tmp_path / "pretrain" / "config.gin").read_text().count("make_optimizer") > 0


class _DivergingTask:
    """Wraps a task so its loss turns NaN: the loop must stop and name the step and metric."""

    def __init__(self, task):
        self.task, self.kind = task, task.kind
        self.train_source, self.eval_source = task.train_source, task.eval_source

    def init_params(self, rng):
        return self.task.init_params(rng)

    def loss(self, params, batch, rng):
        loss_sum, weight, sums = self.task.loss(params, batch, rng)
        return loss_sum * jnp.nan, weight, {"loss": loss_sum * jnp.nan}


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    mesh = partitioning.make_mesh()
    with pytest.raises(trainer.TrainingDivergedError, match="step 1: non-finite .*loss=nan"):
        _train(tmp_path, "nan", _DivergingTask(toy_task()), mesh, eval_every=0)


def test_bad_batch_and_accumulation_sizes_are_clear_errors(tmp_path):
    from musicrl_jax.errors import ConfigError
    mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(ConfigError, match="train.batch_size=6"):
        _train(tmp_path, "bad", toy_task(), mesh, batch_size=6)
    with pytest.raises(ConfigError, match="grad_accum_steps=4"):
        _train(tmp_path, "bad", toy_task(), mesh, batch_size=8, grad_accum_steps=4)
