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
- ``bottleneck``: attention bottlenecks (Nagrani et al. 2021, MBT): each modality keeps its own
  layers, and modalities exchange information only through ``bottleneck_tokens`` shared tokens
  that every modality's layer updates and that are then averaged across modalities; pooled = the
  mean over modalities of each stream's learned [CLS] token.

Every kind takes any number of modalities except ``co_attention`` (two streams). A modality may
be absent from some examples (``features[m]["present"]``, bool [B], False = absent): its tokens
are replaced by one learned per-modality token (``<m>_absent``; for ``late`` a learned pooled
vector) and the rest of its positions are masked, so the fusion never reads the placeholder
input of an absent modality.
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

FUSION_KINDS = ("concat", "cross_attention", "co_attention", "late", "bottleneck")


def _ones_if_none(mask: Array | None, x: Array) -> Array:
    return jnp.ones(x.shape[:2], jnp.int32) if mask is None else mask


def fill_absent(x: Array, mask: Array | None, present: Array, token: Array
                ) -> tuple[Array, Array]:
    """Rows where ``present`` is False become ``token`` at every position, with only the first
    position valid in the returned mask (so attention reads one learned token, never the
    placeholder input)."""
    first = jnp.arange(x.shape[1]) == 0
    x = jnp.where(present[:, None, None], x, token.astype(x.dtype))
    base = _ones_if_none(mask, x)
    return x, jnp.where(present[:, None], base, first[None].astype(base.dtype))


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
            mask = _ones_if_none(masks[m], tokens[m])
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
    bottleneck_tokens: int = 4
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
        # Attention gets a modality's own mask, None where it has none (no all-ones mask).
        given = {m: features[m]["mask"] for m in order}
        present = {m: features[m].get("present") for m in order}
        for m in order:  # the learned stand-ins exist whether or not this batch needs them
            absent = self.param(f"{m}_absent", nn.initializers.normal(0.02), (self.width,))
            if present[m] is not None:
                tokens[m], given[m] = fill_absent(tokens[m], given[m], present[m], absent)
        masks = {m: _ones_if_none(given[m], tokens[m]) for m in order}

        if self.kind == "bottleneck":
            return Bottleneck(self.bottleneck_tokens, self.depth, self.num_heads,
                              self.mlp_dim or 4 * self.width, self.activation,
                              self.layer_norm_eps, self.opts, name="bottleneck")(
                tokens, given, train=train)

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
        pooled = []
        for m in order:
            p = features[m]["pooled"].astype(dtype)
            absent = self.param(f"{m}_absent_pooled", nn.initializers.normal(0.02),
                                (p.shape[-1],))
            if present[m] is not None:
                p = jnp.where(present[m][:, None], p, absent.astype(dtype))
            pooled.append(p)
        pooled = jnp.concatenate(pooled, -1)
        h = nn.Dense(self.mlp_dim or 4 * self.width, dtype=dtype, name="mlp_fc1")(pooled)
        h = layers.get_activation(self.activation, self.opts)(h)
        h = nn.Dropout(self.opts.dropout)(h, deterministic=not train)
        pooled = nn.Dense(self.width, dtype=dtype, name="mlp_fc2")(h)
        return {
            "tokens": jnp.concatenate([tokens[m] for m in order], axis=1),
            "pooled": pooled,
            "mask": jnp.concatenate([masks[m] for m in order], axis=1),
        }
