"""Attention bottlenecks (Nagrani et al. 2021, MBT): each modality keeps its own layers, and
modalities exchange information only through ``bottleneck_tokens`` shared tokens that every
modality's layer updates and that are then averaged across modalities; pooled = the mean over
modalities of each stream's learned [CLS] token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers, scan
from mmjax.models.fusion import base

Array = jax.Array


class Bottleneck(nn.Module):
    """MBT's attention bottlenecks over token streams already projected to one width.

    Layer i runs each modality's own Block on [its stream, the shared bottleneck tokens]; the
    modalities' updated bottleneck tokens are averaged into the next layer's. A modality sees
    the others only through those ``num_tokens`` tokens.
    """

    num_tokens: int
    depth: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, tokens: Mapping[str, Array], masks: Mapping[str, Array | None], *,
                 train: bool = False) -> dict[str, Array]:
        order = sorted(tokens)
        b, w, dtype = tokens[order[0]].shape[0], tokens[order[0]].shape[-1], self.opts.dtype
        init = nn.initializers.normal(0.02)
        z = self.param("tokens", init, (1, self.num_tokens, w)).astype(dtype)
        z = jnp.broadcast_to(z, (b, self.num_tokens, w))
        streams, attn_masks, out_masks = {}, {}, {}
        for m in order:
            cls = self.param(f"{m}_cls", init, (1, 1, w)).astype(dtype)
            streams[m] = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)), tokens[m]], 1)
            mask = base.ones_if_none(masks[m], tokens[m])
            out_masks[m] = jnp.concatenate([jnp.ones((b, 1), mask.dtype), mask], 1)
            attn_masks[m] = None if masks[m] is None else jnp.concatenate(
                [out_masks[m], jnp.ones((b, self.num_tokens), mask.dtype)], 1)
        block = scan.remat(layers.Block, self.opts.remat)
        for i in range(self.depth):
            updates = []
            for m in order:
                t = streams[m].shape[1]
                y = block(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=True,
                          activation=self.activation, layer_norm_eps=self.layer_norm_eps,
                          opts=self.opts, name=f"{m}_layer_{i}")(
                    jnp.concatenate([streams[m], z], 1), attn_masks[m], None, None, train)
                streams[m] = y[:, :t]
                updates.append(y[:, t:])
            z = jnp.mean(jnp.stack(updates), axis=0)
        outs = [nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=dtype, name=f"{m}_norm")(
            streams[m]) for m in order]
        return {
            "tokens": jnp.concatenate(outs, axis=1),
            "pooled": jnp.mean(jnp.stack([x[:, 0] for x in outs]), axis=0),
            "mask": jnp.concatenate([out_masks[m] for m in order], axis=1),
        }


class BottleneckFusion(base.Fusion):
    bottleneck_tokens: int = 4

    @nn.compact
    def __call__(self, features: base.Features, *, train: bool = False) -> dict[str, Any]:
        p = self.project(features)
        return Bottleneck(self.bottleneck_tokens, self.depth, self.num_heads, self.hidden,
                          self.activation, self.layer_norm_eps, self.opts, name="bottleneck")(
            p.tokens, p.given, train=train)
