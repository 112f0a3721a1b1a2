"""Pretraining objectives: their heads and the random choices they make.

Four head kinds live here (SigLIP is a contrastive head with a bias, in ``heads.py``):

- ``itm``: image-text matching with hard negatives (ALBEF). A Dense(2) scores the fused pooled
  feature of the B positive pairs and of 2B negative pairs, one negative text per image and one
  negative image per text, each drawn with probability ∝ softmax of the (stop-gradient)
  contrastive similarities, the positive itself excluded.
- ``mlm``: masked language modelling (BERT's 80/10/10 corruption), conditioned on the image when
  the text goes through cross-attention fusion.
- ``mim``: masked image modelling, MAE-style: the ViT sees only a random subset of its patches,
  a small decoder reconstructs every patch's pixels, the loss counts the hidden ones.
- ``caption``: a causal text decoder cross-attending to an image tower's tokens (teacher forcing
  in training, greedy decoding in ``MultimodalModel.generate``).

The heads are plain "features in, outputs out" modules; building their inputs (masked tower
passes, negative pairs through the shared fusion) needs the model's own towers and fusion and is
done by ``MultimodalModel`` (see its docstring). The random draws are pure functions of a key
here, so they are tested on their own; the model gives them a key from the ``"masking"`` rng
stream in training and a fixed key in evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import layers

Array = jax.Array

# Head kinds whose inputs the model builds with extra tower / fusion passes.
OBJECTIVE_KINDS = ("itm", "mlm", "mim", "caption")


def _feature(features: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in features or features[key] is None:
        raise ValueError(f"{kind} head input {key!r} is not among its features {sorted(features)}")
    return features[key]


# ---------------------------------------------------------------------------------------------
# Row and token selection.


def select_rows(x: Array, idx: Array) -> Array:
    """``x[idx]`` along axis 0 (x [B, ...], idx int [M]); numpy inputs become jax arrays."""
    return jnp.asarray(x)[idx]


def scatter_tokens(x: Array, idx: Array, n: int, fill: Array) -> Array:
    """[B, n, D] holding ``x[b, k]`` at position ``idx[b, k]`` and ``fill`` [D] elsewhere.

    ``idx`` must not repeat within a row (a permutation's prefix, as ``random_keep`` gives).
    """
    full = jnp.broadcast_to(fill.astype(x.dtype), (x.shape[0], n, x.shape[-1]))
    return full.at[jnp.arange(x.shape[0])[:, None], idx].set(x)


# ---------------------------------------------------------------------------------------------
# Random choices (pure functions of a key).


def sample_negatives(
    key: Array, logits: Array, valid: Array | None = None, duplicate: Array | None = None
) -> Array:
    """For each row i, one column j ≠ i drawn with probability softmax(logits[i]) over j ≠ i.

    ``logits`` [B, B] are similarities (already scaled, treated as constants). Columns whose
    ``valid`` is 0 (padding in an eval batch), and pairs marked in ``duplicate`` [B, B] (e.g.
    another example with the very same caption, which would be a false negative), are only
    chosen when a row has no other candidate left; the diagonal (the positive) is never chosen.
    Returns int32 [B].
    """
    n = logits.shape[-1]
    if logits.shape != (n, n) or n < 2:
        raise ValueError(f"negative sampling needs square logits with B >= 2, got {logits.shape}")
    logits = jax.lax.stop_gradient(logits).astype(jnp.float32)
    if valid is not None:
        logits = jnp.where(jnp.asarray(valid).reshape(1, n) > 0, logits, -1e9)
    if duplicate is not None:
        logits = jnp.where(jnp.asarray(duplicate, bool), -2e9, logits)
    logits = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def mlm_mask(
    key: Array,
    ids: Array,
    mask: Array,
    *,
    vocab_size: int,
    mask_prob: float = 0.15,
    mask_token_id: int = 4,
    special_ids: Sequence[int] = (0, 1, 2, 3),
) -> tuple[Array, Array]:
    """BERT corruption: ``(masked_ids, selected)``, both [B, L].

    A position is maskable when ``mask`` is 1 and its id is neither a special id nor the mask
    token. Each maskable position is selected with probability ``mask_prob``; a row with a
    maskable token but no selection gets one chosen uniformly, so every such row contributes to
    the loss. Selected positions become the mask token (80%), a random non-special id (10%) or
    stay unchanged (10%); the others are never changed.
    """
    ids = jnp.asarray(ids).astype(jnp.int32)
    banned = sorted({int(s) for s in special_ids} | {int(mask_token_id)})
    if any(s >= vocab_size or s < 0 for s in banned) or len(banned) >= vocab_size:
        raise ValueError(f"special ids {banned} do not fit a vocabulary of {vocab_size}")
    maskable = (jnp.asarray(mask) > 0) & ~jnp.isin(ids, jnp.asarray(banned, jnp.int32))
    u = jax.random.uniform(key, (4, *ids.shape))  # one draw: select, fallback, kind, random id
    selected = maskable & (u[0] < mask_prob)
    fallback = jnp.argmax(jnp.where(maskable, u[1], -1.0), axis=-1)
    needs = maskable.any(axis=-1) & ~selected.any(axis=-1)
    selected = selected | (
        needs[:, None] & (jnp.arange(ids.shape[1])[None, :] == fallback[:, None]) & maskable
    )
    # A uniform id over the vocabulary minus the banned ids: draw from [0, V - k) and step over
    # each banned id in increasing order (a monotone bijection onto the allowed ids).
    random_ids = jnp.minimum(
        (u[3] * (vocab_size - len(banned))).astype(jnp.int32), vocab_size - len(banned) - 1
    )
    for s in banned:
        random_ids = random_ids + (random_ids >= s)
    replacement = jnp.where(u[2] < 0.8, mask_token_id, jnp.where(u[2] < 0.9, random_ids, ids))
    return jnp.where(selected, replacement, ids).astype(jnp.int32), selected


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = round(N·(1 - mask_ratio)), at least 1 and at most N."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, min(num_patches, round(num_patches * (1.0 - mask_ratio))))


def random_keep(key: Array, batch: int, num_patches: int, mask_ratio: float) -> Array:
    """int32 [B, K]: the first K of an independent random permutation of the N patches per row."""
    k = num_kept(num_patches, mask_ratio)
    perm = jnp.argsort(jax.random.uniform(key, (batch, num_patches)), axis=-1)
    return perm[:, :k].astype(jnp.int32)


def patchify(images: Array, patch: int) -> Array:
    """[B, H, W, C] → [B, N, p·p·C] in the ViT's token order (row-major over the patch grid)."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {(h, w)} is not a multiple of patch {patch}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalize_patches(patches: Array, eps: float = 1e-6) -> Array:
    """MAE's ``norm_pix_loss`` targets: each patch minus its mean, over sqrt(its variance + eps)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True)
    return (patches - mean) / jnp.sqrt(var + eps)


# ---------------------------------------------------------------------------------------------
# Heads.


class ITMHead(nn.Module):
    """Matched / not matched logits [3B, 2] from the fused pooled features of 3B pairs.

    ``contrastive`` names the contrastive (or siglip) head whose embeddings pick the hard
    negatives ("" = the model's only one); ``modalities`` = (a, b): a negative b for every a and
    a negative a for every b. Both options are read by the model when it builds the pairs.
    """

    contrastive: str = ""
    modalities: tuple[str, str] = ("image", "text")
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        x = _feature(features, "pooled", "itm")
        logits = nn.Dense(2, dtype=self.dtype, name="out")(x).astype(jnp.float32)
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
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        if self.vocab_size <= 0:
            raise ValueError("mlm head: vocab_size is 0 and no text tower gives one")
        x = _feature(features, "tokens", "mlm")
        h = nn.Dense(x.shape[-1], dtype=self.dtype, name="transform")(x)
        h = nn.gelu(h, approximate=False)
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm")(h)
        logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="out")(h)
        return {
            "logits": logits.astype(jnp.float32),
            "targets": _feature(features, "targets", "mlm"),
            "weights": _feature(features, "weights", "mlm"),
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
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_implementation: str | None = None

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        tokens = _feature(features, "tokens", "mim")
        keep = _feature(features, "keep", "mim")
        patches = jnp.asarray(_feature(features, "patches", "mim"), jnp.float32)
        _, n, p = patches.shape
        k = keep.shape[1]
        c = tokens.shape[1] - k  # leading tokens that are not patches (a class token)
        w = self.decoder_width
        x = nn.Dense(w, dtype=self.dtype, name="embed")(tokens)
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (w,))
        x = jnp.concatenate([x[:, :c], scatter_tokens(x[:, c:], keep, n, mask_token)], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, c + n, w))
        x = x + pos.astype(x.dtype)
        x = layers.Encoder(
            depth=self.decoder_depth,
            num_heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim or 4 * w,
            pre_norm=True,
            final_norm=True,
            dropout=self.dropout,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            name="decoder",
        )(x, train=train)
        predictions = nn.Dense(p, dtype=self.dtype, name="pred")(x[:, c:]).astype(jnp.float32)
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
    is frozen (LiT), never grow, which left a decoder on a locked random ViT stem unable to tell
    which object comes first (exact match plateaued near 0.5 on the shapes captions; with it
    the same run learns the order).
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
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_implementation: str | None = None
    context_positions: bool = True

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        if self.vocab_size <= 0:
            raise ValueError("caption head: vocab_size is 0 and no text tower gives one")
        ids = _feature(features, "ids", "caption")
        context = _feature(features, "context", "caption")
        context_mask = features.get("context_mask")
        length = ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"caption decoder input of length {length} exceeds the head's "
                             f"max_len {self.max_len}")
        init = nn.initializers.normal(0.02)
        x = nn.Embed(self.vocab_size, self.width, embedding_init=init, name="token_embedding")(ids)
        pos = self.param("position_embedding", init, (self.max_len, self.width), jnp.float32)
        x = layers.add_positions(x, pos[:length], self.dtype)  # row-major on GPUs
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        ctx = nn.Dense(self.width, dtype=self.dtype, name="context_proj")(context)
        if self.context_positions:
            ctx_pos = self.param(
                "context_position_embedding", init, (context.shape[1], self.width), jnp.float32
            )
            ctx = ctx + ctx_pos[None].astype(self.dtype)
        x = layers.Encoder(
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            pre_norm=True,
            final_norm=True,
            causal=True,
            cross_attention=True,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            name="decoder",
        )(x, None, ctx, context_mask, train=train)
        logits = nn.Dense(self.vocab_size, dtype=self.dtype, name="out")(x)
        return {"logits": logits.astype(jnp.float32)}


OBJECTIVE_HEADS: dict[str, type[nn.Module]] = {
    "itm": ITMHead,
    "mlm": MLMHead,
    "mim": MIMHead,
    "caption": CaptionHead,
}
