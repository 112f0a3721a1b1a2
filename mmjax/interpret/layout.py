"""Where each tower's tokens sit in its input, and how towers and the fusion pool them.

A relevance vector over a tower's tokens becomes an image heat map over the patch grid (first
row = top), a spectrogram map over the AST patch grid (rows = mel bands, low first) or Whisper's
time steps, or one score per text token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.models import fusion as fusion_lib
from mmjax.models.multimodal import ENCODERS, MultimodalModel
from mmjax.models.registry import module_kwargs


def tower_kind(model: MultimodalModel, modality: str) -> str:
    return model.encoders[modality]["kind"]


def _tower(model: MultimodalModel, modality: str) -> Any:
    """An unbound instance of the tower (its options with defaults filled in)."""
    cfg = model.encoders[modality]
    cls = ENCODERS[cfg["kind"]]
    return cls(**module_kwargs(cls, cfg, f"model.{modality}"), opts=model.opts, parent=None)


def prefix_tokens(model: MultimodalModel, modality: str) -> int:
    """Tokens before the grid: a ViT's class token, AST's [CLS] and distillation tokens."""
    kind, t = tower_kind(model, modality), _tower(model, modality)
    if kind == "vit":
        return int(t.class_token)
    if kind == "ast":
        return 2
    return 0


def grid(model: MultimodalModel, modality: str, shape: tuple[int, ...], num_tokens: int
         ) -> tuple[int, int]:
    """(rows, cols) of the tower's token grid for an input of ``shape`` (no batch axis)."""
    kind, t = tower_kind(model, modality), _tower(model, modality)
    n = num_tokens - prefix_tokens(model, modality)
    if kind == "vit":
        p = t.sizes()["patch_size"]
        return shape[0] // p, shape[1] // p
    if kind == "ast":  # features [frames, mels]; the patch grid is mels-major
        frames, mels = shape
        rows = (mels - t.patch_size) // t.frequency_stride + 1
        return rows, (frames - t.patch_size) // t.time_stride + 1
    if kind == "whisper":
        return 1, n
    side = round(np.sqrt(n))  # a ResNet's final feature map
    return (side, side) if side * side == n else (1, n)


def tower_rows(model: MultimodalModel, modality: str, batch: Mapping[str, Any],
               num_tokens: int) -> jnp.ndarray:
    """[B, T] weights of a tower's pooling over its output tokens (rows sum to one)."""
    kind, t = tower_kind(model, modality), _tower(model, modality)
    x = batch[modality]
    b = (x["ids"] if isinstance(x, Mapping) else x).shape[0]

    def one_hot(idx: Any) -> jnp.ndarray:
        return jnp.broadcast_to(jnp.eye(num_tokens, dtype=jnp.float32)[idx], (b, num_tokens))

    def mean(start: int, mask: Any = None) -> jnp.ndarray:
        w = jnp.zeros((b, num_tokens), jnp.float32).at[:, start:].set(1.0)
        if mask is not None:
            w = w * jnp.asarray(mask, jnp.float32)
        return w / jnp.maximum(w.sum(-1, keepdims=True), 1.0)

    if kind == "vit":
        if t.pool in ("cls", "none"):
            return one_hot(0)
        return mean(int(t.class_token))
    if kind == "ast":
        return mean(2) if t.pool == "gap" else (one_hot(0) + one_hot(1)) / 2
    if kind == "whisper":
        return one_hot(0) if t.pool == "first" else mean(0)
    if kind == "text":
        ids = jnp.asarray(x["ids"])
        mask = jnp.asarray(x.get("mask", jnp.ones_like(ids)))
        if t.pool == "cls":
            return one_hot(0)
        if t.pool == "mean":
            return mean(0, mask)
        if t.pool == "last":
            return one_hot(jnp.maximum(mask.sum(-1) - 1, 0))
        if t.pool == "argmax":
            return one_hot(jnp.argmax(ids, -1))
        return one_hot(jnp.argmax(ids == t.eos_token_id, -1))
    return mean(0)


def fuser(model: MultimodalModel) -> Any:
    """An unbound instance of the model's fusion (None: a two-tower model), to ask how it pools
    and how relevance flows through it."""
    return fusion_lib.build(model.fusion, model.opts, parent=None)


def to_map(model: MultimodalModel, modality: str, scores: np.ndarray,
           shape: tuple[int, ...]) -> np.ndarray:
    """Token scores [T] of one example → the tower's 2-D grid (prefix tokens dropped)."""
    p = prefix_tokens(model, modality)
    rows, cols = grid(model, modality, shape, scores.shape[-1])
    return np.asarray(scores[p:p + rows * cols]).reshape(rows, cols)
