import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import toy_task
from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer, abstract_like
from musicrl_jax.errors import ConfigError
from musicrl_jax.training.trainer import read_metrics
from musicrl_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(run_dir):
    bindings = [f"RUN_DIR='{run_dir}'", "NUM_STEPS=40", "BATCH_SIZE=16", "MAX_FRAMES=16",
                "train.checkpoint_every=10", "train.log_every=1", "train.eval_every=0",
                "train.show_progress=False", "make_mesh.data=4", "make_mesh.fsdp=2",
                "toy_source.num_examples=96"]
    return [sys.executable, "-m", "musicrl_jax.main", "--gin_file=local/pretrain.gin",
            *[f"--gin_bindings={b}" for b in bindings]]


def _losses(run_dir):
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


def test_sigkill_or_sigterm_then_restart_continues_with_identical_losses(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    subprocess.run(_command(reference), cwd=REPO, env=env, check=True, capture_output=True)

    process = subprocess.Popen(_command(interrupted), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint_20 = os.path.join(interrupted, "checkpoints", "20")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(checkpoint_20) and max(_losses(interrupted), default=0) >= 23:
            break
        time.sleep(0.05)
    assert process.poll() is None, "run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(_losses(interrupted))
    assert 23 <= killed_at < 40
    assert Checkpointer(os.path.join(interrupted, "checkpoints")).latest_step() in (20, 30)

    subprocess.run(_command(interrupted), cwd=REPO, env=env, check=True, capture_output=True)
    expected, resumed = _losses(reference), _losses(interrupted)
    assert sorted(expected) == sorted(resumed) == list(range(1, 41))
    np.testing.assert_allclose([resumed[s] for s in range(1, 41)],
                               [expected[s] for s in range(1, 41)], rtol=1e-6)
    assert os.path.exists(os.path.join(interrupted, "config.gin"))

    # SIGTERM (a scheduler's preemption notice): the loop saves the step it is at and exits 0.
    preempted = str(tmp_path / "preempted")
    process = subprocess.Popen(_command(preempted), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if max(_losses(preempted), default=0) >= 13:
            break
        time.sleep(0.05)
    assert process.poll() is None, "run finished before it could be preempted"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    stopped_at = max(_losses(preempted))
    assert 13 <= stopped_at < 40
    assert Checkpointer(os.path.join(preempted, "checkpoints")).latest_step() == stopped_at
    subprocess.run(_command(preempted), cwd=REPO, env=env, check=True, capture_output=True)
    resumed = _losses(preempted)
    assert sorted(resumed) == list(range(1, 41))
    np.testing.assert_allclose([resumed[s] for s in range(1, 41)],
                               [expected[s] for s in range(1, 41)], rtol=1e-6)


def test_restore_onto_a_different_mesh(tmp_path):
    task = toy_task()
    saved_mesh = partitioning.make_mesh()  # data=8
    result = trainer.train(task=task, workdir=str(tmp_path / "run"), mesh=saved_mesh,
                           num_steps=3, batch_size=8, eval_every=0, checkpoint_every=3,
                           show_progress=False)
    other_mesh = partitioning.make_mesh(data=2, fsdp=2, tensor=2)
    tx, _ = trainer.make_optimizer(total_steps=3)
    template, _ = trainer.create_train_state(task, tx, other_mesh, seed=1)
    abstract = abstract_like(template)
    checkpointer = Checkpointer(str(tmp_path / "run" / "checkpoints"), kind=task.kind)
    restored = checkpointer.restore(abstract)
    assert int(restored.step) == 3
    kernel = restored.params["decoder_0"]["mlp"]["wi_gate"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
                 jax.device_get(result["state"].params))
    meta = checkpointer.meta()
    assert meta["kind"] == "music_lm" and "gin" in meta


def test_wrong_kind_and_missing_checkpoints_are_clear_errors(tmp_path):
    task = toy_task()
    trainer.train(task=task, workdir=str(tmp_path / "run"), mesh=partitioning.make_mesh(),
                  num_steps=1, batch_size=8, eval_every=0, checkpoint_every=1,
                  show_progress=False)
    wrong = Checkpointer(str(tmp_path / "run" / "checkpoints"), kind="quality_model")
    with pytest.raises(ConfigError, match="holds a 'music_lm' model, but a 'quality_model'"):
        wrong.restore({})
    with pytest.raises(ConfigError, match="No complete checkpoint in"):
        Checkpointer(str(tmp_path / "empty")).restore({})


def _rl_command(workdir, steps=40):
    return [sys.executable, os.path.join(REPO, "tests", "rl_job.py"), workdir, str(steps)]


def _rl_rows(run_dir):
    return {row["step"]: (row["reward_mean"], row["kl"], row["pg_loss"])
            for row in read_metrics(run_dir) if "reward_mean" in row}


def _run_until(command, run_dir, step, sig):
    """Starts `command`, sends `sig` once its metrics reach `step`, waits; returns that step."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if max(_rl_rows(run_dir), default=0) >= step:
            break
        time.sleep(0.05)
    assert process.poll() is None, "run finished before it could be signalled"
    process.send_signal(sig)
    assert process.wait(timeout=120) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    return max(_rl_rows(run_dir))


def test_rl_loop_killed_or_preempted_resumes_to_the_uninterrupted_run(tmp_path):
    """SIGKILL between checkpoints loses the steps since the last one and the restart redoes
    them; SIGTERM saves the step it is at and stops (exit 0). Either way the finished run's
    per-step reward, KL and loss equal an uninterrupted run's, bit for bit."""
    reference = str(tmp_path / "reference")
    subprocess.run(_rl_command(reference), cwd=REPO, check=True, capture_output=True)
    expected = _rl_rows(reference)
    assert sorted(expected) == list(range(1, 41))

    killed = str(tmp_path / "killed")
    killed_at = _run_until(_rl_command(killed), killed, 13, signal.SIGKILL)
    assert 13 <= killed_at < 40
    # The last complete checkpoint: step 1's or a multiple of 10 (the kill may land while one
    # is still being written asynchronously; then the one before counts).
    latest = Checkpointer(os.path.join(killed, "checkpoints")).latest_step()
    assert latest <= killed_at and (latest == 1 or latest % 10 == 0), latest

    preempted = str(tmp_path / "preempted")
    stopped_at = _run_until(_rl_command(preempted), preempted, 13, signal.SIGTERM)
    assert 13 <= stopped_at < 40
    assert Checkpointer(os.path.join(preempted, "checkpoints")).latest_step() == stopped_at

    for run_dir, restored in ((killed, latest), (preempted, stopped_at)):
        subprocess.run(_rl_command(run_dir), cwd=REPO, check=True, capture_output=True)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            logged = [json.loads(line)["step"] for line in f if "reward_mean" in line]
        # The restart began after the restored step: steps up to it were logged only once.
        assert sorted(s for s in logged if s <= restored) == list(range(1, restored + 1))
        resumed = _rl_rows(run_dir)
        assert sorted(resumed) == list(range(1, 41)), run_dir
        assert [resumed[s] for s in range(1, 41)] == [expected[s] for s in range(1, 41)], run_dir
