"""Chaos benchmark: training runs killed at a random moment, some with a damaged checkpoint
besides, restarted to completion and compared with an uninterrupted run, bit for bit.

Each trial runs a tiny pretraining run (the local pretraining config on 8 virtual devices) or a
tiny RL run (tests/rl_job.py), alternately, in its own process (tests/killable_runs.py), and
sends it SIGKILL at a random moment: after a random step, or while an asynchronous checkpoint
write is under way (Orbax's *.orbax-checkpoint-tmp* directory exists). One trial in three then
truncates, and one in three deletes, a random file of the latest complete checkpoint (some,
such as commit_success.txt, are never read back: damage there changes nothing); these trials
are killed once two checkpoints are complete, so that one remains to fall back to. The same
command restarts the run, which resumes from the latest readable checkpoint (a damaged one is
moved aside to corrupt-STEP/) and finishes.

  survived   the restart exited 0 having run every step
  lost steps steps the restart redid: logged before the kill, after the step it resumed from
  equal      survived, and the final checkpoint's arrays and every logged per-step metric
             (timings aside) equal the uninterrupted reference run's, bit for bit

--seed fixes each trial's plan (run, fault, kill step, damaged file); when the kill lands
still depends on the machine's speed. The runs import the code of the checkout they start in:
edits to it while the benchmark runs make trials differ from the reference (run it from a
copy of the tree, with PYTHONPATH set to it, when others edit this one).

Usage:
  python benchmarks/chaos.py                         # 20 trials of 40-step runs
  python benchmarks/chaos.py --trials 6 --steps 20 --seed 1
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))  # the runs the kill tests use

import jax  # noqa: E402
import numpy as np  # noqa: E402

import killable_runs as runs  # noqa: E402
from musicrl_jax.checkpoints import Checkpointer  # noqa: E402
from musicrl_jax.training.trainer import read_metrics  # noqa: E402

JOBS = ("pretrain", "rl")
FAULTS = ("kill", "truncate", "delete")  # truncate/delete: a kill, then that checkpoint damage
WRITE_MARK = "orbax-checkpoint-tmp"  # in the name of a step directory Orbax is still writing


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40,
                        help=f"steps per run (checkpoints every {runs.CHECKPOINT_EVERY})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2, help="trials run at once")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    return parser.parse_args(argv)


def command(job: str, run_dir: str, steps: int) -> list[str]:
    return (runs.pretrain_command if job == "pretrain" else runs.rl_command)(run_dir, steps)


def child_env(workdir: str) -> dict:
    # 8 devices for the pretraining mesh; one compilation cache, so restarts compile nothing.
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                JAX_COMPILATION_CACHE_DIR=os.path.join(workdir, "xla_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def logged_steps(run_dir: str) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir)]


def outcome(run_dir: str) -> dict[int, dict]:
    """{step: logged metrics}, later rows winning (a restart rewrites the steps it redid), less
    the timings, which differ from run to run."""
    return {row["step"]: {k: v for k, v in row.items() if "per_sec" not in k and "tflops" not in k}
            for row in read_metrics(run_dir)}


def final_arrays(run_dir: str, steps: int):
    return Checkpointer(os.path.join(run_dir, "checkpoints")).saved_arrays(steps)


def same_arrays(a, b) -> bool:
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    return tree_a == tree_b and all(x.dtype == y.dtype and np.array_equal(x, y)
                                    for x, y in zip(leaves_a, leaves_b))


def plan(index: int, steps: int, seed: int) -> dict:
    """What trial `index` does: its run, its fault, when the kill lands, which file breaks."""
    rng = np.random.default_rng([seed, index])
    during_write = bool(rng.integers(2))
    saves = [s for s in range(runs.CHECKPOINT_EVERY, steps, runs.CHECKPOINT_EVERY)] or [1]
    return {"job": JOBS[index % 2], "fault": FAULTS[index % 3], "during_write": during_write,
            # during a write: from the step before a save on; else after a random step
            "kill_after": (int(rng.choice(saves)) - 1 if during_write
                           else int(rng.integers(1, steps))),
            "delay": float(rng.uniform(0, 0.2)), "file_pick": float(rng.uniform())}


def kill_at_random(process, run_dir: str, trial: dict, steps: int) -> bool:
    """SIGKILLs the run as `trial` plans; True when the kill landed during a checkpoint write."""
    checkpoints = os.path.join(run_dir, "checkpoints")

    def writing():
        return os.path.isdir(checkpoints) and any(WRITE_MARK in name
                                                  for name in os.listdir(checkpoints))

    def past(step):
        return lambda: max(logged_steps(run_dir), default=0) >= step

    if trial["fault"] != "kill":
        # Damage needs a previous complete checkpoint to fall back to; with none left the
        # restart stops by design (a ConfigError), which is not what this trial measures.
        runs.wait_until(process, lambda: os.path.isdir(checkpoints) and sum(
            name.isdigit() for name in os.listdir(checkpoints)) >= 2, poll=0.01)
    runs.wait_until(process, past(trial["kill_after"]), poll=0.01)
    if trial["during_write"]:
        # Orbax writes from a background thread while the loop goes on: poll fast for it.
        done = past(min(trial["kill_after"] + 3, steps))
        runs.wait_until(process, lambda: writing() or done(), poll=0.002)
    else:
        time.sleep(trial["delay"])
    if process.poll() is not None:
        return False  # finished first: the restart has nothing to redo
    process.send_signal(signal.SIGKILL)
    process.wait()
    return writing()


def damage_latest(run_dir: str, how: str, pick: float) -> str | None:
    """Truncates or deletes a file of the latest complete checkpoint, picked by `pick` in
    [0, 1); the path, or None when no checkpoint was complete. Not one of the per-process OCDBT
    copies (state/ocdbt.process_*/): Orbax merges them into state/d/ and never reads them back,
    so damaging them would test nothing."""
    step = Checkpointer(os.path.join(run_dir, "checkpoints")).latest_step()
    if step is None:
        return None
    files = [path for path in runs.checkpoint_files(
        os.path.join(run_dir, "checkpoints", str(step))) if "ocdbt.process_" not in path]
    path = files[int(pick * len(files))]
    runs.damage(path, how)
    return path


def run_trial(index: int, trial: dict, workdir: str, steps: int) -> dict:
    run_dir = os.path.join(workdir, f"trial_{index}_{trial['job']}_{trial['fault']}")
    env = child_env(workdir)
    process = runs.start(command(trial["job"], run_dir, steps), f"{run_dir}.log", env)
    during_write = kill_at_random(process, run_dir, trial, steps)
    killed_at = max(logged_steps(run_dir), default=0)
    damaged = (damage_latest(run_dir, trial["fault"], trial["file_pick"])
               if trial["fault"] != "kill" else None)
    rows_before = len(read_metrics(run_dir))
    restart_log = f"{run_dir}_restart.log"
    restart = runs.start(command(trial["job"], run_dir, steps), restart_log, env)
    survived = restart.wait(timeout=600) == 0 and sorted(outcome(run_dir)) == list(
        range(1, steps + 1))
    redone = [row["step"] for row in read_metrics(run_dir)[rows_before:]]
    resumed_from = redone[0] - 1 if redone else steps
    with open(restart_log, errors="replace") as f:
        moved_aside = sum("is damaged" in line for line in f)
    return {"index": index, **trial, "run_dir": run_dir, "killed_at": killed_at,
            "kill_in_write": during_write, "damaged": damaged, "moved_aside": moved_aside,
            "resumed_from": resumed_from, "lost_steps": max(killed_at - resumed_from, 0),
            "survived": survived, "log": restart_log}


def compare(result: dict, reference: dict, steps: int) -> dict:
    """`result` with whether its logged metrics and its final arrays equal the reference's."""
    run_dir = result["run_dir"]
    metrics_equal = result["survived"] and outcome(run_dir) == reference["outcome"]
    arrays_equal = result["survived"] and same_arrays(final_arrays(run_dir, steps),
                                                      reference["arrays"])
    return {**result, "metrics_equal": metrics_equal, "arrays_equal": arrays_equal,
            "equal": metrics_equal and arrays_equal}


