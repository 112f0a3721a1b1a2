"""Cross-attention fusion (ALBEF/BLIP-like): the ``query`` modality (text by default) runs
self-attention and attends to the other modalities' tokens in every layer; pooled = its first
token (``pool="first"``) or its masked mean."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.flops import layer_flops
from mmjax.models.fusion import base

Array = jax.Array


class CrossAttentionFusion(base.Fusion):
    query: str = "text"
    pool: str = "first"

    def reads(self) -> dict[str, str]:
        return {"query": self.query}

    @nn.compact
    def __call__(self, features: base.Features, *, train: bool = False) -> dict[str, Any]:
        p = self.project(features)
        if self.query not in features:
            raise ValueError(f"fusion query modality {self.query!r} (model.fusion.query) "
                             f"is not among the encoders {p.order}")
        others = [m for m in p.order if m != self.query]
        ctx = jnp.concatenate([p.tokens[m] for m in others], axis=1)
        ctx_mask = (None if all(p.given[m] is None for m in others)
                    else jnp.concatenate([p.masks[m] for m in others], axis=1))
        x = self.encoder("encoder", cross=True)(
            p.tokens[self.query], p.given[self.query], ctx, ctx_mask, train=train)
        qmask = p.masks[self.query]
        return {"tokens": x, "pooled": base.pool_tokens(self.pool, x, qmask, self.opts),
                "mask": qmask}

    def pool_rows(self, masks: Mapping[str, Array | None], sizes: Mapping[str, int],
                  b: int) -> Array:
        return base.first_or_mean(self.pool, self.mask_of(masks, sizes, self.query, b))

    def relevance(self, rules: Any, towers: Mapping[str, Array], fusion_rows: Any
                  ) -> dict[str, Array]:
        others = [m for m in sorted(towers) if m != self.query]
        r_ss = towers[self.query]
        r_qq = base.blockdiag([towers[m] for m in others])
        r_sq = jnp.zeros((r_ss.shape[0], r_ss.shape[-1], r_qq.shape[-1]), jnp.float32)
        r_qs = jnp.swapaxes(r_sq, 1, 2)  # the context never attends to the query: stays zero
        for path in rules.layer_paths("fusion/encoder/"):
            r_ss, r_sq = rules.self_attention(path, r_ss, r_sq)
            r_ss, r_sq = rules.cross_attention(path.replace("/attn", "/cross_attn"),
                                               r_ss, r_sq, r_qq, r_qs)
        out = {self.query: base.pooled_row(r_ss, fusion_rows)}
        out.update(base.split_columns(base.pooled_row(r_sq, fusion_rows), others,
                                      [towers[m].shape[-1] for m in others]))
        return out

    def flops(self, towers: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
        ctx = sum(n for m, (n, _) in towers.items() if m != self.query)
        per_layer = layer_flops(towers[self.query][0], self.width, self.hidden, context_len=ctx)
        return self.projection_flops(towers) + self.depth * per_layer, self.width
