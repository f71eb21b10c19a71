"""Training runs in their own processes, for the kill tests and benchmarks/chaos.py to kill,
damage and restart: the tiny pretraining CLI run and the tiny RL job (tests/rl_job.py), their
logs, their per-step metrics, and damage to a checkpoint's files.

Each run writes its output to a log that a failed check shows (`log_tail`)."""

import os
import subprocess
import sys
import time

from musicrl_jax.training.trainer import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_EVERY = 10  # both runs: steps 1, 10, 20, ... are saved (asynchronously)


def pretrain_command(run_dir: str, num_steps: int = 40) -> list[str]:
    """The local pretraining config, tiny: batch 16 of 16 frames over an 8-device mesh (the
    caller's XLA_FLAGS must give 8 devices)."""
    bindings = [f"RUN_DIR='{run_dir}'", f"NUM_STEPS={num_steps}", "BATCH_SIZE=16",
                "MAX_FRAMES=16", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                "train.log_every=1", "train.eval_every=0", "train.show_progress=False",
                "make_mesh.data=4", "make_mesh.fsdp=2", "toy_source.num_examples=96"]
    return [sys.executable, "-m", "musicrl_jax.main", "--gin_file=local/pretrain.gin",
            *[f"--gin_bindings={b}" for b in bindings]]


def rl_command(workdir: str, num_steps: int = 40) -> list[str]:
    return [sys.executable, os.path.join(REPO, "tests", "rl_job.py"), workdir, str(num_steps)]


def pretrain_losses(run_dir: str) -> dict[int, float]:
    """{step: loss}; later rows win (a restarted run rewrites the steps it redid)."""
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


def rl_rows(run_dir: str) -> dict[int, tuple]:
    """{step: (reward_mean, kl, pg_loss)}; later rows win."""
    return {row["step"]: (row["reward_mean"], row["kl"], row["pg_loss"])
            for row in read_metrics(run_dir) if "reward_mean" in row}


STARTED: list[subprocess.Popen] = []


def start(command: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    STARTED.append(process)
    return process


def stop_started():
    """Kills the started runs still running (what a failed test or trial left behind)."""
    while STARTED:
        process = STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def log_tail(log: str) -> str:
    with open(log, errors="replace") as f:
        return f.read()[-3000:]


def wait_until(process: subprocess.Popen, ready, timeout: float = 300,
               poll: float = 0.05) -> bool:
    """Polls until `ready()` holds (True) or the process has ended or time is up (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if ready():
            return True
        time.sleep(poll)
    return bool(ready())


def checkpoint_files(step_dir: str) -> list[str]:
    """Every file of one checkpoint step, sorted."""
    return sorted(os.path.join(root, name) for root, _, names in os.walk(step_dir)
                  for name in names)


def damage(path: str, how: str):
    """`how`: 'truncate' (to half its size, as a crash or a full disk mid-write leaves it) or
    'delete'."""
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "delete":
        os.remove(path)
    else:
        raise ValueError(f"damage how={how!r}: expected 'truncate' or 'delete'")
