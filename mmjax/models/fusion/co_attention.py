"""Co-attention fusion (ViLBERT-like), two streams: in each layer each stream attends to the
other's previous state; pooled = the two streams' masked means, concatenated."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers, scan
from mmjax.models.flops import layer_flops
from mmjax.models.fusion import base

Array = jax.Array


class CoAttentionLayer(nn.Module):
    """One co-attention layer as a scan body: each stream's Block attends to the other's input.

    ``(xa, xb) → ((xa', xb'), None)`` with Blocks named by ``streams``; ``nn.scan`` over it gives
    the scanned co-attention fusion (``co_layers/<stream>/...``, see ``scan.match_layers``).
    """

    streams: tuple[str, str]
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()
    train: bool = False

    @nn.compact
    def __call__(
        self, carry: tuple[Array, Array], mask_a: Array | None, mask_b: Array | None
    ) -> tuple[tuple[Array, Array], None]:
        block = _block_maker(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                             activation=self.activation, layer_norm_eps=self.layer_norm_eps,
                             opts=self.opts)
        return _co_attend(block, self.streams, *carry, mask_a, mask_b, self.train), None


def _block_maker(**kwargs: Any) -> Any:
    """``name -> cross-attention Block`` (rematerialised under ``opts.remat``)."""
    block_cls = scan.remat(layers.Block, kwargs["opts"].remat)
    return lambda name: block_cls(**kwargs, cross_attention=True, name=name)


def _co_attend(block: Any, names: tuple[str, str], xa: Array, xb: Array, mask_a: Array | None,
               mask_b: Array | None, train: bool) -> tuple[Array, Array]:
    """One co-attention layer: each stream attends to the other's input state (a None mask:
    every token of that stream is valid)."""
    return (block(names[0])(xa, mask_a, xb, mask_b, train),
            block(names[1])(xb, mask_b, xa, mask_a, train))


class CoAttentionFusion(base.Fusion):
    @nn.compact
    def __call__(self, features: base.Features, *, train: bool = False) -> dict[str, Any]:
        p = self.project(features)
        if len(p.order) != 2:
            raise ValueError(f"co_attention fuses exactly two modalities, got {p.order}")
        a, b = p.order
        xa, xb = p.tokens[a], p.tokens[b]
        block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.hidden,
                            activation=self.activation, layer_norm_eps=self.layer_norm_eps,
                            opts=self.opts)
        if self.opts.scan_layers and self.depth > 0:  # depth 0: no layers (layers.Encoder)
            stack = scan.scan_over_layers(CoAttentionLayer, self.depth, self.opts.scan_unroll)
            (xa, xb), _ = stack(streams=(a, b), **block_kwargs, train=train,
                                name=scan.SCANNED_PAIRS)((xa, xb), p.given[a], p.given[b])
        else:
            block = _block_maker(**block_kwargs)
            for i in range(self.depth):
                xa, xb = _co_attend(block, (f"{a}_layer_{i}", f"{b}_layer_{i}"),
                                    xa, xb, p.given[a], p.given[b], train)
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.opts.dtype,
                                         name=name)
        xa, xb = norm(f"{a}_norm")(xa), norm(f"{b}_norm")(xb)
        pooled = jnp.concatenate([layers.masked_mean(xa, p.masks[a], self.opts),
                                  layers.masked_mean(xb, p.masks[b], self.opts)], axis=-1)
        return {
            "tokens": jnp.concatenate([xa, xb], axis=1),
            "pooled": pooled,
            "mask": jnp.concatenate([p.masks[a], p.masks[b]], axis=1),
        }

    def pool_rows(self, masks: Mapping[str, Array | None], sizes: Mapping[str, int],
                  b: int) -> Array:
        """The masked mean of each stream, whatever ``pool`` would say."""
        ms = [self.mask_of(masks, sizes, m, b) for m in sorted(sizes)]
        return jnp.concatenate([m / jnp.maximum(m.sum(-1, keepdims=True), 1.0) for m in ms], 1)

    def relevance(self, rules: Any, towers: Mapping[str, Array], fusion_rows: Any
                  ) -> dict[str, Array]:
        a, b = sorted(towers)
        ta, tb = towers[a].shape[-1], towers[b].shape[-1]
        r = {(a, a): towers[a], (b, b): towers[b]}
        r[(a, b)] = jnp.zeros((towers[a].shape[0], ta, tb), jnp.float32)
        r[(b, a)] = jnp.swapaxes(r[(a, b)], 1, 2)
        for i in range(len(rules.layer_paths(f"fusion/{a}_"))):
            new = {}
            for s, q in ((a, b), (b, a)):  # both streams read the other's previous state
                r_ss, r_sq = rules.self_attention(f"fusion/{s}_layer_{i}/attn",
                                                  r[(s, s)], r[(s, q)])
                new[(s, s)], new[(s, q)] = rules.cross_attention(
                    f"fusion/{s}_layer_{i}/cross_attn", r_ss, r_sq, r[(q, q)], r[(q, s)])
            r = new
        rows_a, rows_b = fusion_rows[:, :ta], fusion_rows[:, ta:]
        return {m: base.pooled_row(r[(a, m)], rows_a) + base.pooled_row(r[(b, m)], rows_b)
                for m in (a, b)}

    def flops(self, towers: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
        (ta, _), (tb, _) = (towers[m] for m in sorted(towers))
        per_layer = (layer_flops(ta, self.width, self.hidden, context_len=tb)
                     + layer_flops(tb, self.width, self.hidden, context_len=ta))
        return self.projection_flops(towers) + self.depth * per_layer, 2 * self.width
