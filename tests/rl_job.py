"""A tiny RL run in its own process, for the kill tests: python tests/rl_job.py WORKDIR STEPS.

The toy reward and RL settings of tests/test_rl.py; one device; checkpoints every 10 steps."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from conftest import TINY, lm_params, toy_task  # noqa: E402
from musicrl_jax import partitioning  # noqa: E402
from musicrl_jax.errors import Preempted  # noqa: E402
from musicrl_jax.training import rl  # noqa: E402
from test_rl import REWARD_SCALE, RL_CONFIG, toy_reward_fn  # noqa: E402

if __name__ == "__main__":
    workdir, num_steps = sys.argv[1], int(sys.argv[2])
    params = lm_params(TINY, 0)
    try:
        rl.train_rl(lm_config=TINY, policy_params=params,
                    reward_fn=toy_reward_fn, reward_params={"scale": jnp.asarray(REWARD_SCALE)},
                    caption_source=toy_task().train_source, rl_config=RL_CONFIG,
                    tx=optax.adam(5e-3), captions_per_step=4, num_steps=num_steps, log_every=1,
                    eval_every=0, checkpoint_every=10, show_progress=False, workdir=workdir,
                    mesh=partitioning.make_mesh(devices=jax.devices()[:1]))
    except Preempted as err:  # reported and exit 0, as musicrl_jax.main does
        print(f"musicrl_jax: preempted: {err}", file=sys.stderr)
