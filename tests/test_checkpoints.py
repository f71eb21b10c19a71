import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import time

import jax
from flax import traverse_util
import numpy as np
import pytest

import killable_runs as runs
from conftest import TINY, toy_task
from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer, abstract_like
from musicrl_jax.errors import ConfigError, Preempted
from musicrl_jax.training import trainer


# The kill tests run independent processes side by side (the machine has 2+ cores and each run
# keeps about one busy), each with its output in a log that a failed assertion shows.

@pytest.fixture
def stop_leftovers():
    """Kills what a failed kill test left running."""
    yield
    runs.stop_started()


def _exits(process, log, code=0, timeout=300):
    assert process.wait(timeout=timeout) == code, runs.log_tail(log)


def _wait_until(process, log, ready):
    assert runs.wait_until(process, ready), runs.log_tail(log)


def _signal_when(signals):
    """signals: (process, ready, signal), polled together every 0.05 s: each process gets its
    signal once `ready()` holds; one that finishes first fails the test."""
    pending = list(signals)
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
    reference_run = runs.start(runs.pretrain_command(reference), logs["reference"], env)
    # Its first step is compiled (into the session's compilation cache) before the others start.
    _wait_until(reference_run, logs["reference"], lambda: runs.pretrain_losses(reference))
    interrupted_run = runs.start(runs.pretrain_command(interrupted), logs["interrupted"], env)
    # SIGTERM (a scheduler's preemption notice): the loop saves the step it is at and exits 0.
    preempted_run = runs.start(runs.pretrain_command(preempted), logs["preempted"], env)
    checkpoint_20 = os.path.join(interrupted, "checkpoints", "20")
    _signal_when([
        (interrupted_run, lambda: os.path.isdir(checkpoint_20) and max(
            runs.pretrain_losses(interrupted), default=0) >= 23, signal.SIGKILL),
        (preempted_run, lambda: max(runs.pretrain_losses(preempted), default=0) >= 13,
         signal.SIGTERM)])
    _exits(interrupted_run, logs["interrupted"], -signal.SIGKILL)
    killed_at = max(runs.pretrain_losses(interrupted))
    assert 23 <= killed_at < 40
    assert Checkpointer(os.path.join(interrupted, "checkpoints")).latest_step() in (20, 30)
    _exits(preempted_run, logs["preempted"], timeout=120)
    assert "musicrl_jax: preempted:" in runs.log_tail(logs["preempted"])
    stopped_at = max(runs.pretrain_losses(preempted))
    assert 13 <= stopped_at < 40
    assert Checkpointer(os.path.join(preempted, "checkpoints")).latest_step() == stopped_at

    restarts = {run_dir: runs.start(runs.pretrain_command(run_dir), logs[f"{name}_restart"], env)
                for name, run_dir in (("interrupted", interrupted), ("preempted", preempted))}
    _exits(reference_run, logs["reference"])
    for name, run_dir in (("interrupted", interrupted), ("preempted", preempted)):
        _exits(restarts[run_dir], logs[f"{name}_restart"])
    expected = runs.pretrain_losses(reference)
    assert sorted(expected) == list(range(1, 41))
    for run_dir in (interrupted, preempted):
        resumed = runs.pretrain_losses(run_dir)
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


