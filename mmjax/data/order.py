"""Which examples make each step's batch, and how eval splits are padded into batches.

Batches are formed from *indices* first, the same for every process: step ``i``'s global batch
is a fixed function of (seed, i), and a process keeps its rows ``[lo, hi)`` of it, so the global
batch is the same examples whatever the process count and a resumed run sees identical batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np


def config_get(config: Any, key: str, default: Any) -> Any:
    """Reads an optional config key; works for ConfigDicts, dataclasses and namespaces."""
    try:
        return getattr(config, key)
    except (AttributeError, KeyError):
        return default


class GlobalOrder:
    """Step → the global batch's example indices: a fresh permutation of the split each epoch.

    Whole-batch numpy indexing instead of grain's per-record ``shuffle``, whose Python work per
    record would be most of a batch's cost. Batches run across epoch boundaries, so every
    example is seen once per epoch and no data is dropped.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed % 2**63
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._perms[epoch] = perm
        return perm

    def __call__(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, within = np.divmod(pos, self.num_examples)
        out = np.empty_like(pos)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out


# No worker threads: a batch is cheap on the caller's thread, while prefetch threads would
# compete with XLA for the cores of a small machine and make start-up eager.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def padded_batches(n: int, batch_size: int,
                   make: Callable[[np.ndarray], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every index of ``range(n)`` once, in order, ``make(indices)`` per batch, with ``"valid"``
    marking real rows. The last batch is filled up to ``batch_size`` (so eval compiles one
    shape) with repeats of the first examples, marked ``valid == 0``: real inputs rather than
    zeros, so no model sees an all-padding text row."""
    for start in range(0, n, batch_size):
        real = np.arange(start, min(start + batch_size, n))
        pad = np.arange(batch_size - len(real)) % n
        batch = make(np.concatenate([real, pad]))
        valid = np.zeros(batch_size, np.float32)
        valid[: len(real)] = 1.0
        batch["valid"] = valid
        yield batch
