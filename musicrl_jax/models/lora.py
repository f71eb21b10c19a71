"""LoRA (Hu et al. 2021) adapters over the music LM's kernels, applied functionally.

The adapters are a separate parameter tree: for every targeted kernel W (viewed as a matrix
[inputs, outputs]: attention's query/key/value [embed, heads * head_dim], its out projection
[heads * head_dim, embed], the MLP's wi_gate/wi_up (or an ungated MLP's wi) [embed, mlp] and
wo [mlp, embed]) a pair A [inputs, rank] (random) and B [rank, outputs] (zeros), and

  merge(base, adapters) = base with W + (alpha / rank) * A @ B for every targeted W.

B = 0 makes the merged model equal to the base at the start. In RL the frozen base is then also
the KL reference, so one copy of the weights serves both, and the optimizer state covers only the
adapters. The LM module itself is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import traverse_util

from musicrl_jax.errors import ConfigError
from musicrl_jax.models import music_lm

ATTENTION_KERNELS = ("query", "key", "value", "out")
MLP_KERNELS = ("wi_gate", "wi_up", "wo")
# An ungated MLP's (MusicGen's decoder, T5's relu/gelu) one input projection. Targeted by its
# own name or by either gated input projection's, so the default targets (the names a gated
# model has) adapt every MLP.
UNGATED_MLP_INPUT = "wi"
KERNELS = ATTENTION_KERNELS + MLP_KERNELS + (UNGATED_MLP_INPUT,)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION_KERNELS + MLP_KERNELS
    # False: no adapters in the text encoder (`for_model` sets it when the LM freezes it).
    adapt_text_encoder: bool = True

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(KERNELS))
        if unknown or not self.targets:
            raise ConfigError(f"LoRAConfig.targets={list(self.targets)}: "
                              f"{unknown or 'empty'}; choose among {list(KERNELS)}.")
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigError(f"LoRAConfig.rank={self.rank} must be >= 1 and alpha="
                              f"{self.alpha} > 0.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def for_model(config: LoRAConfig | None, lm_config) -> LoRAConfig | None:
    """`config` for the LM of `lm_config`: without text-encoder adapters when the LM freezes
    its text encoder (its output is stop_gradient'ed, so they would never train)."""
    if config is None or not music_lm.frozen_text_encoder(lm_config):
        return config
    return dataclasses.replace(config, adapt_text_encoder=False)


def _is_target(config: LoRAConfig, name: str) -> bool:
    if name == UNGATED_MLP_INPUT:
        return bool({name, "wi_gate", "wi_up"} & set(config.targets))
    return name in config.targets


def _input_axes(name: str) -> int:
    """How many leading axes of a kernel are its inputs (the rest are its outputs)."""
    return 2 if name == "out" else 1  # out: [heads, head_dim, embed]; others: [in, ...]


def targeted(config: LoRAConfig, base) -> dict[tuple, Any]:
    """{path: kernel} of the base params LoRA adapts."""
    flat = traverse_util.flatten_dict(base)
    return {path: w for path, w in flat.items()
            if _is_target(config, path[-1]) and getattr(w, "ndim", 0) >= 2
            and (config.adapt_text_encoder or not music_lm.in_text_encoder(path[0]))}


def init(config: LoRAConfig, base, rng) -> dict[str, Any]:
    """Adapters for `base` (unboxed LM params): nested like the base, {'a', 'b'} per kernel."""
    kernels = targeted(config, base)
    if not kernels:
        raise ConfigError(f"LoRA: no kernel of the model is named in targets "
                          f"{list(config.targets)}.")
    adapters = {}
    for i, (path, w) in enumerate(sorted(kernels.items())):
        split = _input_axes(path[-1])
        fan_in, fan_out = math.prod(w.shape[:split]), math.prod(w.shape[split:])
        a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, config.rank), jnp.float32)
        adapters[path + ("a",)] = a / jnp.sqrt(fan_in)
        adapters[path + ("b",)] = jnp.zeros((config.rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(adapters)


def merge(config: LoRAConfig, base, adapters):
    """The base params with every adapted kernel replaced by W + scale * A @ B (jittable;
    gradients flow to `adapters`, and to `base` unless it is a constant)."""
    flat = traverse_util.flatten_dict(base)
    pairs = traverse_util.flatten_dict(adapters)
    for path in [p[:-1] for p in pairs if p[-1] == "a"]:
        w = flat[path]
        delta = (pairs[path + ("a",)] @ pairs[path + ("b",)]).reshape(w.shape)
        flat[path] = w + (config.scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def num_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
