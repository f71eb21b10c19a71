"""The RL stage as a job: MusicRL-R, -U and -RU are gin files over `rl_finetune`.

  rl_finetune(lm_config, init_checkpoint, rewards, caption_source, workdir, ...)

restores the starting policy (a pretraining or an RL checkpoint: MusicRL-RU starts from
MusicRL-R's) and the frozen reference (the pretrained LM, the paper's anchor), builds the reward
combination, and runs `rl.train_rl`. `rewards`, `caption_source` and `eval_source` are
factories, called after the data stage so they read the freshly built data, e.g.

  rl_finetune.rewards = @RewardCombination          # no (): a factory
  rl_finetune.caption_source = @train_prompts/prompt_source
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp

from musicrl_jax import partitioning
from musicrl_jax.checkpoints import Checkpointer
from musicrl_jax.errors import ConfigError
from musicrl_jax.models import lora as lora_lib
from musicrl_jax.models import music_lm
from musicrl_jax.training import reward_tasks, rl
from musicrl_jax.training.trainer import eval_history, make_optimizer

POLICY_KINDS = ("music_lm", "music_rl", "music_dpo")  # DPO trains with the TrainState


def policy_checkpoint(path: str, step: int | None = None) -> tuple[str, int, dict[str, Any]]:
    """(checkpoints directory, step (default: latest), its meta item: kind and gin config) of a
    policy checkpoint: a pretraining (`music_lm`), RL (`music_rl`) or DPO (`music_dpo`) run or
    its checkpoints/."""
    directory = reward_tasks.checkpoint_directory(path, "policy")
    probe = Checkpointer(directory)
    try:
        step = probe.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"No complete checkpoint in {directory}. Fix: train the stage "
                              "that writes it (pretraining, or MusicRL-R for MusicRL-RU) first, "
                              "or correct the path.")
        meta = probe.meta(step)
    finally:
        probe.close()
    if meta.get("kind") not in POLICY_KINDS:
        raise ConfigError(f"{directory} (step {step}) holds a {meta.get('kind')!r} checkpoint, "
                          f"not a music LM policy ({' or '.join(POLICY_KINDS)}). Fix: point at "
                          "a pretraining or RL run directory.")
    return directory, step, meta


def restore_policy_params(lm_config: music_lm.MusicLMConfig, path: str, mesh=None,
                          step: int | None = None):
    """The LM params of a policy checkpoint (see `policy_checkpoint`), sharded on `mesh` by the
    logical rules. Asked for the latest step (`step=None`), a damaged one falls back to the
    previous complete step (`Checkpointer.restore`)."""
    directory, _, meta = policy_checkpoint(path, step)
    init = functools.partial(music_lm.init_params, lm_config)
    if meta.get("lora"):
        # LoRA adapters over the frozen reference, which the checkpoint names.
        lora = lora_lib.LoRAConfig(**meta["lora"])
        base = restore_policy_params(lm_config, meta["reference_checkpoint"], mesh)

        def init_adapters(rng):
            return lora_lib.init(lora, partitioning.unbox(init(rng)), rng)

        adapters = reward_tasks.restore_params(init_adapters, meta["kind"], directory, mesh,
                                               step, make_state=rl_state_layout)
        with partitioning.mesh_context(mesh or partitioning.make_mesh()):
            return jax.jit(functools.partial(rl.current_policy, lora=lora))(adapters, base)
    make_state = rl_state_layout if meta["kind"] == "music_rl" else None
    return reward_tasks.restore_params(init, meta["kind"], directory, mesh, step,
                                       make_state=make_state)


def rl_state_layout(params, opt_state) -> rl.RLState:
    """The RLState a `music_rl` checkpoint holds (`reward_tasks.restore_params`' make_state)."""
    return rl.RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                      beta=jnp.zeros((), jnp.float32))


def optimizer_at(learning_rate: float) -> Callable:
    """RL's optimizer factory (`rl/make_optimizer`'s gin bindings) at another learning rate:
    a `train_rl_overrides["optimizer"]` for a study that sets it per run."""
    def make(total_steps: int):
        with gin.config_scope("rl"):
            return make_optimizer(total_steps=total_steps, learning_rate=learning_rate)
    return make


@gin.configurable
def rl_finetune(lm_config=gin.REQUIRED, init_checkpoint: str = gin.REQUIRED,
                rewards: Callable = gin.REQUIRED, caption_source: Callable = gin.REQUIRED,
                workdir: str = gin.REQUIRED, *, reference_checkpoint: str | None = None,
                eval_source: Callable | None = None, prepare_data: Callable | None = None,
                register_tasks: Callable | None = None, tokenizer_dir: str | None = None,
                train_rl_overrides: dict[str, Any] | None = None, mesh=None) -> dict[str, Any]:
    """Fine-tunes the policy at `init_checkpoint` against `rewards()` (a RewardCombination)
    with a KL penalty to `reference_checkpoint` (default: `init_checkpoint`). The loop's
    settings (steps, RLConfig, optimizer) are `train_rl`'s gin bindings, except those a study
    sets per run in `train_rl_overrides` (e.g. {"rl_config": ..., "num_steps": 60}).
    `prepare_data()` (if given) returns the data's assets directory, whose tokenizer then
    decodes logged audio. Writes `workdir/summary.json`: the held-out reward components and KL
    at the first and last evaluation."""
    assets = prepare_data() if prepare_data is not None else None
    if tokenizer_dir is None and assets:
        tokenizer_dir = os.path.join(assets, "tokenizer")
    if register_tasks is not None:
        register_tasks()
    mesh = partitioning.make_mesh() if mesh is None else mesh
    policy = restore_policy_params(lm_config, init_checkpoint, mesh)
    reference = policy
    if reference_checkpoint and (os.path.abspath(reference_checkpoint)
                                 != os.path.abspath(init_checkpoint)):
        reference = restore_policy_params(lm_config, reference_checkpoint, mesh)
    combination = rewards()
    source = caption_source()
    combination.check_policy(lm_config, source.train_batch(0, 1)["caption_tokens"])
    extra = {"tokenizer_dir": tokenizer_dir} if tokenizer_dir else {}  # else gin's binding
    reference_dir = os.path.abspath(reference_checkpoint or init_checkpoint)
    result = rl.train_rl(
        checkpoint_meta={"reference_checkpoint": reference_dir},
        lm_config=lm_config, policy_params=policy, reference_params=reference,
        reward_fn=combination.reward_fn, reward_params=combination.params,
        caption_source=source, workdir=workdir,
        eval_source=eval_source() if eval_source else None, mesh=mesh, **extra,
        **(train_rl_overrides or {}))
    evals = eval_history(workdir)  # includes evaluations from before a resume
    summary = {"init_checkpoint": os.path.abspath(init_checkpoint),
               "reference_checkpoint": reference_dir,
               "rewards": dict(combination.weights), "reward_stats": combination.stats,
               "step": result["step"], "train": result["train"]}
    if evals:
        summary["eval_first"] = {"step": min(evals), **evals[min(evals)]}
        summary["eval_last"] = {"step": max(evals), **evals[max(evals)]}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return {**result, "summary": summary, "rewards": combination}