def run_references(workdir: str, steps: int) -> dict:
    """The uninterrupted runs, side by side: {job: {'outcome', 'arrays'}}."""
    env = child_env(workdir)
    started = {job: (runs.start(command(job, os.path.join(workdir, f"reference_{job}"), steps),
                                os.path.join(workdir, f"reference_{job}.log"), env))
               for job in JOBS}
    references = {}
    for job, process in started.items():
        run_dir, log = os.path.join(workdir, f"reference_{job}"), f"{workdir}/reference_{job}.log"
        if process.wait(timeout=600) != 0:
            raise RuntimeError(f"the uninterrupted {job} run failed:\n{runs.log_tail(log)}")
        references[job] = {"outcome": outcome(run_dir), "arrays": final_arrays(run_dir, steps)}
    return references


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="musicrl_chaos_")
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    try:
        references = run_references(workdir, args.steps)
        plans = [plan(i, args.steps, args.seed) for i in range(args.trials)]
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            results = list(pool.map(lambda i: run_trial(i, plans[i], workdir, args.steps),
                                    range(args.trials)))
    finally:
        runs.stop_started()
    results = [compare(r, references[r["job"]], args.steps) for r in results]
    for r in results:
        print(f"trial {r['index']:2d} {r['job']:8s} {r['fault']:8s} killed after step "
              f"{r['killed_at']:2d}{' (during a checkpoint write)' if r['kill_in_write'] else ''}"
              f", resumed from {r['resumed_from']:2d}"
              f"{', moved aside ' + str(r['moved_aside']) if r['moved_aside'] else ''}: "
              f"{'survived' if r['survived'] else 'LOST'}, "
              f"{'equal' if r['equal'] else 'DIFFERENT'}"
              f"{'' if r['metrics_equal'] else ' metrics'}"
              f"{'' if r['arrays_equal'] else ' arrays'}"
              f"{'' if r['equal'] else ' (' + r['log'] + ')'}")
    damage_trials = [r for r in results if r["fault"] != "kill"]
    summary = {
        "trials": len(results),
        "survived": sum(r["survived"] for r in results),
        "lost_steps": sum(r["lost_steps"] for r in results),
        "equal": sum(r["equal"] for r in results),
        "kills_during_checkpoint_write": sum(r["kill_in_write"] for r in results),
        "damaged_files": sum(r["damaged"] is not None for r in damage_trials),
        "damaged_checkpoints_moved_aside": sum(r["moved_aside"] > 0 for r in damage_trials),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"trials run {summary['trials']}, survived {summary['survived']}, lost steps "
          f"{summary['lost_steps']} (redone after the kills), equal to the uninterrupted run "
          f"{summary['equal']}; kills during a checkpoint write "
          f"{summary['kills_during_checkpoint_write']}; checkpoint files damaged "
          f"{summary['damaged_files']}, of which made the step unreadable (moved aside) "
          f"{summary['damaged_checkpoints_moved_aside']}; {summary['seconds']} s in {workdir}")
    return {**summary, "results": results}


if __name__ == "__main__":
    main()
