"""Task heads. Each reads the model's feature dict and returns what its loss consumes.

Features: ``{"pooled", "tokens", "mask"}`` from fusion (absent for two-tower models) plus
``{"<modality>": pooled encoder feature}`` for every tower, so a contrastive head can project the
towers' own features (CLIP-style) while a classification head reads the fused ``pooled``.

The pretraining objectives' heads (``itm``, ``mlm``, ``mim``, ``caption``) read inputs that
``objectives.py`` builds for them with the model's own towers and fusion (extra passes, masks,
negative pairs); their random draws live there too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers
from mmjax.models.registry import Registry

Array = jax.Array

# head kind -> the loss it uses unless the head config names one
DEFAULT_LOSS = {
    "classification": "softmax_xent",
    "regression": "mse",
    "contrastive": "infonce",
    "siglip": "siglip",
    "itm": "itm",
    "mlm": "mlm",
    "mim": "mim",
    "caption": "caption",
}


def _input(features: Mapping[str, Any], key: str) -> Array:
    if key not in features or features[key] is None:
        raise ValueError(f"head input {key!r} is not among the model features {sorted(features)}")
    return features[key]


def scatter_tokens(x: Array, idx: Array, n: int, fill: Array) -> Array:
    """[B, n, D] holding ``x[b, k]`` at position ``idx[b, k]`` and ``fill`` [D] elsewhere.

    ``idx`` must not repeat within a row (a permutation's prefix, as ``random_keep`` gives).
    """
    full = jnp.broadcast_to(fill.astype(x.dtype), (x.shape[0], n, x.shape[-1]))
    return full.at[jnp.arange(x.shape[0])[:, None], idx].set(x)


def normalize_patches(patches: Array, eps: float = 1e-6) -> Array:
    """MAE's ``norm_pix_loss`` targets: each patch minus its mean, over sqrt(its variance + eps)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True)
    return (patches - mean) / jnp.sqrt(var + eps)


class ClassificationHead(nn.Module):
    """Optional hidden layer, then logits; zero-initialised output as big_vision does."""

    num_classes: int
    hidden: int = 0
    input: str = "pooled"
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        x = _input(features, self.input)
        if self.hidden:
            x = nn.gelu(nn.Dense(self.hidden, dtype=self.opts.dtype, name="hidden")(x))
        x = nn.Dropout(self.opts.dropout)(x, deterministic=not train)
        logits = nn.Dense(
            self.num_classes, dtype=self.opts.dtype, kernel_init=nn.initializers.zeros, name="out"
        )(x)
        return {"logits": logits}


class RegressionHead(nn.Module):
    """Linear regression output; ``out_dim == 1`` returns predictions of shape [B]."""

    out_dim: int = 1
    hidden: int = 0
    input: str = "pooled"
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        x = _input(features, self.input)
        if self.hidden:
            x = nn.gelu(nn.Dense(self.hidden, dtype=self.opts.dtype, name="hidden")(x))
        y = nn.Dense(self.out_dim, dtype=self.opts.dtype, name="out")(x)
        return {"predictions": y[:, 0] if self.out_dim == 1 else y}


class ContrastiveHead(nn.Module):
    """Projects two towers' pooled features into one L2-normalised space, CLIP-style.

    ``logit_scale`` is the learnable log inverse temperature, initialised at
    log(1/init_temperature). With ``init_bias`` set, a learnable scalar ``logit_bias`` (SigLIP's
    b, initialised there) is returned too; the sigmoid loss needs it to offset the B² - B
    negative pairs against the B positives. Without it the parameter tree is CLIP's.

    ``only`` (a call argument) restricts the projection to some modalities, so
    ``MultimodalModel.embed`` can embed texts without images and the reverse.
    """

    embed_dim: int = 64
    modalities: tuple[str, str] = ("image", "text")
    init_temperature: float = 0.07
    init_bias: float | None = None
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(
        self,
        features: Mapping[str, Any],
        *,
        train: bool = False,
        only: Sequence[str] | None = None,
    ) -> dict[str, Array]:
        out = {}
        for m in self.modalities:
            if only is not None and m not in only:
                continue
            z = nn.Dense(self.embed_dim, use_bias=False, dtype=self.opts.dtype,
                         name=f"{m}_proj")(
                _input(features, m)
            ).astype(jnp.float32)
            out[f"{m}_embeds"] = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)
        out["logit_scale"] = self.param(
            "logit_scale", nn.initializers.constant(math.log(1 / self.init_temperature)), ()
        )
        if self.init_bias is not None:
            out["logit_bias"] = self.param(
                "logit_bias", nn.initializers.constant(self.init_bias), ()
            )
        return out


