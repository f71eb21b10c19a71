"""Orbax checkpoints for every stage: async save every N steps, keep-N, resume from the latest
complete checkpoint, restore onto the current mesh (whatever mesh it was saved from).

Each checkpoint holds two items: `state` (the pytree) and `meta` (JSON: the operative gin config,
what kind of model it holds, free-form fields), so a checkpoint of the wrong model is reported as
such instead of failing deep inside Orbax.

A checkpoint that cannot be read on its own (a truncated or missing file, bad metadata: a crash
or a full disk during its write, a damaged copy) is reported in one line and moved aside to
`corrupt-STEP/` beside the steps (never deleted); a restore of the latest step then uses the
previous complete one. A checkpoint that reads but does not fit the expected model (another
config) is not damaged: that is a ConfigError naming the difference, and nothing is moved.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from musicrl_jax.errors import ConfigError


class _Unreadable(Exception):
    """A checkpoint step that fails to read on its own; `path` is the damaged file."""

    def __init__(self, step: int, path: str, cause: BaseException):
        super().__init__(step, path, cause)
        self.step, self.path, self.cause = step, path, cause


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

    def will_save(self, step: int, force: bool = False) -> bool:
        """Whether `save(step, force=force)` writes (a loop checks the state before it does)."""
        return force or self.manager.should_save(step)

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The meta item of `step`; by default of the latest step whose meta reads."""
        return self._read(step, self._read_meta)[1]

    def restore(self, abstract_state, step: int | None = None):
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs); by
        default the latest step that reads, after moving aside each newer damaged one."""
        step, state = self._read(step, lambda s: self._restore_step(s, abstract_state))
        logging.info("Restored %s checkpoint %s step %d", self.kind, self.directory, step)
        return state

    def saved_arrays(self, step: int) -> Any:
        """The `state` item of `step` as saved: host numpy arrays in the saved tree (tuples come
        back as lists), needing no model to restore onto."""
        path = epath.Path(self._step_dir(step)) / "state"
        try:
            tree = ocp.StandardCheckpointHandler().metadata(path).tree
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            with ocp.PyTreeCheckpointer() as checkpointer:
                return checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                    restore_args=restore_args))
        except Exception as err:  # Orbax/TensorStore raise many types; all mean unreadable
            raise _Unreadable(step, _damaged_file(str(path), err), err) from err

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()

    # --- reading with fallback ------------------------------------------------------------------

    def _read(self, step: int | None, read) -> tuple[int, Any]:
        """(step, read(step)); with step=None the latest step that reads, each newer one that
        does not being reported and moved aside. A ConfigError from `read` (the checkpoint reads
        but is of another model) stops at once."""
        if step is not None:
            try:
                return step, read(step)
            except _Unreadable as err:
                raise ConfigError(
                    f"Checkpoint step {step} in {self.directory} is damaged: {err.path} fails "
                    f"to read ({self._relative(err)}). Fix: restore another step, or replace "
                    "the file from a copy (a restore of the latest step moves a damaged one "
                    "aside by itself).") from err
        moved = []
        for candidate in sorted(self.manager.all_steps(), reverse=True):
            try:
                return candidate, read(candidate)
            except _Unreadable as err:
                moved.append(self._move_aside(err))
        if not moved:
            raise ConfigError(f"No complete checkpoint in {self.directory}. Fix: train the stage "
                              "that writes it first, or correct the path.")
        raise ConfigError(
            f"No usable checkpoint in {self.directory}: every step failed to read and was moved "
            f"aside ({'; '.join(moved)}). Fix: restore the checkpoints from a copy, or remove "
            "the directory to start the stage from scratch.")

    def _read_meta(self, step: int) -> dict[str, Any]:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        except Exception as err:  # Orbax/TensorStore raise many types; all mean unreadable
            meta_dir = os.path.join(self._step_dir(step), "meta")
            raise _Unreadable(step, _damaged_file(meta_dir, err), err) from err
        return restored["meta"]

    def _restore_step(self, step: int, abstract_state):
        meta = self._read_meta(step)
        if meta.get("kind") != self.kind:
            raise ConfigError(
                f"Checkpoint {self.directory} (step {step}) holds a {meta.get('kind')!r} model, "
                f"but a {self.kind!r} model was expected. Fix: point this stage at a {self.kind} "
                "checkpoint directory.")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as err:  # damaged, or sound but of another model: read it on its own
            saved = self.saved_arrays(step)  # raises _Unreadable when damaged
            differences = _shape_differences(saved, abstract_state)
            # Metadata only a restore onto a model reads (array_metadatas/) may be what broke.
            damaged = _unparsable_json(self._step_dir(step))
            if damaged and not differences:
                raise _Unreadable(step, damaged, err) from err
            raise self._mismatch_error(step, meta, differences, err) from err

    def _mismatch_error(self, step, meta, shapes, err) -> ConfigError:
        more = [f"{len(shapes) - 4} more arrays differ"] if len(shapes) > 4 else []
        gin_bindings = [f"gin {name}: saved {saved}, now {now}"
                        for name, saved, now in _gin_differences(meta.get("gin", ""))][:6]
        differences = shapes[:4] + more + gin_bindings
        found = "; ".join(differences) if differences else _error_text(err, 500)
        return ConfigError(
            f"The {self.kind} checkpoint at {self.directory} (step {step}) reads, but does not "
            f"restore onto this model, so it was written with another model config: {found}. "
            "Fix: run with the config the checkpoint was written with (its 'meta' item records "
            "it), or point the stage at a checkpoint directory of this config.")

    def _relative(self, err: _Unreadable) -> str:
        """The read error, with paths inside the checkpoints directory relative to it."""
        return _error_text(err.cause, 300, strip=self.directory + os.sep)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _move_aside(self, err: _Unreadable) -> str:
        """Moves the damaged step to corrupt-STEP/ and reports it in one line (on stderr: a
        warning through absl would print it a second time where absl logs to stderr too)."""
        target = os.path.join(self.directory, f"corrupt-{err.step}")
        suffix = 1
        while os.path.exists(target):  # the same step number damaged again in a later run
            suffix += 1
            target = os.path.join(self.directory, f"corrupt-{err.step}-{suffix}")
        if jax.process_index() == 0:
            os.rename(self._step_dir(err.step), target)
            print(f"musicrl_jax: checkpoint step {err.step} in {self.directory} is damaged "
                  f"({err.path}: {self._relative(err)}); moved to {target}; trying the previous "
                  "one", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {err.step} moved aside")
        self.manager.reload()  # so the manager no longer lists the step
        return f"step {err.step}: {err.path}"


def _damaged_file(item_dir: str, err: BaseException) -> str:
    """The file an Orbax/TensorStore read error is about: the one it names, else the metadata
    file under `item_dir` that does not parse, else `item_dir` itself."""
    named = [p for p in re.findall(r'local file "([^"]+)"', str(err)) if not p.endswith("/")]
    if named:
        return named[-1]
    if isinstance(err, FileNotFoundError) and err.filename:
        return str(err.filename)
    match = re.search(r"File (\S+) not found", str(err))
    return match.group(1) if match else _unparsable_json(item_dir) or item_dir


def _unparsable_json(directory: str) -> str | None:
    """The first of the checkpoint's JSON metadata files under `directory` that does not
    parse (the array data and OCDBT manifests are binary and skipped)."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d != "d")
        for name in sorted(files):
            if name.endswith(".ocdbt") or name == "commit_success.txt":
                continue
            path = os.path.join(root, name)
            try:
                with open(path) as f:
                    json.load(f)
            except (OSError, ValueError):
                return path
    return None