def test_rl_loop_killed_or_preempted_resumes_to_the_uninterrupted_run(tmp_path, stop_leftovers):
    """SIGKILL between checkpoints loses the steps since the last one and the restart redoes
    them; SIGTERM saves the step it is at and stops (exit 0). Either way the finished run's
    per-step reward, KL and loss equal an uninterrupted run's, bit for bit."""
    reference, killed, preempted = (str(tmp_path / name)
                                    for name in ("reference", "killed", "preempted"))
    logs = {run_dir: (f"{run_dir}.log", f"{run_dir}_restart.log")
            for run_dir in (reference, killed, preempted)}
    reference_run = runs.start(runs.rl_command(reference), logs[reference][0])
    # Its first step is compiled (into the session's compilation cache) before the others start.
    _wait_until(reference_run, logs[reference][0], lambda: runs.rl_rows(reference))
    started = {run_dir: runs.start(runs.rl_command(run_dir), logs[run_dir][0])
               for run_dir in (killed, preempted)}
    _signal_when([(started[killed], lambda: max(runs.rl_rows(killed), default=0) >= 13,
                   signal.SIGKILL),
                  (started[preempted], lambda: max(runs.rl_rows(preempted), default=0) >= 13,
                   signal.SIGTERM)])
    _exits(started[killed], logs[killed][0], -signal.SIGKILL, timeout=120)
    _exits(started[preempted], logs[preempted][0], 0, timeout=120)
    # The loop raised Preempted after its save (main reports it), so nothing ran after it.
    assert "musicrl_jax: preempted:" in runs.log_tail(logs[preempted][0])

    killed_at = max(runs.rl_rows(killed))
    assert 13 <= killed_at < 40
    # The last complete checkpoint: step 1's or a multiple of 10 (the kill may land while one
    # is still being written asynchronously; then the one before counts).
    latest = Checkpointer(os.path.join(killed, "checkpoints")).latest_step()
    assert latest <= killed_at and (latest == 1 or latest % 10 == 0), latest
    stopped_at = max(runs.rl_rows(preempted))
    assert 13 <= stopped_at < 40
    assert Checkpointer(os.path.join(preempted, "checkpoints")).latest_step() == stopped_at

    restarts = {run_dir: runs.start(runs.rl_command(run_dir), logs[run_dir][1])
                for run_dir in (killed, preempted)}
    _exits(reference_run, logs[reference][0])
    expected = runs.rl_rows(reference)
    assert sorted(expected) == list(range(1, 41))
    for run_dir, restored in ((killed, latest), (preempted, stopped_at)):
        _exits(restarts[run_dir], logs[run_dir][1])
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            logged = [json.loads(line)["step"] for line in f if "reward_mean" in line]
        # The restart began after the restored step: steps up to it were logged only once.
        assert sorted(s for s in logged if s <= restored) == list(range(1, restored + 1))
        resumed = runs.rl_rows(run_dir)
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


# --- damaged checkpoints: moved aside, the previous one restored --------------------------------

@pytest.fixture(scope="module")
def pretrain_checkpoints(tmp_path_factory):
    """A 3-step toy pretraining run's checkpoints directory (steps 1 and 3: Orbax saves the
    first step, the loop the last); each test damages its own copy."""
    workdir = tmp_path_factory.mktemp("pretrain_checkpoints")
    # The restore test's run (the same compiled steps: compilation cache hits).
    trainer.train(task=toy_task(), workdir=str(workdir), mesh=partitioning.make_mesh(),
                  num_steps=3, batch_size=8, eval_every=0, checkpoint_every=3,
                  show_progress=False)
    directory = str(workdir / "checkpoints")
    assert sorted(os.listdir(directory)) == ["1", "3"]
    return directory


def _restore_template(config=TINY):
    tx, _ = trainer.make_optimizer(total_steps=3)
    template, _ = trainer.create_train_state(toy_task(config), tx, partitioning.make_mesh(),
                                             seed=1)
    return abstract_like(template)


def _data_file(step_dir):
    """The file holding the step's arrays (Orbax merges each process's OCDBT data into
    state/d/; the per-process copies under state/ocdbt.process_*/ are not read back)."""
    [path] = runs.checkpoint_files(os.path.join(step_dir, "state", "d"))
    return path


def _reports(err):
    return [line for line in err.splitlines() if "is damaged" in line]


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_one_restored(
        how, pretrain_checkpoints, tmp_path, capfd):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(pretrain_checkpoints, directory)
    checkpointer = Checkpointer(directory, kind="music_lm")
    abstract = _restore_template()
    previous = jax.device_get(checkpointer.restore(abstract, step=1).params)
    damaged = _data_file(os.path.join(directory, "3"))
    runs.damage(damaged, how)

    # A step asked for by number is not swapped for another: an error naming the file.
    with pytest.raises(ConfigError, match=f"step 3 .* is damaged: {re.escape(damaged)} "):
        checkpointer.restore(abstract, step=3)
    assert sorted(os.listdir(directory)) == ["1", "3"]
    capfd.readouterr()

    restored = checkpointer.restore(abstract)  # the latest: step 3, damaged, then step 1
    assert int(restored.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), previous)
    assert sorted(os.listdir(directory)) == ["1", "corrupt-3"]
    assert os.path.exists(damaged.replace(f"{os.sep}3{os.sep}", f"{os.sep}corrupt-3{os.sep}")
                          ) == (how == "truncate")
    # Neither this manager nor a new one lists the moved step.
    assert checkpointer.latest_step() == Checkpointer(directory).latest_step() == 1
    [report] = _reports(capfd.readouterr().err)
    assert "step 3" in report and damaged in report and "corrupt-3" in report


