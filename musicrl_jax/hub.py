"""Reading checkpoints published in the model hub's (transformers) layout: a directory holding
`config.json` and `model.safetensors`, or shards listed by `model.safetensors.index.json`.

Tensors are read with `safetensors` into numpy (bfloat16 through ml_dtypes); torch is never
needed. Every failure is a ConfigError naming the directory, file or tensor and the fix.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import numpy as np

from musicrl_jax.errors import ConfigError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(source: str, model_types: Iterable[str]) -> dict:
    """config.json of `source`, checked to describe one of `model_types` (its "model_type")."""
    model_types = tuple(model_types)
    path = os.path.join(source, CONFIG_FILE)
    if not os.path.isdir(source):
        raise ConfigError(f"{source}: not a directory. Fix: pass the folder downloaded from the "
                          f"model hub (it holds {CONFIG_FILE} and *.safetensors).")
    if not os.path.isfile(path):
        raise ConfigError(f"{source}: no {CONFIG_FILE}, so this is not a model-hub checkpoint "
                          f"directory. Fix: pass the folder that holds {CONFIG_FILE} and the "
                          "*.safetensors weights.")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable ({err}). Fix: download the checkpoint again.") \
            from err
    found = config.get("model_type") if isinstance(config, dict) else None
    if found not in model_types:
        raise ConfigError(f"{path}: model_type={found!r}, expected one of {list(model_types)}. "
                          "Fix: pass a checkpoint of that kind.")
    return config


def _shard_files(source: str) -> list[str]:
    index_path = os.path.join(source, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{index_path}: unreadable or without a weight_map ({err}). "
                              "Fix: download the checkpoint again.") from err
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(source, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise ConfigError(f"{source}: neither {SINGLE_FILE} nor {INDEX_FILE}. Fix: download the "
                          "safetensors weights too (a PyTorch-only *.bin checkpoint is not read).")
    missing = [name for name in files if not os.path.isfile(os.path.join(source, name))]
    if missing:
        raise ConfigError(f"{source}: missing shard(s) {missing} listed in {INDEX_FILE}. Fix: "
                          "download every shard.")
    return [os.path.join(source, name) for name in files]


def read_tensors(source: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in `source`, by its hub name, as numpy arrays."""
    from safetensors import safe_open

    tensors: dict[str, np.ndarray] = {}
    for path in _shard_files(source):
        try:
            # The flax backend reads bfloat16, which safetensors' numpy backend cannot.
            with safe_open(path, framework="flax") as f:
                for name in f.keys():
                    tensors[name] = np.asarray(f.get_tensor(name))
        except Exception as err:  # safetensors raises several kinds for a damaged file
            raise ConfigError(f"{path}: not a readable safetensors file ({err}). Fix: download "
                              "it again.") from err
    return tensors


class TensorTaker:
    """Hands out a checkpoint's tensors by name with their expected shapes; `finish()` then
    reports any tensor the conversion did not use (a layout it does not understand)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self._tensors = dict(tensors)
        self._source = source

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self._tensors:
            raise ConfigError(f"{self._source}: tensor {name!r} is missing. Fix: use a complete "
                              "checkpoint whose config.json matches its weights.")
        value = self._tensors.pop(name)
        if tuple(value.shape) != tuple(shape):
            raise ConfigError(f"{self._source}: tensor {name!r} has shape {tuple(value.shape)}, "
                              f"config.json implies {tuple(shape)}. Fix: use the config.json "
                              "that came with these weights.")
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            raise ConfigError(f"{self._source}: tensor {name!r} has dtype {value.dtype}, expected "
                              "a floating-point weight. Fix: use an unquantised checkpoint.")
        return value.astype(np.float32)

    def finish(self, ignore_prefixes: Iterable[str] = ()) -> None:
        left = sorted(n for n in self._tensors if not n.startswith(tuple(ignore_prefixes)))
        if left:
            raise ConfigError(f"{self._source}: {len(left)} tensor(s) not understood by the "
                              f"converter, e.g. {left[:5]}. Fix: check the checkpoint is the "
                              "architecture config.json names.")
