"""Late fusion: no token interaction; the towers' pooled features (a learned stand-in where a
modality is absent) are concatenated and mixed by a two-layer MLP; tokens are the projected
sequences side by side (for heads that want them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.flops import dense_flops
from mmjax.models.fusion import base

Array = jax.Array


class LateFusion(base.Fusion):
    @nn.compact
    def __call__(self, features: base.Features, *, train: bool = False) -> dict[str, Any]:
        p = self.project(features)
        dtype = self.opts.dtype
        pooled = []
        for m in p.order:
            x = features[m]["pooled"].astype(dtype)
            absent = self.param(f"{m}_absent_pooled", nn.initializers.normal(0.02),
                                (x.shape[-1],))
            here = p.present[m]
            if here is not None:
                x = jnp.where(here[:, None], x, absent.astype(dtype))
            pooled.append(x)
        h = nn.Dense(self.hidden, dtype=dtype, name="mlp_fc1")(jnp.concatenate(pooled, -1))
        h = layers.get_activation(self.activation, self.opts)(h)
        h = nn.Dropout(self.opts.dropout)(h, deterministic=not train)
        return {
            "tokens": jnp.concatenate([p.tokens[m] for m in p.order], axis=1),
            "pooled": nn.Dense(self.width, dtype=dtype, name="mlp_fc2")(h),
            "mask": jnp.concatenate([p.masks[m] for m in p.order], axis=1),
        }

    def relevance(self, rules: Any, towers: Mapping[str, Array], fusion_rows: Any
                  ) -> None:
        return None  # the head reads the towers' pooled features

    def flops(self, towers: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
        d_in = sum(d for _, d in towers.values())
        return dense_flops(1, d_in, self.hidden) + dense_flops(1, self.hidden, self.width), \
            self.width
