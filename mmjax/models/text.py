"""BERT-style text encoder; the one text tower of mmjax (BERT and CLIP text load into it)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.flops import dense_flops, layer_flops

Array = jax.Array


class TextEncoder(nn.Module):
    """Token + position (+ segment) embeddings, a transformer, and pooling.

    Returns ``{"tokens": [B, L, D], "pooled": [B, D], "mask": [B, L]}``. Options cover both
    families: BERT is ``pre_norm=False, embed_norm=True, final_norm=False, pooler=True,
    pool="cls"``; CLIP text is ``pre_norm=True, causal=True, final_norm=True, pool="last"`` (or
    "argmax" on token ids, as older CLIP checkpoints do), quick_gelu activation, no segments.

    ``mask`` may be any 0/1 pattern (attention masks the keys); pooling "last" assumes right
    padding, which every mmjax tokenizer writes.

    ``token_embeds`` ([B, L, D]) replaces the token-embedding lookup of ``ids`` (positions,
    segments and pooling still come from ``ids`` and ``mask``): the entry point for gradients
    with respect to the input embeddings (``mmjax.robust.attacks``). In a batch it is one more
    key of the text entry, ``{"ids", "mask", "token_embeds"}``.

    Pooling: "cls" first token, "mean" masked mean, "last" last valid token by mask,
    "argmax" the position of the largest token id (CLIP's end-of-text token), "eos" the first
    position whose id is ``eos_token_id`` (newer CLIP checkpoints; position 0 when absent, as in
    Hugging Face).
    """

    vocab_size: int
    variant: str = "mu"
    width: int | None = None
    depth: int | None = None
    mlp_dim: int | None = None
    num_heads: int | None = None
    max_len: int = 512
    type_vocab_size: int = 2
    pre_norm: bool = False
    embed_norm: bool = True
    final_norm: bool = False
    causal: bool = False
    pool: str = "cls"
    eos_token_id: int = 2
    pooler: bool = False
    activation: str = "gelu"
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-12
    opts: layers.Options = layers.Options()

    def sizes(self) -> dict[str, int]:
        size = layers.tower_sizes(
            self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
        )
        size.pop("patch_size", None)
        return size

    def pool_rows(self, ids: Array, num_tokens: int, mask: Array | None = None,
                  **unused: Any) -> Array:
        """The pooling's weights over the tokens (called with the text entry's keywords)."""
        ids = jnp.asarray(ids)
        mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
        b = ids.shape[0]
        if self.pool == "cls":
            return layers.pool_one_hot(b, num_tokens, 0)
        if self.pool == "mean":
            return layers.pool_mean(b, num_tokens, 0, mask)
        if self.pool == "last":
            return layers.pool_one_hot(b, num_tokens, jnp.maximum(mask.sum(-1) - 1, 0))
        if self.pool == "argmax":
            return layers.pool_one_hot(b, num_tokens, jnp.argmax(ids, -1))
        return layers.pool_one_hot(b, num_tokens, jnp.argmax(ids == self.eos_token_id, -1))

    def flops(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``input_shape``: the ids' ``[L]``; token embeddings are look-ups (0 FLOPs)."""
        s = self.sizes()
        t, d = input_shape[0], s["width"]
        total = s["depth"] * layer_flops(t, d, s["mlp_dim"])
        return total + (dense_flops(1, d, d) if self.pooler else 0), t, d

    @nn.compact
    def __call__(
        self,
        ids: Array,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        *,
        token_embeds: Array | None = None,
        train: bool = False,
    ) -> dict[str, Array]:
        s = self.sizes()
        d = s["width"]
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"text length {length} exceeds the encoder's max_len {self.max_len}")
        if mask is None:
            mask = jnp.ones_like(ids)
        init = nn.initializers.normal(stddev=0.02)
        x = nn.Embed(self.vocab_size, d, embedding_init=init, name="token_embedding")(ids)
        if token_embeds is not None:  # [B, L, D] instead of the lookup (input-gradient attacks)
            x = token_embeds.astype(x.dtype)
        if self.opts.explain:  # a gradient point on the token embeddings (mmjax.explain)
            x = self.perturb("token_embeddings", x)
        pos = self.param("position_embedding", init, (self.max_len, d), jnp.float32)
        if self.type_vocab_size:
            seg = jnp.zeros_like(ids) if segment_ids is None else segment_ids
            x = x + nn.Embed(
                self.type_vocab_size, d, embedding_init=init, name="segment_embedding"
            )(seg)
        x = layers.add_positions(x, pos[:length], self.opts)  # last, as BERT adds them
        if self.embed_norm:
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.opts.dtype,
                             name="embed_norm")(x)
        x = nn.Dropout(self.opts.dropout)(x, deterministic=not train)
        x = layers.Encoder(
            depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"],
            pre_norm=self.pre_norm, final_norm=self.final_norm, activation=self.activation,
            qkv_bias=self.qkv_bias, causal=self.causal, layer_norm_eps=self.layer_norm_eps,
            opts=self.opts, scan=self.opts.scan_layers, name="encoder",
        )(x, mask, train=train)
        batch = jnp.arange(ids.shape[0])
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "mean":
            pooled = layers.masked_mean(x, mask, self.opts)
        elif self.pool == "last":
            pooled = x[batch, jnp.maximum(mask.sum(axis=1) - 1, 0)]
        elif self.pool == "argmax":
            pooled = x[batch, jnp.argmax(ids, axis=1)]
        elif self.pool == "eos":
            pooled = x[batch, jnp.argmax(ids == self.eos_token_id, axis=1)]
        else:
            raise ValueError(f"unknown text pool {self.pool!r}; use cls, mean, last, argmax or eos")
        if self.pooler:
            pooled = jnp.tanh(nn.Dense(d, dtype=self.opts.dtype, name="pooler")(pooled))
        return {"tokens": x, "pooled": pooled, "mask": mask}
