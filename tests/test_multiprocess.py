"""The multi-host code path on one machine: 2 JAX processes x 4 devices vs 1 process x 8."""

import os
import subprocess
import sys

import numpy as np

from musicrl_jax import main, partitioning
from musicrl_jax.checkpoints import Checkpointer, abstract_like
from musicrl_jax.training.trainer import read_metrics
from musicrl_jax.training import trainer
from musicrl_jax.training.tasks import MusicLMTask

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDINGS = ["NUM_STEPS=6", "BATCH_SIZE=16", "MAX_FRAMES=16", "toy_source.num_examples=64",
            "train.log_every=1", "train.eval_every=3", "train.checkpoint_every=3",
            "train.show_progress=False"]


def _losses(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


def test_two_processes_match_one_and_restore_in_one(tmp_path):
    args = ["--gin_file=local/pretrain.gin", *[f"--gin_bindings={b}" for b in BINDINGS]]
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    env = dict(os.environ, LOG_DIR=str(tmp_path / "logs"), PYTHON=sys.executable)
    # The two runs side by side (independent; they compile different programs).
    multi_run = subprocess.Popen(
        ["bash", "launch/local_run.sh", "2", "4", "--", *args,
         f"--gin_bindings=RUN_DIR='{multi}'"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    with open(tmp_path / "single.log", "wb") as log:
        single_run = subprocess.Popen(
            [sys.executable, "-m", "musicrl_jax.main", *args, f"--gin_bindings=RUN_DIR='{single}'"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, XLA_FLAGS=(
                "--xla_force_host_platform_device_count=8")))
    try:
        assert multi_run.wait(timeout=600) == 0, (
            tmp_path / "logs" / "process_0.log").read_text()[-3000:]
        assert single_run.wait(timeout=600) == 0, (tmp_path / "single.log").read_text()[-3000:]
    finally:  # after a failure: SIGTERM (the launcher's trap stops its processes too)
        for process in (multi_run, single_run):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=120)
    expected, got = _losses(single), _losses(multi)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)],
                               [expected[s] for s in range(1, 7)], rtol=1e-5)

    # The checkpoint the two processes wrote together restores in this single process.
    main.parse_gin(["local/pretrain.gin"], BINDINGS)
    task = MusicLMTask()
    mesh = partitioning.make_mesh()
    tx, _ = trainer.make_optimizer(total_steps=6)
    template, _ = trainer.create_train_state(task, tx, mesh, seed=0)
    abstract = abstract_like(template)
    state = Checkpointer(os.path.join(multi, "checkpoints"), kind="music_lm").restore(abstract)
    assert int(state.step) == 6