class SigLIPHead(ContrastiveHead):
    """Kind ``siglip``: a contrastive head with SigLIP's initialisation (Zhai et al. 2023).

    exp(logit_scale) starts at 10 (``init_temperature`` 0.1) and ``logit_bias`` at -10, so the
    initial logits of all pairs are ≈ -10 and the sigmoid loss starts near the log-odds of the
    rare positives instead of being swamped by the B² - B negatives.
    """

    init_temperature: float = 0.1
    init_bias: float | None = -10.0


class ITMHead(nn.Module):
    """Matched / not matched logits [3B, 2] from the fused pooled features of 3B pairs.

    ``contrastive`` names the contrastive (or siglip) head whose embeddings pick the hard
    negatives ("" = the model's only one); ``modalities`` = (a, b): a negative b for every a and
    a negative a for every b. Both options are read by the model when it builds the pairs.
    """

    contrastive: str = ""
    modalities: tuple[str, str] = ("image", "text")
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        x = _input(features, "pooled")
        logits = nn.Dense(2, dtype=self.opts.dtype, name="out")(x).astype(jnp.float32)
        return {"logits": logits}


class MLMHead(nn.Module):
    """BERT's prediction head, Dense + GELU + LayerNorm + Dense(vocab), on every text position.

    Features: ``tokens`` [B, L, D] (fused text positions, or the text tower's own tokens without
    fusion), ``targets`` (the uncorrupted ids) and ``weights`` (1 where a position was selected),
    which pass through to the loss. ``vocab_size`` 0 means "the text tower's vocabulary".
    """

    vocab_size: int = 0
    mask_prob: float = 0.15
    mask_token_id: int = 4
    special_ids: tuple[int, ...] = (0, 1, 2, 3)
    modality: str = "text"
    layer_norm_eps: float = 1e-12
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        if self.vocab_size <= 0:
            raise ValueError("mlm head: vocab_size is 0 and no text tower gives one")
        x = _input(features, "tokens")
        dtype = self.opts.dtype
        h = nn.Dense(x.shape[-1], dtype=dtype, name="transform")(x)
        h = nn.gelu(h, approximate=False)
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=dtype, name="norm")(h)
        logits = nn.Dense(self.vocab_size, dtype=dtype, name="out")(h)
        return {
            "logits": logits.astype(jnp.float32),
            "targets": _input(features, "targets"),
            "weights": _input(features, "weights"),
        }


class MIMHead(nn.Module):
    """MAE decoder: reconstructs every patch from the tokens of the visible ones.

    Features: ``tokens`` [B, c+K, D] from the ViT run on the kept patches (c = 1 with a class
    token), ``keep`` [B, K] and ``patches`` [B, N, p·p·3] (the pixels). Visible tokens are
    projected to ``decoder_width``, a learned mask token fills the N - K hidden positions, a
    learned position embedding is added and ``decoder_depth`` pre-LN blocks run over the full
    sequence. Outputs: ``predictions`` [B, N, p·p·3], ``targets`` (pixels, per-patch normalised
    when ``norm_pix``, as MAE does for sharper reconstructions) and ``mask`` (1 = hidden).
    """

    mask_ratio: float = 0.75
    decoder_width: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int | None = None
    norm_pix: bool = True
    modality: str = "image"
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        tokens = _input(features, "tokens")
        keep = _input(features, "keep")
        patches = jnp.asarray(_input(features, "patches"), jnp.float32)
        _, n, p = patches.shape
        k = keep.shape[1]
        c = tokens.shape[1] - k  # leading tokens that are not patches (a class token)
        w = self.decoder_width
        x = nn.Dense(w, dtype=self.opts.dtype, name="embed")(tokens)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (w,))
        x = jnp.concatenate([x[:, :c], scatter_tokens(x[:, c:], keep, n, mask_token)], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, c + n, w))
        x = x + pos.astype(x.dtype)
        x = layers.Encoder(
            depth=self.decoder_depth,
            num_heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim or 4 * w,
            opts=self.opts,
            name="decoder",
        )(x, train=train)
        predictions = nn.Dense(p, dtype=self.opts.dtype, name="pred")(x[:, c:]).astype(jnp.float32)
        targets = normalize_patches(patches) if self.norm_pix else patches
        hidden = 1.0 - jax.nn.one_hot(keep, n, dtype=jnp.float32).sum(axis=1)
        return {
            "predictions": predictions,
            "targets": jax.lax.stop_gradient(targets),
            "mask": hidden,
        }


