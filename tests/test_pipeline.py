"""The demo's use of another pretraining run's LM (demo.pretrained_lm) instead of its own."""

import dataclasses

import gin
import jax
import numpy as np
import pytest

from conftest import TINY, toy_task
from musicrl_jax import pipeline
from musicrl_jax.errors import ConfigError
from musicrl_jax.training import trainer


def _bind_demo_lm(config):
    gin.parse_config([f"pretrain/MusicLMConfig.{field.name} = {getattr(config, field.name)!r}"
                      for field in dataclasses.fields(config)])


def _no_pretraining():
    raise AssertionError("the demo pretrained its own LM although a pretrained one was given")


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("other_pretraining"))
    result = trainer.train(task=toy_task(), workdir=workdir, num_steps=3, batch_size=8,
                           eval_every=3, checkpoint_every=3, show_progress=False)
    return workdir, result


def test_the_demo_takes_another_run_s_lm(other_run, tmp_path):
    workdir, result = other_run
    _bind_demo_lm(TINY)
    directory, config, params, step = pipeline.pretrained_lm_stage(
        _no_pretraining, str(tmp_path / "demo"), workdir)
    assert directory == workdir and step == 3 and config == TINY
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(result["state"].params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_another_run_on_other_tokens_is_a_clear_error(other_run, tmp_path):
    workdir, _ = other_run
    _bind_demo_lm(dataclasses.replace(TINY, codebook_size=64))
    with pytest.raises(ConfigError, match="pretrain that LM on this data"):
        pipeline.pretrained_lm_stage(_no_pretraining, str(tmp_path / "demo"), workdir)


def test_without_a_longer_run_the_demo_pretrains(tmp_path):
    # other_run's settings: the same compiled train and eval steps (compilation cache hits).
    gin.parse_config(["pretrain/train.num_steps = 3", "pretrain/train.batch_size = 8",
                      "pretrain/train.eval_every = 3", "pretrain/train.show_progress = False"])
    directory, config, _, step = pipeline.pretrained_lm_stage(
        toy_task, str(tmp_path / "demo"), str(tmp_path / "missing"))
    assert directory == str(tmp_path / "demo" / "pretrain") and step == 3 and config == TINY


def test_a_run_directory_refuses_another_lm(tmp_path):
    run_dir = str(tmp_path)
    pipeline.check_same_lm(run_dir, "runs/demo/pretrain", 1000)
    pipeline.check_same_lm(run_dir, "runs/demo/pretrain", 1000)  # a rerun: the same LM
    with pytest.raises(ConfigError, match="new run directory"):
        pipeline.check_same_lm(run_dir, "runs/other_pretraining", 1000)
    with pytest.raises(ConfigError, match="at step 1000"):
        pipeline.check_same_lm(run_dir, "runs/demo/pretrain", 1500)
