"""Several views of one example at evaluation: fold them into the batch, average the answers.

The eval preprocessing of a clip may emit ``V`` views, ``[B, V, T, H, W, 3]`` for video
(``data.video.num_clips`` x ``num_crops``, ``mmjax.pp.video``). ``MultimodalModel`` then runs
once on the ``B * V`` rows (``fold``: every other input repeated per view) and averages per
example (``average``, ``average_embeddings``):
class probabilities for classification heads, returned as logits ``log(mean_v softmax)`` so
that the loss, accuracy, ``softmax`` in predict and every other reader of ``logits`` see the
averaged prediction; other per-row outputs by their mean (contrastive embeddings: the mean,
normalised again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# Per modality, the rank of a batch entry that carries views (one more than a plain batch).
VIEW_RANK = {"video": 6}


def count(batch: Mapping[str, Any]) -> int:
    """The number of views per example in ``batch`` (1 without views); all view entries must
    agree."""
    found = {int(batch[m].shape[1]) for m, rank in VIEW_RANK.items()
             if m in batch and getattr(batch[m], "ndim", 0) == rank}
    if len(found) > 1:
        raise ValueError(f"the batch's inputs carry different numbers of views: {sorted(found)}")
    return found.pop() if found else 1


def fold(batch: Mapping[str, Any], views: int) -> dict[str, Any]:
    """``batch`` with ``B * views`` rows, row ``b * views + v`` = view ``v`` of example ``b``:
    view entries reshaped, every other array repeated ``views`` times."""

    def one(key: str, x: Any) -> Any:
        if key in VIEW_RANK and getattr(x, "ndim", 0) == VIEW_RANK[key]:
            return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
        return jax.tree.map(lambda a: jnp.repeat(a, views, axis=0)
                            if getattr(a, "ndim", 0) else a, x)

    return {k: one(k, v) for k, v in batch.items()}


def average(outputs: Mapping[str, Any], heads: Mapping[str, Mapping[str, Any]],
            views: int) -> dict[str, Any]:
    """Per task, the outputs of ``B * views`` rows averaged to ``B``: a classification head's
    ``logits`` become ``log(mean_v softmax(logits))``, ``*_embeds`` their mean normalised, other
    row arrays their mean."""

    def per_example(x: Any) -> Any:
        if getattr(x, "ndim", 0) == 0:
            return x
        return x.reshape(x.shape[0] // views, views, *x.shape[1:])

    out: dict[str, Any] = {}
    for task, head_out in outputs.items():
        classification = heads[task].get("kind") == "classification"
        entry = {}
        for name, x in head_out.items():
            x = per_example(x)
            if getattr(x, "ndim", 0) == 0:
                entry[name] = x
            elif classification and name == "logits":
                logp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
                entry[name] = jax.nn.logsumexp(logp, axis=1) - jnp.log(float(views))
            elif name.endswith("_embeds"):  # contrastive: unit vectors stay unit vectors
                entry[name] = _unit(jnp.mean(x, axis=1))
            else:
                entry[name] = jnp.mean(x, axis=1).astype(x.dtype)
        out[task] = entry
    return out


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def average_embeddings(out: Mapping[str, jax.Array], views: int) -> dict[str, jax.Array]:
    """Contrastive embeddings of ``B * views`` rows: each example's mean over its views,
    L2-normalised again."""
    means = {k: jnp.mean(v.reshape(v.shape[0] // views, views, *v.shape[1:]), axis=1)
             for k, v in out.items()}
    return {k: _unit(v) for k, v in means.items()}