class CaptionHead(nn.Module):
    """Causal text decoder with cross-attention to a tower's tokens; logits [B, S, vocab].

    Features: ``context`` [B, T, D] (the ``modality`` tower's tokens, projected to ``width``),
    ``context_mask`` ([B, T] or None) and ``ids`` [B, S], the decoder input. Self-attention is
    causal only: texts are right-padded, so padding never precedes a real token and cannot
    change its logits; this also makes teacher forcing and greedy decoding compute exactly the
    same function of the prefix. ``vocab_size`` 0 means "the text tower's vocabulary";
    ``max_len`` sizes the position embedding (decoder inputs are at most that long).
    ``context_positions`` adds a learned embedding per context position after the projection:
    a tower's own position embeddings may be tiny (ViT's start at std 0.02) and, when the tower
    is frozen (LiT), never grow, which leaves a decoder on a locked random ViT stem unable to tell
    which object comes first (docs/pretraining.md).
    """

    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    vocab_size: int = 0
    max_len: int = 32
    bos_id: int = 2
    eos_id: int = 3
    pad_id: int = 0
    modality: str = "image"
    layer_norm_eps: float = 1e-6
    opts: layers.Options = layers.Options()
    context_positions: bool = True

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        if self.vocab_size <= 0:
            raise ValueError("caption head: vocab_size is 0 and no text tower gives one")
        ids = _input(features, "ids")
        context = _input(features, "context")
        context_mask = features.get("context_mask")
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"caption decoder input of length {length} exceeds the head's "
                             f"max_len {self.max_len}")
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="token_embedding")(ids)
        pos = self.param("position_embedding", init, (self.max_len, self.width), jnp.float32)
        dtype = self.opts.dtype
        x = layers.add_positions(x, pos[:length], self.opts)
        x = nn.Dropout(self.opts.dropout)(x, deterministic=not train)
        ctx = nn.Dense(self.width, dtype=dtype, name="context_proj")(context)
        if self.context_positions:
            ctx_pos = self.param(
                "context_position_embedding", init, (context.shape[1], self.width), jnp.float32
            )
            ctx = ctx + ctx_pos[None].astype(dtype)
        x = layers.Encoder(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            pre_norm=True,
            final_norm=True,
            causal=True,
            cross_attention=True,
            layer_norm_eps=self.layer_norm_eps,
            opts=self.opts,
            name="decoder",
        )(x, None, ctx, context_mask, train=train)
        logits = nn.Dense(self.vocab_size, dtype=dtype, name="out")(x)
        return {"logits": logits.astype(jnp.float32)}


HEADS: Registry[nn.Module] = Registry("head", {
    "classification": ClassificationHead,
    "regression": RegressionHead,
    "contrastive": ContrastiveHead,
    "siglip": SigLIPHead,
    "itm": ITMHead,
    "mlm": MLMHead,
    "mim": MIMHead,
    "caption": CaptionHead,
})

# Kinds whose outputs are image/text embeddings (``MultimodalModel.embed``, ITM negatives).
CONTRASTIVE_KINDS = ("contrastive", "siglip")
# Kinds whose inputs ``objectives`` builds with extra tower / fusion passes.
OBJECTIVE_KINDS = ("itm", "mlm", "mim", "caption")
