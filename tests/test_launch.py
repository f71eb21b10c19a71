"""launch/tpu_run.sh: what --dry-run would run on a v5e-16 pod slice, and its flag errors; the
entry point's TPU-VM auto-detected jax.distributed start."""

import os
import re
import shlex
import subprocess

import pytest

from musicrl_jax import main, partitioning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_run.sh")
V5E_16 = ["--tpu", "my-v5e", "--zone", "us-west4-a", "--project", "p",
          "--accelerator-type", "v5litepod-16", "--run-name", "r1",
          "--workdir", "gs://bucket/runs", "--data-dir=gs://bucket/data",
          "--gin_file", "local/pretrain.gin",
          "--gin_binding", "train.num_steps=10",
          "--gin_binding", "SamplingConfig.temperature = 0.8",
          "--gin_binding", "NOTE = \"it's a test\""]


def _tpu_run(*args):
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True)


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_dry_run_prints_one_command_for_all_four_hosts_with_quoted_gin_flags():
    result = _tpu_run("--dry-run", *V5E_16)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# v5litepod-16: 16 chips, 4 host(s) x 4 chips")
    gcloud = [shlex.split(line) for line in lines if line.startswith("gcloud ")]
    assert [argv[4] for argv in gcloud] == ["scp", "ssh", "ssh"]
    assert all("--worker=all" in argv and "--zone=us-west4-a" in argv and "--project=p" in argv
               for argv in gcloud)
    install, run = (next(a[len("--command="):] for a in argv if a.startswith("--command="))
                    for argv in gcloud[1:])
    jax_version = re.search(r"^jax==(\S+)$", open(os.path.join(REPO, "requirements.lock")).read(),
                            re.M).group(1)
    assert f"jax[tpu]=={jax_version}" in shlex.split(install)

    # The remote shell sees exactly the flags given, each gin binding one argument.
    remote = shlex.split(run)
    assert "MUSICRL_DISTRIBUTED=auto" in remote
    python_args = remote[remote.index(".venv/bin/python") + 1:]
    assert python_args == [
        "-m", "musicrl_jax.main", "--gin_file=local/pretrain.gin",
        "--gin_bindings=RUN_DIR='gs://bucket/runs/r1'",
        "--gin_bindings=DATA_DIR='gs://bucket/data'",
        "--gin_bindings=train.num_steps=10",
        "--gin_bindings=SamplingConfig.temperature = 0.8",
        "--gin_bindings=NOTE = \"it's a test\""]

    workers = [line.split(" runs: ", 1) for line in lines if line.startswith("# worker ")]
    assert [w[0] for w in workers] == [f"# worker {i}" for i in range(4)]
    assert {w[1] for w in workers} == {run}


@pytest.mark.parametrize("change,message", [
    (lambda a: a[:a.index("--zone")] + a[a.index("--zone") + 2:], "missing --zone"),
    (lambda a: a + ["--bogus"], "unknown argument '--bogus'"),
    (lambda a: a + ["--gin_binding"], "--gin_binding needs a value"),
    (lambda a: [x for x in a if x not in ("--gin_file", "local/pretrain.gin")], "no --gin_file"),
    (lambda a: [x.replace("v5litepod-16", "v5litepod-12") for x in a], "not a slice size"),
    (lambda a: [x.replace("v5litepod-16", "h100-8") for x in a], "expected e.g. v4-32"),
    (lambda a: [x.replace("gs://bucket/runs", "runs") for x in a],
     "v5litepod-16 has 4 hosts: --workdir and --data-dir must be gs:// paths"),
    (lambda a: [x.replace("r1", "r 1") for x in a], "--run-name 'r 1'"),
])
def test_bad_flags_exit_2_with_a_message(change, message):
    result = _tpu_run("--dry-run", *change(list(V5E_16)))
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


def test_help_lists_the_flags():
    result = _tpu_run("--help")
    assert result.returncode == 0
    for flag in ("--tpu", "--zone", "--project", "--run-name", "--workdir", "--gin_file",
                 "--gin_binding", "--data-dir", "--accelerator-type", "--dry-run"):
        assert flag in result.stdout


def test_single_host_slice_accepts_a_local_workdir():
    args = [x.replace("v5litepod-16", "v4-8").replace("gs://bucket/runs", "runs")
            for x in V5E_16]
    result = _tpu_run("--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# v4-8: 4 chips, 1 host(s) x 4 chips")
    assert result.stdout.count("# worker ") == 1


@pytest.mark.parametrize("env,expected_calls", [
    ({"MUSICRL_DISTRIBUTED": "auto"}, [()]),  # Cloud TPU VM: auto-detected from metadata
    ({"TPU_WORKER_HOSTNAMES": "h0,h1"}, [()]),  # GKE TPU slice
    ({}, []),  # one process: no distributed runtime
])
def test_entry_point_starts_auto_detected_distributed_runtime(monkeypatch, env, expected_calls):
    import jax
    for name in ("MUSICRL_DISTRIBUTED", "TPU_WORKER_HOSTNAMES", "JAX_NUM_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    splits = []  # one process (only): the CPU split into a device per core
    monkeypatch.setattr(partitioning, "use_cpu_cores", lambda: splits.append(True))
    main.maybe_initialize_distributed()
    assert calls == expected_calls
    assert splits == ([] if expected_calls else [True])
