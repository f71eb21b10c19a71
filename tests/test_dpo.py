import json
import math
import os

import gin
import jax
import numpy as np
import pytest

from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer
from musicrl_jax.data import feedback
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import dpo, trainer
from musicrl_jax.training.rl_finetune import restore_policy_params


def _preferences(config, split, count):
    return feedback.simulated_source(
        "preferences", split=split, num_examples=count, num_frames=config.max_frames,
        num_codebooks=config.num_codebooks, codebook_size=config.codebook_size,
        caption_length=config.max_caption_length)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tiny_config):
    """A 'music_lm' checkpoint of the tiny LM (the policy's start and the reference)."""
    from conftest import toy_task
    task = toy_task()
    mesh = partitioning.make_mesh(devices=jax.devices()[:1])
    tx, _ = trainer.make_optimizer(total_steps=1)
    with partitioning.mesh_context(mesh):
        state, _ = trainer.create_train_state(task, tx, mesh, seed=0)
    path = str(tmp_path_factory.mktemp("pretrain"))
    checkpointer = Checkpointer(os.path.join(path, "checkpoints"), kind="music_lm")
    checkpointer.save(1, state, force=True)
    checkpointer.close()
    return path


def _read_evals(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["eval"] for r in rows if "eval" in r}


@pytest.mark.parametrize("loss_type", ["dpo", "ipo"])
def test_dpo_learns_the_preferences_from_the_reference(tmp_path, tiny_config, pretrained_dir,
                                                       loss_type):
    task = dpo.DPOTask(train_source=_preferences(tiny_config, "train", 1024),
                       eval_source=_preferences(tiny_config, "validation", 256),
                       init_checkpoint=pretrained_dir, config=tiny_config, beta=0.5,
                       loss_type=loss_type)
    workdir = str(tmp_path / loss_type)
    gin.bind_parameter("make_optimizer.learning_rate", 3e-4)
    gin.bind_parameter("make_optimizer.warmup_steps", 10)
    trainer.train(task=task, workdir=workdir, num_steps=80, batch_size=32, eval_every=40,
                  log_every=20, checkpoint_every=40, show_progress=False,
                  mesh=partitioning.make_mesh(devices=jax.devices()[:1]))
    evals = _read_evals(workdir)
    print(loss_type, {s: (round(e["agreement"], 3), round(e["loss"], 3))
                      for s, e in evals.items()})
    # At the start the policy is the reference: every margin is 0.
    assert evals[0]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert evals[0]["agreement"] == pytest.approx(0.5)  # no margin: no side taken
    start_loss = math.log(2.0) if loss_type == "dpo" else None
    if start_loss is not None:
        assert evals[0]["loss"] == pytest.approx(start_loss, abs=1e-4)
    assert evals[80]["agreement"] > 0.65 and evals[80]["loss"] < evals[0]["loss"], evals
    # The result is a policy checkpoint: RL, evaluation and export restore it by kind.
    params = restore_policy_params(tiny_config, workdir,
                                   partitioning.make_mesh(devices=jax.devices()[:1]))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(task._reference))]
    assert max(moved) > 1e-3


def test_dpo_losses_match_their_definitions():
    margin = np.array([0.0, 2.0, -1.0])
    prob_a = np.array([1.0, 0.0, 0.5])
    dpo_loss = dpo.preference_loss(margin, prob_a, 0.5, "dpo")
    np.testing.assert_allclose(dpo_loss, [math.log(2.0), math.log1p(math.exp(1.0)),
                                          0.5 * math.log1p(math.exp(0.5))
                                          + 0.5 * math.log1p(math.exp(-0.5))], rtol=1e-6)
    ipo_loss = dpo.preference_loss(margin, prob_a, 0.5, "ipo")
    np.testing.assert_allclose(ipo_loss, [1.0, 9.0, 1.0], rtol=1e-6)


def test_dpo_refuses_bad_settings(tiny_config, pretrained_dir):
    source = _preferences(tiny_config, "train", 8)
    with pytest.raises(ConfigError, match="loss_type='kto'"):
        dpo.DPOTask(train_source=source, eval_source=source, init_checkpoint=pretrained_dir,
                    config=tiny_config, loss_type="kto")
    ratings = feedback.simulated_source("ratings", num_examples=8,
                                        num_frames=tiny_config.max_frames,
                                        num_codebooks=tiny_config.num_codebooks,
                                        codebook_size=tiny_config.codebook_size,
                                        caption_length=tiny_config.max_caption_length)
    with pytest.raises(ConfigError, match="lacks \\['tokens_a', 'tokens_b', 'choice'\\]"):
        dpo.DPOTask(train_source=ratings, eval_source=source, init_checkpoint=pretrained_dir,
                    config=tiny_config)
