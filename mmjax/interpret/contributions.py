"""Each modality's contribution to a prediction: the drop in the predicted class's probability
when the modality is absent, and Shapley values over modalities when there are three or more.

Absent follows the batch contract: ``batch["present"][m] = False`` for every row, and the
modality's entry replaced by a placeholder of the same shape and dtype (zeros; for text, ids 0
with only the first position unmasked, so no attention row is empty). A model that honours
``present`` ignores the placeholder; one that does not sees the placeholder instead, which is
the documented fallback: ablation by a neutral input.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def placeholder(x: Any) -> Any:
    """A stand-in of the same structure, shapes and dtypes that carries no information."""
    if isinstance(x, Mapping):
        out = {k: jnp.zeros_like(v) for k, v in x.items()}
        if "mask" in out:
            out["mask"] = out["mask"].at[:, 0].set(1)
        return out
    return jnp.zeros_like(x)


def without(batch: Mapping[str, Any], absent: Sequence[str]) -> dict[str, Any]:
    """``batch`` with the modalities in ``absent`` marked absent in every row."""
    out = dict(batch)
    present = dict(out.get("present", {}))
    for m in absent:
        b = jax.tree.leaves(batch[m])[0].shape[0]
        present[m] = jnp.zeros((b,), bool)
        out[m] = placeholder(batch[m])
    if absent:
        out["present"] = present
    return out


def contributions(prob: Callable[[Mapping[str, Any]], Array], batch: Mapping[str, Any],
                  modalities: Sequence[str]) -> dict[str, Array]:
    """``{m: [B]}``: with two modalities ``p(all) - p(all without m)``; with three or more the
    Shapley value of ``m`` in the game ``v(S) = p(only S present)`` (exact, 2^M passes)."""
    modalities = list(modalities)
    full = prob(batch)
    if len(modalities) < 3:
        return {m: full - prob(without(batch, [m])) for m in modalities}
    value: dict[frozenset, Array] = {}
    for k in range(len(modalities) + 1):
        for subset in itertools.combinations(modalities, k):
            gone = [m for m in modalities if m not in subset]
            value[frozenset(subset)] = full if not gone else prob(without(batch, gone))
    n = len(modalities)
    out = {}
    for m in modalities:
        rest = [x for x in modalities if x != m]
        total = jnp.zeros_like(full)
        for k in range(n):
            w = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for subset in itertools.combinations(rest, k):
                s = frozenset(subset)
                total = total + w * (value[s | {m}] - value[s])
        out[m] = total
    return out
