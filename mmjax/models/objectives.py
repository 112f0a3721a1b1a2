"""Pretraining objectives' inputs: the random draws and the extra passes that build them.

The heads themselves (``itm``, ``mlm``, ``mim``, ``caption``) are plain "features in, outputs
out" modules in ``heads.py``. What they read is built here, with the model's own tower and fusion
modules, so every extra pass shares their parameters and gradients flow into them:

- ``mlm``: the corrupted text (BERT's 80/10/10) goes through its tower again, then through the
  fusion again with the other towers' unmasked tokens (cross-attention fusion with the text as
  query keeps one fused token per text position); without fusion the tower's tokens are used.
- ``mim``: the ViT runs again on a random subset of its patches (MAE).
- ``itm``: hard negatives are drawn from a contrastive head's (stop-gradient) similarities; the
  towers' tokens are gathered into B (a, negative b) and B (negative a, b) pairs and fused in one
  extra fusion call; the B positives reuse the forward's fused output (ALBEF).
- ``caption``: the decoder reads the forward's tokens of its tower (teacher forcing).

Negatives and masks are local: under pmap or gradient accumulation an objective sees its
device's (micro-)batch. Random draws are pure functions of a key (tested on their own); the
model hands them a key from the ``"masking"`` rng stream in training, a fixed one otherwise.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.models import heads as heads_lib
from mmjax.models.losses import MAX_LOGIT_SCALE

Array = jax.Array
Inputs = tuple[dict[str, Any], dict[str, Any]]  # (head features, extra outputs for the loss)


def salt(task: str) -> int:
    """A per-task integer folded into the objective's key, so tasks draw independently."""
    return zlib.crc32(task.encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# Random choices (pure functions of a key) and row selection.


def select_rows(x: Array, idx: Array) -> Array:
    """``x[idx]`` along axis 0 (x [B, ...], idx int [M]); numpy inputs become jax arrays."""
    return jnp.asarray(x)[idx]


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


# ---------------------------------------------------------------------------------------------
# Inputs of each objective head. ``model`` is the bound MultimodalModel; ``towers`` and ``fused``
# are the forward's encodings (empty / None when the forward skipped them), ``outputs`` the
# ordinary heads' outputs.


def itm_inputs(model: Any, task: str, *, towers: Mapping[str, Any], fused: Any,
               outputs: Mapping[str, Any], batch: Mapping[str, Any], train: bool) -> Inputs:
    if fused is None:
        raise ValueError(f"model.heads.{task}: kind 'itm' scores fused image-text pairs and "
                         "needs a fusion module; set model.fusion.kind (not 'none')")
    head = model.head(task)
    contrastive = head.contrastive
    kinds = heads_lib.CONTRASTIVE_KINDS
    if not contrastive:
        found = [t for t, c in model.heads.items() if c.get("kind") in kinds]
        if len(found) != 1:
            raise ValueError(f"model.heads.{task}.contrastive must name the contrastive head "
                             f"that picks hard negatives; contrastive heads: {found}")
        contrastive = found[0]
    if model.heads.get(contrastive, {}).get("kind") not in kinds:
        raise ValueError(f"model.heads.{task}.contrastive={contrastive!r} is not a head of "
                         f"kind {kinds}")
    a, b = head.modalities
    emb = outputs[contrastive]
    for m in (a, b):
        if f"{m}_embeds" not in emb or m not in towers:
            raise ValueError(f"model.heads.{task}.modalities: {m!r} is not both a tower and "
                             f"a modality of contrastive head {contrastive!r}")
    scale = jnp.minimum(jnp.exp(emb["logit_scale"].astype(jnp.float32)), MAX_LOGIT_SCALE)
    sim = jax.lax.stop_gradient(scale * (emb[f"{a}_embeds"] @ emb[f"{b}_embeds"].T))
    key = model.objective_key(task)
    # Examples whose texts are token-for-token equal are not negatives of each other (captions
    # repeat); they are drawn only when nothing else is left.
    duplicate = None
    for m in (a, b):
        if isinstance(batch.get(m), Mapping) and "ids" in batch[m]:
            ids = batch[m]["ids"]
            duplicate = (ids[:, None, :] == ids[None, :, :]).all(-1)
    valid = batch.get("valid")
    neg_b = sample_negatives(jax.random.fold_in(key, 0), sim, valid, duplicate)
    neg_a = sample_negatives(jax.random.fold_in(key, 1), sim.T, valid, duplicate)
    rows = jnp.arange(sim.shape[0])
    pairs = {}
    for m, f in towers.items():
        idx = jnp.concatenate([neg_b if m == b else rows, neg_a if m == a else rows])
        pairs[m] = {k: None if v is None else select_rows(v, idx) for k, v in f.items()}
    negatives = model.fuser(pairs, train=train)
    pooled = jnp.concatenate([fused["pooled"], negatives["pooled"]], axis=0)
    return {"pooled": pooled}, {f"negative_{b}": neg_b, f"negative_{a}": neg_a}


def mlm_inputs(model: Any, task: str, *, towers: Mapping[str, Any], fused: Any,
               outputs: Mapping[str, Any], batch: Mapping[str, Any], train: bool) -> Inputs:
    head = model.head(task)
    m = head.modality
    if model.encoders.get(m, {}).get("kind") != "text" or not isinstance(batch.get(m), Mapping):
        raise ValueError(f"model.heads.{task}.modality={m!r} is not a text tower")
    fuser = model.fuser
    if fuser is not None and fuser.reads().get("query") != m:
        raise ValueError(
            f"model.heads.{task}: mlm needs one fused token per text position, i.e. "
            f"model.fusion.kind='cross_attention' with query={m!r}, or no fusion; got "
            f"kind={model.fusion.get('kind')!r}, query={fuser.reads().get('query')!r}"
        )
    text = batch[m]
    ids = jnp.asarray(text["ids"], jnp.int32)
    mask = text.get("mask")
    mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
    masked_ids, selected = mlm_mask(
        model.objective_key(task), ids, mask, vocab_size=head.vocab_size,
        mask_prob=head.mask_prob, mask_token_id=head.mask_token_id, special_ids=head.special_ids,
    )
    corrupted = model.encode_one(m, {m: {**text, "ids": masked_ids, "mask": mask}}, train=train)
    if fuser is None:
        tokens = corrupted["tokens"]
    else:
        tokens = fuser({**towers, m: corrupted}, train=train)["tokens"]
    return {"tokens": tokens, "targets": ids, "weights": selected.astype(jnp.float32)}, {}


def mim_inputs(model: Any, task: str, *, towers: Mapping[str, Any], fused: Any,
               outputs: Mapping[str, Any], batch: Mapping[str, Any], train: bool) -> Inputs:
    head = model.head(task)
    m = head.modality
    if model.encoders.get(m, {}).get("kind") != "vit":
        raise ValueError(f"model.heads.{task}: mim masks ViT patches, but tower {m!r} is "
                         f"{model.encoders.get(m, {}).get('kind')!r}; use kind 'vit'")
    image = jnp.asarray(batch[m])
    p = model.towers[m].sizes()["patch_size"]
    n = (image.shape[1] // p) * (image.shape[2] // p)
    keep = random_keep(model.objective_key(task), image.shape[0], n, head.mask_ratio)
    encoded = model.encode_one(m, batch, train=train, keep=keep)
    patches = patchify(image.astype(jnp.float32), p)
    return {"tokens": encoded["tokens"], "keep": keep, "patches": patches}, {}


def caption_inputs(model: Any, task: str, *, towers: Mapping[str, Any], fused: Any,
                   outputs: Mapping[str, Any], batch: Mapping[str, Any], train: bool) -> Inputs:
    head = model.head(task)
    m = head.modality
    if m not in towers:
        raise ValueError(f"model.heads.{task}.modality={m!r} is not a tower")
    text = batch.get("text")
    if not isinstance(text, Mapping) or "ids" not in text:
        raise ValueError(f"model.heads.{task}: captioning trains on batch['text'] "
                         "({'ids', 'mask'}), which the batch does not have")
    ids = jnp.asarray(text["ids"], jnp.int32)
    mask = text.get("mask")
    mask = (ids != head.pad_id) if mask is None else jnp.asarray(mask)
    inputs = {"context": towers[m]["tokens"], "context_mask": towers[m]["mask"],
              "ids": ids[:, :-1]}
    return inputs, {"targets": ids[:, 1:], "weights": mask[:, 1:].astype(jnp.float32)}


INPUTS: dict[str, Callable[..., Inputs]] = {
    "itm": itm_inputs, "mlm": mlm_inputs, "mim": mim_inputs, "caption": caption_inputs,
}
