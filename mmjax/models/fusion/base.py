"""What every fusion kind shares: its common options, the input projection with learned stand-ins
for absent modalities, and the small tensor helpers the explain rules use.

Every kind takes ``{modality: {"tokens": [B, T, D_m], "pooled": [B, D_m], "mask": [B, T] | None,
"present": bool [B] | None}}`` and returns ``{"tokens": [B, T', W], "pooled": [B, W'],
"mask": [B, T'] | None}``. Besides ``__call__`` a kind says how it pools its output tokens
(``pool_rows``), how relevance flows through it (``relevance``, Chefer et al.'s rules) and its
FLOPs (``flops``), so the explainers and the benchmark never switch on the kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.flops import dense_flops

Array = jax.Array
Features = Mapping[str, Mapping[str, Any]]  # {"tokens", "pooled", "mask", "present"}


def ones_if_none(mask: Array | None, x: Array) -> Array:
    return jnp.ones(x.shape[:2], jnp.int32) if mask is None else mask


def fill_absent(x: Array, mask: Array | None, present: Array, token: Array
                ) -> tuple[Array, Array]:
    """Rows where ``present`` is False become ``token`` at every position, with only the first
    position valid in the returned mask (so attention reads one learned token, never the
    placeholder input)."""
    first = jnp.arange(x.shape[1]) == 0
    x = jnp.where(present[:, None, None], x, token.astype(x.dtype))
    base = ones_if_none(mask, x)
    return x, jnp.where(present[:, None], base, first[None].astype(base.dtype))


@dataclasses.dataclass(frozen=True)
class Projected:
    """A fusion's inputs projected to its width: ``tokens``, the modalities' own masks
    (``given``, None where a modality has none) and the masks with None made all-ones."""

    order: list[str]
    tokens: dict[str, Array]
    given: dict[str, Array | None]
    masks: dict[str, Array]
    present: dict[str, Array | None]


class Fusion(nn.Module):
    """Base of the fusion kinds; a kind subclasses it and adds its own options."""

    width: int = 64
    depth: int = 1
    num_heads: int = 4
    mlp_dim: int | None = None
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()

    @property
    def hidden(self) -> int:
        return self.mlp_dim or 4 * self.width

    def reads(self) -> dict[str, str]:
        """``{option: modality}`` for the options that name a modality the fusion needs
        (cross-attention's ``query``)."""
        return {}

    def project(self, features: Features) -> Projected:
        """Checks the modality count; projects each modality's tokens to ``width`` and puts its
        learned stand-in (``<m>_absent``) where it is absent. Called first in ``__call__``."""
        order = sorted(features)
        if len(order) < 2:
            raise ValueError(f"fusion needs two or more modalities, got {order}")
        tokens = {m: nn.Dense(self.width, dtype=self.opts.dtype, name=f"{m}_proj")(
            features[m]["tokens"]) for m in order}
        # Attention gets a modality's own mask, None where it has none (no all-ones mask).
        given = {m: features[m]["mask"] for m in order}
        present = {m: features[m].get("present") for m in order}
        for m in order:  # the learned stand-ins exist whether or not this batch needs them
            absent = self.param(f"{m}_absent", nn.initializers.normal(0.02), (self.width,))
            here = present[m]
            if here is not None:
                tokens[m], given[m] = fill_absent(tokens[m], given[m], here, absent)
        masks = {m: ones_if_none(given[m], tokens[m]) for m in order}
        return Projected(order, tokens, given, masks, present)

    def encoder(self, name: str, cross: bool) -> layers.Encoder:
        return layers.Encoder(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.hidden, pre_norm=True,
            final_norm=True, activation=self.activation, cross_attention=cross,
            layer_norm_eps=self.layer_norm_eps, opts=self.opts, scan=self.opts.scan_layers,
            name=name,
        )

    # --- what the explainers and the benchmark ask -----------------------------------------

    def pool_rows(self, masks: Mapping[str, Array | None], sizes: Mapping[str, int],
                  b: int) -> Array | None:
        """[B, T'] weights of the pooled feature over the output tokens (rows sum to one);
        None when the pooled feature is not a pooling of token rows."""
        return None

    def relevance(self, rules: Any, towers: Mapping[str, Array], fusion_rows: Any
                  ) -> dict[str, Array] | None:
        """Relevance [B, T_m] of each modality's tokens through the fusion, from the towers'
        relevance matrices ``towers`` (``rules``: ``mmjax.interpret.relevance.Rules``); None
        when the heads read the towers' pooled features instead."""
        raise NotImplementedError(f"relevance through {type(self).__name__} is not defined")

    def flops(self, towers: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
        """(forward FLOPs per example, width of the pooled feature); ``towers``: (T, D)."""
        raise NotImplementedError(f"no FLOP count for {type(self).__name__}")

    def projection_flops(self, towers: Mapping[str, tuple[int, int]]) -> int:
        return sum(dense_flops(t, d, self.width) for t, d in towers.values())

    def mask_of(self, masks: Mapping[str, Array | None], sizes: Mapping[str, int], m: str,
                b: int) -> Array:
        v = masks.get(m)
        return jnp.ones((b, sizes[m]), jnp.float32) if v is None else jnp.asarray(v, jnp.float32)


def first_or_mean(pool: str, mask: Array) -> Array:
    """Pooling rows of ``pool`` ("first" token, or the masked "mean") over ``mask`` [B, T]."""
    if pool == "first":
        return jnp.zeros_like(mask).at[:, 0].set(1.0)
    return mask / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)


def pool_tokens(pool: str, x: Array, mask: Array, opts: layers.Options) -> Array:
    if pool == "first":
        return x[:, 0]
    if pool == "mean":
        return layers.masked_mean(x, mask, opts)
    raise ValueError(f"unknown fusion pool {pool!r} (model.fusion.pool); use first or mean")


# --- relevance helpers -------------------------------------------------------------------------


def eye(b: int, t: int) -> Array:
    return jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32), (b, t, t))


def blockdiag(blocks: list[Array]) -> Array:
    b = blocks[0].shape[0]
    n = sum(x.shape[-1] for x in blocks)
    out = jnp.zeros((b, n, n), jnp.float32)
    i = 0
    for x in blocks:
        t = x.shape[-1]
        out = out.at[:, i:i + t, i:i + t].set(x)
        i += t
    return out


def pooled_row(r: Array, rows: Array) -> Array:
    """Weighted rows: ``rows`` [B, T] (summing to one) · R [B, T, K] → [B, K]."""
    return jnp.einsum("bt,btk->bk", rows, r)


def split_columns(row: Array, order: list[str], sizes: list[int], start: int = 0
                  ) -> dict[str, Array]:
    """``row`` [B, K] cut into consecutive blocks of ``sizes`` columns, one per modality."""
    out, i = {}, start
    for m, t in zip(order, sizes, strict=True):
        out[m] = row[:, i:i + t]
        i += t
    return out
