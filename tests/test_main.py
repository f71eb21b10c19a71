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


@pytest.mark.parametrize("bindings,message", [
    (["make_mesh.data=3"], "does not divide the 8 available devices"),
    (["BATCH_SIZE=12", "make_mesh.data=8"], "train.batch_size=12 is not divisible"),
])
def test_cli_user_errors_exit_2_with_one_paragraph(tmp_path, bindings, message):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    args = [sys.executable, "-m", "musicrl_jax.main", "--gin_file=local/pretrain.gin",
            f"--gin_bindings=RUN_DIR='{tmp_path}'", "--gin_bindings=NUM_STEPS=1",
            *[f"--gin_bindings={b}" for b in bindings]]
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
