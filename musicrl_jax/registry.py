"""Imports every module that declares gin configurables, and the top-level `run` job."""

import gin

from musicrl_jax import (checkpoints, collection, decoding, evaluation, partitioning,  # noqa: F401
                         pipeline, raters, rewards, rounds)
from musicrl_jax.audio import tokenizer  # noqa: F401
from musicrl_jax.data import feedback, musicrl_music, tasks as data_tasks, toy, vocab  # noqa: F401
from musicrl_jax.models import lora, music_lm  # noqa: F401
from musicrl_jax.training import dpo, reward_tasks, rl, rl_finetune, tasks, trainer  # noqa: F401


@gin.configurable
def run(job=gin.REQUIRED):
    """The stage a gin file selects, e.g. `run.job = @train`."""
    return job()
