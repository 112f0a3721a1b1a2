"""Fusion of per-modality token sequences, chosen by ``config.model.fusion.kind``.

Every kind takes ``{modality: {"tokens": [B, T, D_m], "pooled": [B, D_m], "mask": [B, T] | None}}``
and returns ``{"tokens": [B, T', W], "pooled": [B, W'], "mask": [B, T'] | None}``:

- ``concat``: single stream (VisualBERT/UNITER-like). Tokens of every modality, projected to the
  fusion width and tagged with a learned modality embedding, are concatenated behind a learned
  fusion [CLS] token and run through shared transformer layers; pooled = that [CLS].
- ``cross_attention``: the ``query`` modality (text by default) runs self-attention and attends to
  the other modalities' tokens in every layer (ALBEF/BLIP-like); pooled = its first token.
- ``co_attention``: two streams (ViLBERT-like), each layer lets each stream attend to the other's
  previous state; pooled = the two streams' masked means, concatenated.
- ``late``: no token interaction; the encoders' pooled features are concatenated and mixed by a
  two-layer MLP; tokens are the projected sequences side by side (for heads that want them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers, scan

Array = jax.Array
Features = Mapping[str, Mapping[str, Array | None]]

FUSION_KINDS = ("concat", "cross_attention", "co_attention", "late")


def _mask_or_ones(f: Mapping[str, Array | None]) -> Array:
    t = f["tokens"]
    return jnp.ones(t.shape[:2], jnp.int32) if f["mask"] is None else f["mask"]


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


class Fusion(nn.Module):
    kind: str = "cross_attention"
    width: int = 64
    depth: int = 1
    num_heads: int = 4
    mlp_dim: int | None = None
    query: str = "text"
    pool: str = "first"
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()

    def _encoder(self, name: str, cross: bool) -> layers.Encoder:
        return layers.Encoder(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
            pre_norm=True, final_norm=True, activation=self.activation, cross_attention=cross,
            layer_norm_eps=self.layer_norm_eps, opts=self.opts, scan=self.opts.scan_layers,
            name=name,
        )

    def _pool(self, x: Array, mask: Array) -> Array:
        if self.pool == "first":
            return x[:, 0]
        if self.pool == "mean":
            return layers.masked_mean(x, mask, self.opts)
        raise ValueError(
            f"unknown fusion pool {self.pool!r} (model.fusion.pool); use first or mean"
        )

    @nn.compact
    def __call__(
        self, features: Features, *, train: bool = False
    ) -> dict[str, Array | None]:
        order = sorted(features)
        if self.kind not in FUSION_KINDS:
            raise ValueError(f"unknown fusion kind {self.kind!r} (model.fusion.kind); "
                             f"known: {FUSION_KINDS}")
        if len(order) < 2:
            raise ValueError(f"fusion needs two or more modalities, got {order}")
        dtype = self.opts.dtype
        tokens = {m: nn.Dense(self.width, dtype=dtype, name=f"{m}_proj")(features[m]["tokens"])
                  for m in order}
        masks = {m: _mask_or_ones(features[m]) for m in order}
        # Attention gets a modality's own mask, None where it has none (no all-ones mask).
        given = {m: features[m]["mask"] for m in order}

        if self.kind == "concat":
            seq = []
            for m in order:
                emb = self.param(f"{m}_type", nn.initializers.normal(0.02), (self.width,))
                seq.append(tokens[m] + emb.astype(dtype))
            b = seq[0].shape[0]
            cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
            seq.insert(0, jnp.broadcast_to(cls.astype(dtype), (b, 1, self.width)))
            mask = jnp.concatenate([jnp.ones((b, 1), jnp.int32)] + [masks[m] for m in order], 1)
            x = jnp.concatenate(seq, axis=1)
            unmasked = all(given[m] is None for m in order)
            x = self._encoder("encoder", cross=False)(x, None if unmasked else mask, train=train)
            return {"tokens": x, "pooled": self._pool(x, mask), "mask": mask}

        if self.kind == "cross_attention":
            if self.query not in features:
                raise ValueError(f"fusion query modality {self.query!r} (model.fusion.query) "
                                 f"is not among the encoders {order}")
            others = [m for m in order if m != self.query]
            ctx = jnp.concatenate([tokens[m] for m in others], axis=1)
            ctx_mask = (None if all(given[m] is None for m in others)
                        else jnp.concatenate([masks[m] for m in others], axis=1))
            x = self._encoder("encoder", cross=True)(
                tokens[self.query], given[self.query], ctx, ctx_mask, train=train
            )
            qmask = masks[self.query]
            return {"tokens": x, "pooled": self._pool(x, qmask), "mask": qmask}

        if self.kind == "co_attention":
            if len(order) != 2:
                raise ValueError(f"co_attention fuses exactly two modalities, got {order}")
            a, b = order
            xa, xb = tokens[a], tokens[b]
            block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
                                activation=self.activation, layer_norm_eps=self.layer_norm_eps,
                                opts=self.opts)
            if self.opts.scan_layers and self.depth > 0:  # depth 0: no layers (layers.Encoder)
                stack = scan.scan_over_layers(CoAttentionLayer, self.depth, self.opts.scan_unroll)
                (xa, xb), _ = stack(streams=(a, b), **block_kwargs, train=train,
                                    name=scan.SCANNED_PAIRS)((xa, xb), given[a], given[b])
            else:
                block = _block_maker(**block_kwargs)
                for i in range(self.depth):
                    xa, xb = _co_attend(block, (f"{a}_layer_{i}", f"{b}_layer_{i}"),
                                        xa, xb, given[a], given[b], train)
            norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=dtype, name=name)
            xa, xb = norm(f"{a}_norm")(xa), norm(f"{b}_norm")(xb)
            pooled = jnp.concatenate([layers.masked_mean(xa, masks[a], self.opts),
                                      layers.masked_mean(xb, masks[b], self.opts)], axis=-1)
            return {
                "tokens": jnp.concatenate([xa, xb], axis=1),
                "pooled": pooled,
                "mask": jnp.concatenate([masks[a], masks[b]], axis=1),
            }

        # late
        pooled = jnp.concatenate([features[m]["pooled"].astype(dtype) for m in order], -1)
        h = nn.Dense(self.mlp_dim or 4 * self.width, dtype=dtype, name="mlp_fc1")(pooled)
        h = layers.get_activation(self.activation, self.opts)(h)
        h = nn.Dropout(self.opts.dropout)(h, deterministic=not train)
        pooled = nn.Dense(self.width, dtype=dtype, name="mlp_fc2")(h)
        return {
            "tokens": jnp.concatenate([tokens[m] for m in order], axis=1),
            "pooled": pooled,
            "mask": jnp.concatenate([masks[m] for m in order], axis=1),
        }
