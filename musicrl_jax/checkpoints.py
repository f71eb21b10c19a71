"""Orbax checkpoints for every stage: async save every N steps, keep-N, resume from the latest
complete checkpoint, restore onto the current mesh (whatever mesh it was saved from).

Each checkpoint holds two items: `state` (the pytree) and `meta` (JSON: the operative gin config,
what kind of model it holds, free-form fields), so a checkpoint of the wrong model is reported as
such instead of failing deep inside Orbax.
"""

from __future__ import annotations

import os
from typing import Any

import gin
import jax
import orbax.checkpoint as ocp
from absl import logging

from musicrl_jax.errors import ConfigError


def _restore_error(directory, step, kind, err) -> ConfigError:
    return ConfigError(
        f"Could not restore the {kind} checkpoint at {directory} (step {step}): "
        f"{type(err).__name__}: {str(err)[:500]}\nFix: point the stage at a checkpoint written "
        "by the same model and config (the 'meta' item beside it records which), or start from "
        "an empty directory.")


@gin.configurable
class Checkpointer:
    def __init__(self, directory: str, *, save_every: int = 100, keep: int = 3,
                 async_save: bool = True, kind: str = "model"):
        self.directory = os.path.abspath(directory)
        self.kind = kind
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=keep,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict[str, Any] | None = None,
             force: bool = False) -> bool:
        meta = {"kind": self.kind, "gin": gin.operative_config_str(), **(meta or {})}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def meta(self, step: int | None = None) -> dict[str, Any]:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, abstract_state, step: int | None = None):
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ConfigError(f"No complete checkpoint in {self.directory}. Fix: train the stage "
                              "that writes it first, or correct the path.")
        saved_kind = self.meta(step).get("kind")
        if saved_kind != self.kind:
            raise ConfigError(
                f"Checkpoint {self.directory} (step {step}) holds a {saved_kind!r} model, but a "
                f"{self.kind!r} model was expected. Fix: point this stage at a {self.kind} "
                "checkpoint directory.")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))
        except (ValueError, KeyError, TypeError) as err:
            raise _restore_error(self.directory, step, self.kind, err) from err
        logging.info("Restored %s checkpoint %s step %d", self.kind, self.directory, step)
        return restored["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings=None):
    """A restore template: ShapeDtypeStructs with `shardings` (default: each array's own)."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
