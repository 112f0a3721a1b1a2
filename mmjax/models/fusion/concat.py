"""Single-stream fusion (VisualBERT/UNITER-like): every modality's tokens, projected and tagged
with a learned modality embedding, are concatenated behind a learned fusion [CLS] token and run
through shared transformer layers; pooled = that [CLS] (``pool="first"``) or the masked mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.flops import layer_flops
from mmjax.models.fusion import base

Array = jax.Array


class ConcatFusion(base.Fusion):
    pool: str = "first"

    @nn.compact
    def __call__(self, features: base.Features, *, train: bool = False) -> dict[str, Any]:
        p = self.project(features)
        dtype = self.opts.dtype
        seq = []
        for m in p.order:
            emb = self.param(f"{m}_type", nn.initializers.normal(0.02), (self.width,))
            seq.append(p.tokens[m] + emb.astype(dtype))
        b = seq[0].shape[0]
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
        seq.insert(0, jnp.broadcast_to(cls.astype(dtype), (b, 1, self.width)))
        mask = jnp.concatenate([jnp.ones((b, 1), jnp.int32)] + [p.masks[m] for m in p.order], 1)
        x = jnp.concatenate(seq, axis=1)
        unmasked = all(p.given[m] is None for m in p.order)
        x = self.encoder("encoder", cross=False)(x, None if unmasked else mask, train=train)
        return {"tokens": x, "pooled": base.pool_tokens(self.pool, x, mask, self.opts),
                "mask": mask}

    def pool_rows(self, masks: Mapping[str, Array | None], sizes: Mapping[str, int],
                  b: int) -> Array:
        order = sorted(sizes)
        mask = jnp.concatenate([jnp.ones((b, 1))] + [self.mask_of(masks, sizes, m, b)
                                                     for m in order], 1)
        return base.first_or_mean(self.pool, mask)

    def relevance(self, rules: Any, towers: Mapping[str, Array], fusion_rows: Any
                  ) -> dict[str, Array]:
        order = sorted(towers)
        b = towers[order[0]].shape[0]
        r = base.blockdiag([base.eye(b, 1)] + [towers[m] for m in order])
        for path in rules.layer_paths("fusion/encoder/"):
            (r,) = rules.self_attention(path, r)
        row = base.pooled_row(r, fusion_rows)
        return base.split_columns(row, order, [towers[m].shape[-1] for m in order], start=1)

    def flops(self, towers: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
        t = 1 + sum(n for n, _ in towers.values())
        return (self.projection_flops(towers)
                + self.depth * layer_flops(t, self.width, self.hidden), self.width)
