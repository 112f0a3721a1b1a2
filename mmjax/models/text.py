"""BERT-style text encoder; the one text tower of mmjax (BERT and CLIP text load into it, #3)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

Array = jax.Array


class TextEncoder(nn.Module):
    """Token + position (+ segment) embeddings, a transformer, and pooling.

    Returns ``{"tokens": [B, L, D], "pooled": [B, D], "mask": [B, L]}``. Options cover both
    families: BERT is ``pre_norm=False, embed_norm=True, final_norm=False, pooler=True,
    pool="cls"``; CLIP text is ``pre_norm=True, causal=True, final_norm=True, pool="last"`` (or
    "argmax" on token ids, as older CLIP checkpoints do), quick_gelu activation, no segments.

    ``padding``: "right" (default) says a mask is 1s then 0s, as every mmjax tokenizer writes
    it (Hugging Face tokenizers are set to right padding too); self-attention then gets key
    lengths instead of a mask, which cuDNN applies natively (``layers.Attention``). "mask"
    accepts any 0/1 pattern (e.g. left padding) through a boolean mask. With right padding both
    compute the same (tests/test_models.py).

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
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_implementation: str | None = None
    remat: str | None = None
    padding: str = "right"
    scan_layers: bool = False  # one nn.scan over the stacked layers (layers.Encoder's docstring)
    scan_unroll: int = 0  # layers per scan iteration; 0 = all (see layers.scan_over_layers)

    def sizes(self) -> dict[str, int]:
        size = layers.tower_sizes(
            self.variant, width=self.width, depth=self.depth, mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
        )
        size.pop("patch_size", None)
        return size

    @nn.compact
    def __call__(
        self,
        ids: Array,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        *,
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
        pos = self.param("position_embedding", init, (self.max_len, d), jnp.float32)
        if self.type_vocab_size:
            seg = jnp.zeros_like(ids) if segment_ids is None else segment_ids
            x = x + nn.Embed(
                self.type_vocab_size, d, embedding_init=init, name="segment_embedding"
            )(seg)
        # Positions last (as HF's BERT adds them), with the cast: see layers.add_positions.
        x = layers.add_positions(x, pos[:length], self.dtype)
        if self.embed_norm:
            x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="embed_norm")(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = layers.Encoder(
            kv_padding=layers.kv_padding_of(self.padding, "text padding"),
            depth=s["depth"],
            num_heads=s["num_heads"],
            mlp_dim=s["mlp_dim"],
            pre_norm=self.pre_norm,
            final_norm=self.final_norm,
            activation=self.activation,
            qkv_bias=self.qkv_bias,
            causal=self.causal,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            remat=self.remat,
            scan=self.scan_layers,
            scan_unroll=self.scan_unroll,
            name="encoder",
        )(x, mask, train=train)
        batch = jnp.arange(ids.shape[0])
        if self.pool == "cls":
            pooled = x[:, 0]
        elif self.pool == "mean":
            pooled = layers.masked_mean(x, mask)
        elif self.pool == "last":
            pooled = x[batch, jnp.maximum(mask.sum(axis=1) - 1, 0)]
        elif self.pool == "argmax":
            pooled = x[batch, jnp.argmax(ids, axis=1)]
        elif self.pool == "eos":
            pooled = x[batch, jnp.argmax(ids == self.eos_token_id, axis=1)]
        else:
            raise ValueError(f"unknown text pool {self.pool!r}; use cls, mean, last, argmax or eos")
        if self.pooler:
            pooled = jnp.tanh(nn.Dense(d, dtype=self.dtype, name="pooler")(pooled))
        return {"tokens": x, "pooled": pooled, "mask": mask}