def test_export_of_the_latest_step_falls_back_past_a_damaged_one(pretrain_checkpoints,
                                                                   tmp_path):
    """Export (and every reader of a policy's latest step) restores through the fallback and
    records the step the params really came from."""
    from musicrl_jax import export
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(pretrain_checkpoints, directory)
    previous = jax.device_get(Checkpointer(directory, kind="music_lm").restore(
        _restore_template(), step=1).params)
    runs.damage(_data_file(os.path.join(directory, "3")), "truncate")
    flat, source = export.restore_policy_params(directory, TINY)
    assert source["step"] == 1
    assert sorted(os.listdir(directory)) == ["1", "corrupt-3"]
    flat_previous = traverse_util.flatten_dict(previous, sep="/")
    assert sorted(flat) == sorted(flat_previous)
    for name, value in flat.items():
        np.testing.assert_array_equal(value, flat_previous[name], err_msg=name)


def test_no_readable_checkpoint_stops_with_one_paragraph(pretrain_checkpoints, tmp_path,
                                                          capfd):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(pretrain_checkpoints, directory)
    damaged = [_data_file(os.path.join(directory, step)) for step in ("3", "1")]
    for path in damaged:
        runs.damage(path, "truncate")
    with pytest.raises(ConfigError) as raised:
        Checkpointer(directory, kind="music_lm").restore(_restore_template())
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"No usable checkpoint in {directory}")
    assert all(path in message for path in damaged) and "Fix:" in message
    assert sorted(os.listdir(directory)) == ["corrupt-1", "corrupt-3"]
    assert len(_reports(capfd.readouterr().err)) == 2


def test_a_checkpoint_of_another_config_names_the_difference_and_moves_nothing(
        pretrain_checkpoints, tmp_path):
    directory = str(tmp_path / "checkpoints")
    shutil.copytree(pretrain_checkpoints, directory)
    wider = _restore_template(dataclasses.replace(TINY, embed_dim=48))
    with pytest.raises(ConfigError) as raised:
        Checkpointer(directory, kind="music_lm").restore(wider)
    message = str(raised.value)
    assert "\n" not in message and "another model config" in message
    # The token embedding is [vocab, embed_dim]: saved 32 wide, expected 48.
    assert re.search(r"params\.\S*embed\S*: saved \(\d+, 32\), expected \(\d+, 48\)",
                     message), message
    assert sorted(os.listdir(directory)) == ["1", "3"]


def test_rl_resume_after_its_latest_checkpoint_was_damaged_continues_from_the_previous(
        tmp_path, stop_leftovers):
    """The issue's reproduction: the latest checkpoint of an RL run has a truncated data file;
    resuming with more steps restores the one before and finishes, redoing the lost steps
    exactly."""
    workdir = str(tmp_path / "rl")
    first = runs.start(runs.rl_command(workdir, 20), str(tmp_path / "first.log"))
    _exits(first, str(tmp_path / "first.log"))
    checkpoints = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["1", "10", "20"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        first_rows = [json.loads(line) for line in f]
    damaged = _data_file(os.path.join(checkpoints, "20"))
    runs.damage(damaged, "truncate")

    log = str(tmp_path / "resume.log")
    _exits(runs.start(runs.rl_command(workdir, 30), log), log)
    with open(log) as f:
        [report] = _reports(f.read())
    assert "step 20" in report and damaged in report
    assert sorted(os.listdir(checkpoints)) == ["10", "20", "30", "corrupt-20"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        resumed_rows = [json.loads(line) for line in f][len(first_rows):]
    assert [row["step"] for row in resumed_rows] == list(range(11, 31))

    def outcome(row):  # what the step computed, not how fast
        return {k: v for k, v in row.items() if "per_sec" not in k}
    assert [outcome(row) for row in resumed_rows[:10]] == [outcome(row)
                                                          for row in first_rows[10:20]]


def test_chaos_benchmark_runs_killed_or_damaged_survive_equal_to_uninterrupted(tmp_path,
                                                                                stop_leftovers):
    """benchmarks/chaos.py, 3 trials of 20-step runs: a pretraining run killed, an RL run killed
    with a truncated checkpoint file, a pretraining run killed with a deleted one."""
    spec = importlib.util.spec_from_file_location(
        "chaos", os.path.join(runs.REPO, "benchmarks", "chaos.py"))
    chaos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chaos)
    summary = chaos.main(["--trials", "3", "--steps", "20", "--workdir", str(tmp_path)])
    assert [(r["job"], r["fault"]) for r in summary["results"]] == [
        ("pretrain", "kill"), ("rl", "truncate"), ("pretrain", "delete")]
    assert summary["survived"] == summary["equal"] == 3, summary["results"]
