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
from musicrl_jax.errors import ConfigError, Preempted
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


# The kill tests run independent processes side by side (the machine has 2+ cores and each run
# keeps about one busy), each with its output in a log that a failed assertion shows.

_STARTED = []


@pytest.fixture
def stop_leftovers():
    """Kills what a failed kill test left running."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def _start(command, log, env=None):
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    _STARTED.append(process)
    return process


def _log_tail(log):
    with open(log, errors="replace") as f:
        return f.read()[-3000:]


def _exits(process, log, code=0, timeout=300):
    assert process.wait(timeout=timeout) == code, _log_tail(log)


def _wait_until(process, log, ready):
    """Polls until `ready()` holds or the process has ended."""
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.05)
    assert ready(), _log_tail(log)


def _signal_when(runs):
    """runs: (process, ready, signal), polled together every 0.05 s: each process gets its
    signal once `ready()` holds; one that finishes first fails the test."""
    pending = list(runs)
    deadline = time.time() + 300
    while pending and time.time() < deadline:
        for run in list(pending):
            process, ready, sig = run
            now = ready()
            assert process.poll() is None, "run finished before it could be signalled"
            if now:
                process.send_signal(sig)
                pending.remove(run)
        time.sleep(0.05)
    assert not pending, "run never reached the step to signal it at"


def test_sigkill_or_sigterm_then_restart_continues_with_identical_losses(tmp_path,
                                                                         stop_leftovers):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    reference, interrupted = str(tmp_path / "reference"), str(tmp_path / "interrupted")
    preempted = str(tmp_path / "preempted")
    logs = {name: str(tmp_path / f"{name}.log") for name in
            ("reference", "interrupted", "preempted", "interrupted_restart",
             "preempted_restart")}
    reference_run = _start(_command(reference), logs["reference"], env)
    # Its first step is compiled (into the session's compilation cache) before the others start.
    _wait_until(reference_run, logs["reference"], lambda: _losses(reference))
    interrupted_run = _start(_command(interrupted), logs["interrupted"], env)
    # SIGTERM (a scheduler's preemption notice): the loop saves the step it is at and exits 0.
    preempted_run = _start(_command(preempted), logs["preempted"], env)
    checkpoint_20 = os.path.join(interrupted, "checkpoints", "20")
    _signal_when([
        (interrupted_run, lambda: os.path.isdir(checkpoint_20) and max(
            _losses(interrupted), default=0) >= 23, signal.SIGKILL),
        (preempted_run, lambda: max(_losses(preempted), default=0) >= 13, signal.SIGTERM)])
    _exits(interrupted_run, logs["interrupted"], -signal.SIGKILL)
    killed_at = max(_losses(interrupted))
    assert 23 <= killed_at < 40
    assert Checkpointer(os.path.join(interrupted, "checkpoints")).latest_step() in (20, 30)
    _exits(preempted_run, logs["preempted"], timeout=120)
    assert "musicrl_jax: preempted:" in _log_tail(logs["preempted"])
    stopped_at = max(_losses(preempted))
    assert 13 <= stopped_at < 40
    assert Checkpointer(os.path.join(preempted, "checkpoints")).latest_step() == stopped_at

    restarts = {run_dir: _start(_command(run_dir), logs[f"{name}_restart"], env)
                for name, run_dir in (("interrupted", interrupted), ("preempted", preempted))}
    _exits(reference_run, logs["reference"])
    for name, run_dir in (("interrupted", interrupted), ("preempted", preempted)):
        _exits(restarts[run_dir], logs[f"{name}_restart"])
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, 41))
    for run_dir in (interrupted, preempted):
        resumed = _losses(run_dir)
        assert sorted(resumed) == list(range(1, 41)), run_dir
        np.testing.assert_allclose([resumed[s] for s in range(1, 41)],
                                   [expected[s] for s in range(1, 41)], rtol=1e-6,
                                   err_msg=run_dir)
    assert os.path.exists(os.path.join(interrupted, "config.gin"))


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
    # The restore test's run (the same compiled steps: compilation cache hits).
    trainer.train(task=task, workdir=str(tmp_path / "run"), mesh=partitioning.make_mesh(),
                  num_steps=3, batch_size=8, eval_every=0, checkpoint_every=3,
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


def test_rl_loop_killed_or_preempted_resumes_to_the_uninterrupted_run(tmp_path, stop_leftovers):
    """SIGKILL between checkpoints loses the steps since the last one and the restart redoes
    them; SIGTERM saves the step it is at and stops (exit 0). Either way the finished run's
    per-step reward, KL and loss equal an uninterrupted run's, bit for bit."""
    reference, killed, preempted = (str(tmp_path / name)
                                    for name in ("reference", "killed", "preempted"))
    logs = {run_dir: (f"{run_dir}.log", f"{run_dir}_restart.log")
            for run_dir in (reference, killed, preempted)}
    reference_run = _start(_rl_command(reference), logs[reference][0])
    # Its first step is compiled (into the session's compilation cache) before the others start.
    _wait_until(reference_run, logs[reference][0], lambda: _rl_rows(reference))
    runs = {run_dir: _start(_rl_command(run_dir), logs[run_dir][0])
            for run_dir in (killed, preempted)}
    _signal_when([(runs[killed], lambda: max(_rl_rows(killed), default=0) >= 13,
                   signal.SIGKILL),
                  (runs[preempted], lambda: max(_rl_rows(preempted), default=0) >= 13,
                   signal.SIGTERM)])
    _exits(runs[killed], logs[killed][0], -signal.SIGKILL, timeout=120)
    _exits(runs[preempted], logs[preempted][0], 0, timeout=120)
    # The loop raised Preempted after its save (main reports it), so nothing ran after it.
    assert "musicrl_jax: preempted:" in _log_tail(logs[preempted][0])

    killed_at = max(_rl_rows(killed))
    assert 13 <= killed_at < 40
    # The last complete checkpoint: step 1's or a multiple of 10 (the kill may land while one
    # is still being written asynchronously; then the one before counts).
    latest = Checkpointer(os.path.join(killed, "checkpoints")).latest_step()
    assert latest <= killed_at and (latest == 1 or latest % 10 == 0), latest
    stopped_at = max(_rl_rows(preempted))
    assert 13 <= stopped_at < 40
    assert Checkpointer(os.path.join(preempted, "checkpoints")).latest_step() == stopped_at

    restarts = {run_dir: _start(_rl_command(run_dir), logs[run_dir][1])
                for run_dir in (killed, preempted)}
    _exits(reference_run, logs[reference][0])
    expected = _rl_rows(reference)
    assert sorted(expected) == list(range(1, 41))
    for run_dir, restored in ((killed, latest), (preempted, stopped_at)):
        _exits(restarts[run_dir], logs[run_dir][1])
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            logged = [json.loads(line)["step"] for line in f if "reward_mean" in line]
        # The restart began after the restored step: steps up to it were logged only once.
        assert sorted(s for s in logged if s <= restored) == list(range(1, restored + 1))
        resumed = _rl_rows(run_dir)
        assert sorted(resumed) == list(range(1, 41)), run_dir
        assert [resumed[s] for s in range(1, 41)] == [expected[s] for s in range(1, 41)], run_dir


def test_sigterm_during_an_unforced_save_still_saves_the_step_it_stops_at(tmp_path,
                                                                         monkeypatch):
    """A preemption notice that lands while a step's (skipped) save runs must not end the loop
    on an unsaved step: the loop reads the flag once per step, so it saves the next one."""
    signalled = []
    original_save = Checkpointer.save

    def save_then_preempt(self, step, state, meta=None, force=False):
        result = original_save(self, step, state, meta=meta, force=force)
        if not signalled:
            signalled.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # the PreemptionFlag handler takes it
        return result

    monkeypatch.setattr(Checkpointer, "save", save_then_preempt)
    workdir = tmp_path / "run"
    # The restore test's run (the same compiled steps: compilation cache hits).
    # Preempted, not a normal return: a pipeline's later stages must not run on this model.
    with pytest.raises(Preempted, match="saved step 2 of 3"):
        trainer.train(task=toy_task(), workdir=str(workdir), mesh=partitioning.make_mesh(),
                      num_steps=3, batch_size=8, eval_every=0, checkpoint_every=3,
                      show_progress=False)
    assert signalled == [1]
    assert Checkpointer(str(workdir / "checkpoints")).latest_step() == 2
