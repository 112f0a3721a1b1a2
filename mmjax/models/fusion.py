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

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

Array = jax.Array
Features = Mapping[str, Mapping[str, Array | None]]

FUSION_KINDS = ("concat", "cross_attention", "co_attention", "late")


def _mask_or_ones(f: Mapping[str, Array | None]) -> Array:
    t = f["tokens"]
    return jnp.ones(t.shape[:2], jnp.int32) if f["mask"] is None else f["mask"]


class CoAttentionLayer(nn.Module):
    """One co-attention layer as a scan body: each stream's Block attends to the other's input.

    ``(xa, xb) → ((xa', xb'), None)`` with Blocks named by ``streams``; ``nn.scan`` over it gives
    the scanned co-attention fusion (``co_layers/<stream>/...``, see ``layers.match_layers``).
    """

    streams: tuple[str, str]
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_implementation: str | None = None
    remat: str | None = None
    kv_padding: str = "mask"  # see layers.Block
    train: bool = False

    @nn.compact
    def __call__(
        self, carry: tuple[Array, Array], mask_a: Array | None, mask_b: Array | None
    ) -> tuple[tuple[Array, Array], None]:
        block = _block_maker(
            self.remat, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            activation=self.activation, layer_norm_eps=self.layer_norm_eps, dropout=self.dropout,
            dtype=self.dtype, attn_implementation=self.attn_implementation,
            kv_padding=self.kv_padding,
        )
        return _co_attend(block, self.streams, *carry, mask_a, mask_b, self.train), None


def _block_maker(remat: str | None, **kwargs: Any) -> Any:
    """``name -> cross-attention Block`` (rematerialised under ``remat``)."""
    block_cls = layers.remat_block(remat)
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
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_implementation: str | None = None
    remat: str | None = None
    scan_layers: bool = False  # one nn.scan over the stacked layers (layers.Encoder's docstring)
    scan_unroll: int = 0  # layers per scan iteration; 0 = all (see layers.scan_over_layers)
    # "right": every modality's mask is right padding (1s then 0s, the text tower's "right"),
    # so attention to one modality's keys takes key lengths (cuDNN's own padding, no
    # [B, 1, Tq, Tk] bias, whose gradient cuDNN computes too); "mask": any 0/1 mask, as a
    # boolean mask. MultimodalModel sets it from the text tower's ``padding`` unless
    # ``model.fusion.padding`` is given.
    padding: str = "mask"

    def _encoder(self, name: str, cross: bool, kv_padding: str = "mask") -> layers.Encoder:
        return layers.Encoder(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            pre_norm=True,
            final_norm=True,
            activation=self.activation,
            cross_attention=cross,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            remat=self.remat,
            scan=self.scan_layers,
            scan_unroll=self.scan_unroll,
            kv_padding=kv_padding,
            name=name,
        )

    def _project(self, features: Features, order: Sequence[str]) -> dict[str, Array]:
        return {
            m: nn.Dense(self.width, dtype=self.dtype, name=f"{m}_proj")(features[m]["tokens"])
            for m in order
        }

    def _pool(self, x: Array, mask: Array) -> Array:
        if self.pool == "first":
            return x[:, 0]
        if self.pool == "mean":
            return layers.masked_mean(x, mask)
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
        kv_padding = layers.kv_padding_of(self.padding, "fusion padding (model.fusion.padding)")
        tokens = self._project(features, order)
        masks = {m: _mask_or_ones(features[m]) for m in order}
        # Attention gets a modality's own mask, None where it has none: cuDNN then runs its
        # plain kernel instead of one that reads a materialised [B, 1, Tq, Tk] bias of ones.
        given = {m: features[m]["mask"] for m in order}

        if self.kind == "concat":
            seq = []
            for m in order:
                emb = self.param(f"{m}_type", nn.initializers.normal(0.02), (self.width,))
                seq.append(tokens[m] + emb.astype(self.dtype))
            b = seq[0].shape[0]
            cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width))
            seq.insert(0, jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)))
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
            # Concatenated right-padded masks are right padding only if just the last is masked.
            ctx_right = all(given[m] is None for m in others[:-1])
            x = self._encoder("encoder", cross=True, kv_padding=kv_padding if ctx_right
                              else "mask")(
                tokens[self.query], given[self.query], ctx, ctx_mask, train=train
            )
            qmask = masks[self.query]
            return {"tokens": x, "pooled": self._pool(x, qmask), "mask": qmask}

        if self.kind == "co_attention":
            if len(order) != 2:
                raise ValueError(f"co_attention fuses exactly two modalities, got {order}")
            a, b = order
            xa, xb = tokens[a], tokens[b]
            block_kwargs = dict(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim or 4 * self.width,
                activation=self.activation,
                layer_norm_eps=self.layer_norm_eps,
                dropout=self.dropout,
                dtype=self.dtype,
                attn_implementation=self.attn_implementation,
                remat=self.remat,
                kv_padding=kv_padding,
            )
            if self.scan_layers and self.depth > 0:  # depth 0: no layers (see layers.Encoder)
                stack = layers.scan_over_layers(CoAttentionLayer, self.depth, self.scan_unroll)
                (xa, xb), _ = stack(
                    streams=(a, b), **block_kwargs, train=train, name=layers.SCANNED_PAIRS
                )((xa, xb), given[a], given[b])
            else:
                block = _block_maker(**block_kwargs)
                for i in range(self.depth):
                    xa, xb = _co_attend(block, (f"{a}_layer_{i}", f"{b}_layer_{i}"),
                                        xa, xb, given[a], given[b], train)
            norm = lambda name: nn.LayerNorm(
                epsilon=self.layer_norm_eps, dtype=self.dtype, name=name
            )
            xa, xb = norm(f"{a}_norm")(xa), norm(f"{b}_norm")(xb)
            pooled = jnp.concatenate(
                [layers.masked_mean(xa, masks[a]), layers.masked_mean(xb, masks[b])], axis=-1
            )
            return {
                "tokens": jnp.concatenate([xa, xb], axis=1),
                "pooled": pooled,
                "mask": jnp.concatenate([masks[a], masks[b]], axis=1),
            }

        # late
        pooled = jnp.concatenate([features[m]["pooled"].astype(self.dtype) for m in order], -1)
        h = nn.Dense(self.mlp_dim or 4 * self.width, dtype=self.dtype, name="mlp_fc1")(pooled)
        h = nn.Dropout(self.dropout)(layers.get_activation(self.activation)(h), not train)
        pooled = nn.Dense(self.width, dtype=self.dtype, name="mlp_fc2")(h)
        return {
            "tokens": jnp.concatenate([tokens[m] for m in order], axis=1),
            "pooled": pooled,
            "mask": jnp.concatenate([masks[m] for m in order], axis=1),
        }
