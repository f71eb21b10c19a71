import os
import subprocess
import sys

import pytest

from musicrl_jax import main
from musicrl_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_binding_names_the_binding():
    with pytest.raises(ConfigError, match="(?s)--gin_bindings='train.nm_steps=3'.*Fix"):
        main.parse_gin(["local/pretrain.gin"], ["train.nm_steps=3"])


def test_unknown_configurable_names_the_binding():
    with pytest.raises(ConfigError, match="--gin_bindings='trainer_typo.num_steps=3'"):
        main.parse_gin(["local/pretrain.gin"], ["trainer_typo.num_steps=3"])


def test_missing_gin_file_names_the_file():
    with pytest.raises(ConfigError, match="(?s)--gin_file=local/nope.gin: file not found.*Fix"):
        main.parse_gin(["local/nope.gin"], [])


CLI_ERRORS = [
    (["make_mesh.data=3"], "does not divide the 8 available devices"),
    (["BATCH_SIZE=12", "make_mesh.data=8"], "train.batch_size=12 is not divisible"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every CLI run below, started together (each is a fresh process importing the stack)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    runs = {}
    for bindings, _ in CLI_ERRORS:
        args = [sys.executable, "-m", "musicrl_jax.main", "--gin_file=local/pretrain.gin",
                f"--gin_bindings=RUN_DIR='{tmp_path_factory.mktemp('cli')}'",
                "--gin_bindings=NUM_STEPS=1", *[f"--gin_bindings={b}" for b in bindings]]
        runs[tuple(bindings)] = subprocess.Popen(args, cwd=REPO, env=env, text=True,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield runs
    for process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("bindings,message", CLI_ERRORS)
def test_cli_user_errors_exit_2_with_one_paragraph(cli_runs, bindings, message):
    process = cli_runs[tuple(bindings)]
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-2000:]
    assert message in stderr
    assert "Traceback" not in stderr