def _error_text(err: BaseException, limit: int, strip: str = "") -> str:
    """`Type: message` without TensorStore's spec dump (nor `strip`); a longer message keeps its
    end, where TensorStore puts the cause."""
    text = str(err).split(" [tensorstore_spec")[0]
    text = text.replace(strip, "") if strip else text
    return f"{type(err).__name__}: {text if len(text) <= limit else '...' + text[-limit:]}"


def _shape_differences(saved, abstract_state) -> list[str]:
    """'name: saved SHAPE, expected SHAPE' for each array whose shape differs or that only one
    side has (names as Orbax writes them: 'params.decoder_0.mlp.wi_gate'), shallowest first:
    a param before the optimizer moments that mirror it."""
    def shapes(tree):
        return {".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                         for k in path): tuple(np.shape(leaf))
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    saved_shapes, expected = shapes(saved), shapes(abstract_state)
    return [f"{name}: saved {saved_shapes.get(name, 'nothing')}, expected "
            f"{expected.get(name, 'nothing')}"
            for name in sorted(set(saved_shapes) | set(expected), key=lambda n: (n.count("."), n))
            if saved_shapes.get(name) != expected.get(name)]


def _gin_differences(saved_gin: str) -> list[tuple[str, str, str]]:
    """(binding, saved value, current value) of each gin binding set both in the checkpoint's
    operative config and the current one, to different values."""
    saved, now = _gin_bindings(saved_gin), _gin_bindings(gin.operative_config_str())
    return [(name, saved[name], now[name]) for name in sorted(set(saved) & set(now))
            if saved[name] != now[name]]


def _gin_bindings(config: str) -> dict[str, str]:
    bindings, name = {}, None
    for line in config.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace() and name is not None:  # a multi-line value continues
            bindings[name] += " " + line.strip()
        elif " = " in line:
            name, value = line.split(" = ", 1)
            bindings[name] = value.strip()
    return bindings


def abstract_like(tree, shardings=None):
    """A restore template: ShapeDtypeStructs with `shardings` (default: each array's own)."""
    if shardings is None:
        shardings = jax.tree.map(lambda x: x.sharding, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
