"""The towers (encoders) by kind: ``config.model.encoders.<modality> = {"kind": ..., **options}``.

Every tower maps its modality's batch entry (an array, or a dict of keyword arguments such as
``{"ids", "mask"}``) to ``{"tokens": [B, T, D], "pooled": [B, D], "mask": [B, T] | None}``.
Besides that, a tower answers what the explainers and the benchmark ask of it (``Tower``'s
methods), so they never switch on its kind. ``ENCODERS.register(kind, cls)`` adds a tower of
your own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.audio import AST, WhisperEncoder
from mmjax.models.registry import Registry
from mmjax.models.resnet import ResNet
from mmjax.models.series import SeriesEncoder
from mmjax.models.text import TextEncoder
from mmjax.models.video import ViViT
from mmjax.models.vit import ViT

ENCODERS: Registry[Any] = Registry("encoder", {
    "vit": ViT, "resnet": ResNet, "text": TextEncoder, "ast": AST, "whisper": WhisperEncoder,
    "series": SeriesEncoder, "vivit": ViViT,
})


def tower(modality: str, cfg: Mapping[str, Any], opts: Any, **kwargs: Any) -> Any:
    """The tower module of ``config.model.encoders.<modality>`` (``kwargs``: ``name``,
    ``parent=None`` for an unbound instance whose methods describe it)."""
    return ENCODERS.build(cfg, f"model.encoders.{modality}", opts=opts, **kwargs)


# --- what a tower says about itself (defaults for towers that do not say) ---------------------


def prefix_tokens(t: Any) -> int:
    """Tokens before the grid (a class token): ``t.prefix_tokens()`` or 0."""
    fn = getattr(t, "prefix_tokens", None)
    return int(fn()) if fn is not None else 0


def token_grid(t: Any, input_shape: tuple[int, ...], num_tokens: int) -> tuple[int, int]:
    """(rows, cols) of the grid the tower's tokens after its prefix form, for one input of
    ``input_shape`` (no batch axis): ``t.token_grid(...)``, else one row."""
    fn = getattr(t, "token_grid", None)
    if fn is not None:
        return fn(input_shape, num_tokens)
    return 1, num_tokens - prefix_tokens(t)


def pool_rows(t: Any, inputs: Any, num_tokens: int) -> jax.Array:
    """[B, T] weights of the tower's pooling over its output tokens (rows sum to one):
    ``t.pool_rows(...)``, else the mean over all tokens."""
    fn = getattr(t, "pool_rows", None)
    if fn is not None:
        return fn(**inputs, num_tokens=num_tokens) if isinstance(inputs, Mapping) else \
            fn(inputs, num_tokens)
    b = jax.tree.leaves(inputs)[0].shape[0]
    return jnp.full((b, num_tokens), 1.0 / num_tokens, jnp.float32)


def display(t: Any, input_map: np.ndarray) -> np.ndarray:
    """An input-shaped 2-D map as drawn, rows first (AST's [frames, mels] becomes
    [mels, frames]): ``t.display(...)``, else unchanged."""
    fn = getattr(t, "display", None)
    return fn(input_map) if fn is not None else input_map


def flops(t: Any, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(forward FLOPs per example, output tokens, width) for one input of ``input_shape``."""
    fn = getattr(t, "flops", None)
    if fn is None:
        raise NotImplementedError(f"no analytic FLOP count for {type(t).__name__}")
    return fn(input_shape)
