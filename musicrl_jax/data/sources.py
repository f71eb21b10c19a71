"""In-memory example sources with a deterministic, resumable order and per-host slicing."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from musicrl_jax import partitioning
from musicrl_jax.errors import ConfigError


@dataclasses.dataclass
class ArraySource:
    """Examples as a dict of equal-length arrays.

    The batch for step s depends only on (seed, s): a resumed run sees exactly the batches an
    uninterrupted run would. Each process takes its contiguous slice of the global batch, or,
    when `host_sharded`, `arrays` already hold only this process's examples and each process
    draws its share of the batch from them.
    """
    arrays: dict[str, np.ndarray]
    seed: int = 0
    name: str = "examples"
    host_sharded: bool = False

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ConfigError(f"{self.name}: fields have different lengths {lengths}.")
        if not next(iter(lengths.values()), 0):
            raise ConfigError(f"{self.name}: no examples.")

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def global_indices(self, step: int, batch_size: int) -> np.ndarray:
        start = step * batch_size
        positions = np.arange(start, start + batch_size)
        epochs, offsets = np.divmod(positions, len(self))
        orders = {e: self._epoch_order(e) for e in np.unique(epochs)}
        return np.array([orders[e][o] for e, o in zip(epochs, offsets)])

    def train_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        """`batch_size` is this process's share of the global batch."""
        if self.host_sharded:
            indices = self.global_indices(step, batch_size)
        else:
            indices = partitioning.host_rows(
                self.global_indices(step, batch_size * jax.process_count()))
        return {k: v[indices] for k, v in self.arrays.items()}

    def eval_batches(self, batch_size: int, max_batches: int | None = None):
        """Sequential full global batches (the remainder is dropped so every batch shards evenly);
        yields this process's part of each."""
        local_size = batch_size // jax.process_count()
        available = len(self) * (jax.process_count() if self.host_sharded else 1)
        num_batches = available // batch_size
        if num_batches == 0:
            raise ConfigError(f"{self.name}: {available} examples is fewer than the eval batch "
                              f"size {batch_size}. Fix: lower eval_batch_size or add examples.")
        if max_batches:
            num_batches = min(num_batches, max_batches)
        for b in range(num_batches):
            if self.host_sharded:
                indices = np.arange(b * local_size, (b + 1) * local_size)
            else:
                indices = partitioning.host_rows(np.arange(b * batch_size, (b + 1) * batch_size))
            yield {k: v[indices] for k, v in self.arrays.items()}
