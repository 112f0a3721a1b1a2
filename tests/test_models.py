"""Model tests on CPU: variant decoding, tower shapes and param trees, attention against a float64
numpy reference, padding/causal invariances, every fusion kind and head kind through
``build_model``, cross-device BatchNorm, compute dtype, dropout and remat. The opt-in GPU rewrites
(``model.gpu_rewrites``) are compared with the plain path in tests/test_gpu_rewrites.py."""

import copy
import functools
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from flax.errors import InvalidRngError

from mmjax.models import fusion as fusion_lib
from mmjax.models import layers
from mmjax.models.multimodal import build_model, make_head
from mmjax.models.resnet import ResNet
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

RTOL, ATOL = 1e-5, 1e-5
VOCAB = 50
B, L, IMG = 3, 8, 16
LENGTHS = np.array([8, 5, 2])  # valid tokens per text row (right padding)
FUSION_KINDS = ("concat", "cross_attention", "co_attention", "late")


# ----------------------------------------------------------------------------------- helpers
#
# XLA:CPU compiles every new random-op shape separately (about a second each for threefry), so
# the tests take parameter *shapes* from ``jax.eval_shape(model.init)`` and fill them with numpy
# random values; the few checks of initial values (zero classifier, logit_scale) init the heads
# alone. Random (non-zero) biases and LayerNorm scales also make the numerical checks stricter.


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="unsafe_rbg")  # cheap to compile on CPU


def _jitted(model: nn.Module):
    """``model.apply`` jitted (``train``/``mutable`` static): one fast compile per input shape
    instead of eager mode's compile of every primitive. Equal (hashable)
    modules share one jitted function, so parametrised tests compile once."""
    try:
        return _jitted_cached(model)
    except TypeError:  # a module with dict fields (MultimodalModel) is not hashable
        return _jit_apply(model)


@functools.cache
def _jitted_cached(model: nn.Module):
    return _jit_apply(model)


def _jit_apply(model: nn.Module):
    return jax.jit(model.apply, static_argnames=("train", "mutable"))


def _flat(tree) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _fill(model: nn.Module, *args, seed: int = 0, **kwargs) -> dict:
    """Variables shaped like ``model.init(...)``, filled with fan-in-scaled random values."""
    shapes = jax.eval_shape(lambda: model.init(_key(0), *args, **kwargs))
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        name, shape = path[-1], s.shape
        if name == "scale":
            v = 1 + 0.1 * rng.normal(size=shape)
        elif name == "var":
            v = rng.uniform(0.5, 1.5, size=shape)
        elif name == "logit_scale":
            v = np.full(shape, np.log(1 / 0.07))
        elif len(shape) >= 2:
            fan_in = shape[0] if path[-2] in ("query", "key", "value") else math.prod(shape[:-1])
            v = rng.normal(size=shape) / np.sqrt(fan_in)
        else:
            v = 0.1 * rng.normal(size=shape)
        out[path] = jnp.asarray(v, s.dtype)
    return traverse_util.unflatten_dict(out)


def _images(seed: int, b: int = B, size: int = IMG) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, size, size, 3)).astype(np.float32)


def _mask(lengths=LENGTHS, length: int = L) -> np.ndarray:
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def _ids(seed: int, b: int = B, length: int = L) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, size=(b, length)).astype(np.int32)


def _batch(seed: int) -> dict:
    return {"image": _images(seed), "text": {"ids": _ids(seed + 1), "mask": _mask()}}


HEADS = {
    "cls": {"kind": "classification", "num_classes": 5},
    "reg": {"kind": "regression"},
    "clip": {"kind": "contrastive", "embed_dim": 16},
}


def _model_cfg(fusion_kind: str = "cross_attention", heads: dict | None = None, **extra) -> dict:
    cfg = {
        "encoders": {
            "image": {"kind": "vit", "variant": "mu/8"},
            "text": {"kind": "text", "variant": "mu", "vocab_size": VOCAB, "max_len": 16},
        },
        "fusion": {"kind": fusion_kind, "width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64},
        "heads": copy.deepcopy(heads or HEADS),
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module", params=FUSION_KINDS)
def fused(request):
    """(kind, jitted apply, random params; the classifier kernel is non-zero) per fusion kind."""
    model = build_model(_model_cfg(request.param))
    return request.param, _jitted(model), _fill(model, _batch(0))["params"]


def _shapes(model: nn.Module, *args, **kwargs) -> dict:
    """``model.init``'s variable shapes, traced but never compiled (errors surface here too)."""
    return jax.eval_shape(lambda: model.init(_key(0), *args, **kwargs))


# ------------------------------------------------------------------------ decode_variant (1)


def test_decode_variant_vit():
    # ViT-B/16 and ViT-L/14 as published (Dosovitskiy et al. 2021, Table 1)
    assert layers.decode_variant("B/16") == {
        "width": 768, "depth": 12, "mlp_dim": 3072, "num_heads": 12, "patch_size": 16}
    assert layers.decode_variant("L/14") == {
        "width": 1024, "depth": 24, "mlp_dim": 4096, "num_heads": 16, "patch_size": 14}


def test_decode_variant_text_has_no_patch():
    """One size table serves both towers: a text variant is the image variant's sizes without
    a patch size (BERT-base is ViT-B's width, depth, MLP and heads)."""
    for size in ("mu", "S", "B"):
        text = layers.decode_variant(size)
        assert "patch_size" not in text
        assert layers.decode_variant(f"{size}/8") == {**text, "patch_size": 8}
    assert layers.decode_variant("B") == {"width": 768, "depth": 12, "mlp_dim": 3072,
                                          "num_heads": 12}
    assert layers.tower_sizes("B", width=64, depth=None) == {**layers.decode_variant("B"),
                                                              "width": 64}


@pytest.mark.parametrize("bad", ["X/16", "B16", "B/", "B/16/2", "", "b/16", "B/x", " B/16"])
def test_decode_variant_rejects(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        layers.decode_variant(bad)


# ---------------------------------------------------------------------------------- ViT (2)


@pytest.mark.parametrize(
    ("class_token", "pool"), [(False, "gap"), (True, "gap"), (True, "cls"), (False, "none")]
)
def test_vit_shapes_and_pooling(class_token, pool):
    x = _images(2)
    model = ViT("mu/8", class_token=class_token, pool=pool)
    out = _jitted(model)(_fill(model, x), x)
    n = (IMG // 8) ** 2 + int(class_token)
    assert out["tokens"].shape == (B, n, 32)
    assert out["pooled"].shape == (B, 32)
    assert out["mask"] is None
    tok = np.asarray(out["tokens"])
    assert np.isfinite(tok).all()
    expected = {
        "cls": tok[:, 0],
        "none": tok[:, 0],
        "gap": tok[:, int(class_token) :].mean(axis=1),  # patch tokens only
    }[pool]
    np.testing.assert_allclose(np.asarray(out["pooled"]), expected, rtol=RTOL, atol=ATOL)


def test_vit_overrides_and_param_tree():
    x = _images(3)
    model = ViT(
        "mu/8",
        width=24,
        depth=2,
        num_heads=3,
        mlp_dim=40,
        patch_size=4,
        class_token=True,
        pool="cls",
    )
    n = (IMG // 4) ** 2 + 1
    flat = {k: v.shape for k, v in _flat(_shapes(model, x)["params"]).items()}
    assert flat["embedding/kernel"] == (4, 4, 3, 24)
    assert flat["pos_embedding"] == (1, n, 24)
    assert flat["cls"] == (1, 1, 24)
    assert flat["encoder/final_norm/scale"] == (24,)
    assert flat["encoder/layer_1/mlp/fc1/kernel"] == (24, 40)
    assert flat["encoder/layer_0/attn/query/kernel"] == (24, 3, 8)
    assert flat["encoder/layer_0/attn/out/kernel"] == (3, 8, 24)
    assert {k.split("/")[0] for k in flat} == {"embedding", "pos_embedding", "cls", "encoder"}
    assert {k.split("/")[1] for k in flat if k.startswith("encoder/")} == {
        "layer_0",
        "layer_1",
        "final_norm",
    }
    assert {k.split("/")[2] for k in flat if k.startswith("encoder/layer_0/")} == {
        "attn_norm",
        "attn",
        "mlp_norm",
        "mlp",
    }
    out = jax.eval_shape(lambda: model.apply(_fill(model, x), x))
    assert out["tokens"].shape == (B, n, 24) and out["pooled"].shape == (B, 24)
    # The default layout has no class token and so no "cls" parameter.
    no_cls = _flat(_shapes(ViT("mu/8"), x)["params"])
    assert "cls" not in no_cls and no_cls["pos_embedding"].shape == (1, (IMG // 8) ** 2, 32)


def test_vit_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\(20, 16\) is not a multiple of patch 8"):
        _shapes(ViT("mu/8"), np.ones((1, 20, 16, 3), np.float32))
    with pytest.raises(ValueError, match="not a multiple of patch 8"):
        _shapes(ViT("mu/8"), np.ones((1, 16, 12, 3), np.float32))
    with pytest.raises(ValueError, match="class_token"):
        _shapes(ViT("mu/8", pool="cls"), _images(0, b=1))
    with pytest.raises(ValueError, match="names no patch size"):
        _shapes(ViT("mu"), _images(0, b=1))
    with pytest.raises(ValueError, match="'bogus'"):
        _shapes(ViT("mu/8", pool="bogus"), _images(0, b=1))


# ---------------------------------------------------------------------------- TextEncoder (3)


def _text(pool="cls", causal=False, pre_norm=False, **kw) -> TextEncoder:
    """BERT layout (post-norm) by default; pre_norm=True is the CLIP layout with a final LN."""
    return TextEncoder(
        VOCAB,
        "mu",
        max_len=16,
        pool=pool,
        causal=causal,
        pre_norm=pre_norm,
        final_norm=pre_norm,
        **kw,
    )


@pytest.mark.parametrize("pool", ["cls", "mean", "last", "argmax"])
def test_text_pooling(pool):
    ids, mask = _ids(4), _mask()
    model = _text(pool)
    out = _jitted(model)(_fill(model, ids, mask), ids, mask)
    assert out["tokens"].shape == (B, L, 32)
    assert out["pooled"].shape == (B, 32)
    np.testing.assert_array_equal(np.asarray(out["mask"]), mask)
    tok = np.asarray(out["tokens"], np.float64)
    rows = np.arange(B)
    expected = {
        "cls": tok[:, 0],
        "mean": (tok * mask[..., None]).sum(1) / mask.sum(1, keepdims=True),
        "last": tok[rows, LENGTHS - 1],
        "argmax": tok[rows, ids.argmax(axis=1)],
    }[pool]
    np.testing.assert_allclose(np.asarray(out["pooled"]), expected, rtol=RTOL, atol=ATOL)


def test_text_param_tree_and_errors():
    ids = _ids(5)
    params = _shapes(_text(pooler=True), ids)["params"]
    assert set(params) == {
        "token_embedding",
        "position_embedding",
        "segment_embedding",
        "embed_norm",
        "encoder",
        "pooler",
    }
    assert params["position_embedding"].shape == (16, 32)
    assert set(params["encoder"]) == {"layer_0"}  # BERT layout: no final LayerNorm
    assert "final_norm" in _shapes(_text(pre_norm=True), ids)["params"]["encoder"]
    assert "segment_embedding" not in _shapes(_text(type_vocab_size=0), ids)["params"]
    with pytest.raises(ValueError, match="max_len 16"):
        _shapes(_text(), _ids(0, length=17))
    with pytest.raises(ValueError, match="'bogus'"):
        _shapes(_text("bogus"), ids)


@pytest.mark.parametrize(
    ("causal", "pre_norm", "side"),
    [(False, False, "right"), (True, True, "right"), (True, False, "right"), (True, True, "left")],
)
def test_text_padding_invariance(causal, pre_norm, side):
    """Content at padded positions never reaches valid ones. With left padding a causal row does
    see earlier padded positions, so only the padding mask keeps them out."""
    ids, mask = _ids(6), _mask()
    if side == "left":
        mask = mask[:, ::-1].copy()
    other = np.where(mask == 0, _ids(7), ids)  # new content at padded positions only
    assert (other != ids).any()
    model = _text("mean", causal=causal, pre_norm=pre_norm)
    variables = _fill(model, ids, mask, seed=1)
    apply = _jitted(model)
    a = apply(variables, ids, mask)
    b = apply(variables, other, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(a["tokens"])[valid], np.asarray(b["tokens"])[valid], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        np.asarray(a["pooled"]), np.asarray(b["pooled"]), rtol=RTOL, atol=ATOL
    )
    if not causal or side == "left":  # (a causal row never sees *later* padding anyway)
        # Without the mask the padded content is attended to: the check above has teeth.
        a_nomask = np.asarray(apply(variables, ids)["tokens"])
        b_nomask = np.asarray(apply(variables, other)["tokens"])
        assert not np.allclose(a_nomask[1][valid[1]], b_nomask[1][valid[1]], atol=1e-4)


@pytest.mark.parametrize("t", [0, 3, 6])
def test_text_causal_mask(t):
    ids = _ids(8)
    later = ids.copy()
    later[:, t + 1 :] = _ids(9)[:, t + 1 :]
    assert (later != ids).any()
    causal = _text("last", causal=True, pre_norm=True)
    variables = _fill(causal, ids, seed=2)
    apply = _jitted(causal)
    a = np.asarray(apply(variables, ids)["tokens"])
    b = np.asarray(apply(variables, later)["tokens"])
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], rtol=RTOL, atol=ATOL)
    assert not np.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-4)
    # The same weights without the causal mask do see the future: the test is sensitive.
    full = _text("last", causal=False, pre_norm=True)
    apply = _jitted(full)
    fa = np.asarray(apply(variables, ids)["tokens"])
    fb = np.asarray(apply(variables, later)["tokens"])
    assert not np.allclose(fa[:, : t + 1], fb[:, : t + 1], atol=1e-4)


# ------------------------------------------------------------------- Attention and Block (4)


def _ref_attention(p, x, ctx, mask, causal=False) -> np.ndarray:
    """Float64 numpy multi-head attention with the module's own parameters."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x, ctx = np.asarray(x, np.float64), np.asarray(ctx, np.float64)
    proj = lambda name, t: np.einsum("btd,dnh->btnh", t, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = proj("query", x), proj("key", ctx), proj("value", ctx)
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    allowed = np.ones(logits.shape, bool)
    if mask is not None:
        allowed &= np.asarray(mask, bool)
    if causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(allowed, logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    y = np.einsum("bnts,bsnh->btnh", w, v)
    return np.einsum("btnh,nhd->btd", y, p["out"]["kernel"]) + p["out"]["bias"]


def test_padding_mask_masks_keys_only():
    kv = _mask()
    m = np.asarray(layers.padding_mask(jnp.asarray(kv)))
    assert m.shape == (B, 1, 1, L) and m.dtype == bool
    np.testing.assert_array_equal(m[:, 0, 0], kv.astype(bool))
    assert layers.padding_mask(None) is None


def _random_mask(seed: int, tq: int, tk: int) -> np.ndarray:
    """A full [B, 1, Tq, Tk] boolean mask in which every query row keeps at least one key."""
    m = np.random.default_rng(seed).random((B, 1, tq, tk)) < 0.5
    m[..., 0] = True
    return m


@pytest.mark.parametrize(("causal", "full_mask"), [(False, False), (True, False), (False, True)])
def test_attention_matches_numpy(causal, full_mask):
    x = np.random.default_rng(10).normal(size=(B, L, 32)).astype(np.float32)
    mask = _random_mask(17, L, L) if full_mask else _mask().astype(bool)[:, None, None, :]
    attn = layers.Attention(num_heads=4, causal=causal)
    params = _fill(attn, x, mask=mask, seed=3)["params"]
    assert np.abs(np.asarray(params["out"]["bias"])).min() > 0  # biases are checked too
    y = np.asarray(_jitted(attn)({"params": params}, x, mask=mask))
    assert np.isfinite(y).all()
    ref = _ref_attention(params, x, x, mask, causal)
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


def test_cross_attention_matches_numpy():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(B, 5, 32)).astype(np.float32)
    ctx = rng.normal(size=(B, L, 32)).astype(np.float32)
    mask = layers.padding_mask(jnp.asarray(_mask()))
    attn = layers.Attention(num_heads=2)
    params = _fill(attn, x, ctx, mask=mask, seed=4)["params"]
    y = np.asarray(_jitted(attn)({"params": params}, x, ctx, mask=mask))
    np.testing.assert_allclose(y, _ref_attention(params, x, ctx, mask), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_padded_rows_are_finite(pre_norm):
    """Padded query positions, and even a row with no valid token at all, stay finite (no NaN
    leaking into the valid rows), in the outputs and in the gradients."""
    x = np.random.default_rng(12).normal(size=(2, L, 32)).astype(np.float32)
    mask = np.stack([_mask([4], L)[0], np.zeros(L, np.int32)])  # second row: nothing valid
    blk = layers.Block(num_heads=2, mlp_dim=64, pre_norm=pre_norm)
    variables = _fill(blk, x, mask, seed=6)
    apply = _jitted(blk)
    y = np.asarray(apply(variables, x, mask))
    assert np.isfinite(y).all()
    grads = jax.jit(jax.grad(lambda v: blk.apply(v, x, mask)[0, :4].sum()))(variables)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # Valid rows do not see the padded positions' content.
    other = x.copy()
    other[0, 4:] = np.random.default_rng(13).normal(size=(L - 4, 32))
    np.testing.assert_allclose(
        np.asarray(apply(variables, other, mask))[0, :4], y[0, :4], rtol=RTOL, atol=ATOL
    )


def test_block_pre_norm_vs_post_norm():
    x = np.random.default_rng(13).normal(size=(B, L, 32)).astype(np.float32)
    mask = _mask()
    pre = layers.Block(num_heads=2, mlp_dim=64, pre_norm=True)
    post = layers.Block(num_heads=2, mlp_dim=64, pre_norm=False)
    # Same parameter names, so one set of weights runs in both layouts.
    assert jax.tree.structure(_shapes(pre, x, mask)) == jax.tree.structure(_shapes(post, x, mask))
    variables = _fill(pre, x, mask, seed=7)
    a = np.asarray(_jitted(pre)(variables, x, mask))
    b = np.asarray(_jitted(post)(variables, x, mask))
    assert np.isfinite(a).all() and np.isfinite(b).all()
    assert not np.allclose(a, b, atol=1e-3)
    # Post-norm ends in the MLP's LayerNorm: undoing its affine leaves standardised tokens.
    ln = variables["params"]["mlp_norm"]
    z = (b - np.asarray(ln["bias"])) / np.asarray(ln["scale"])
    np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(-1), 1.0, rtol=1e-4)
    # Pre-norm keeps the residual stream un-normalised.
    assert np.abs(a.mean(-1)).max() > 1e-2


def test_cross_attention_block_needs_context():
    x = np.random.default_rng(14).normal(size=(1, 4, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="context"):
        _shapes(layers.Block(num_heads=2, mlp_dim=64, cross_attention=True), x)
    with pytest.raises(ValueError, match="not divisible by num_heads 3"):
        _shapes(layers.Attention(num_heads=3), x)


# ------------------------------------------------------------------- fusion and heads (5, 6)


@pytest.mark.parametrize("kind", FUSION_KINDS)
def test_fusion_module_shapes(kind):
    rng = np.random.default_rng(15)
    feats = {
        "image": {
            "tokens": rng.normal(size=(B, 4, 24)).astype(np.float32),
            "pooled": rng.normal(size=(B, 24)).astype(np.float32),
            "mask": None,
        },
        "text": {
            "tokens": rng.normal(size=(B, L, 32)).astype(np.float32),
            "pooled": rng.normal(size=(B, 32)).astype(np.float32),
            "mask": _mask(),
        },
    }
    mod = fusion_lib.build({"kind": kind, "width": 16, "num_heads": 2, "mlp_dim": 32})
    # Shapes only (traced, not compiled): the fused-model tests below run every kind for real.
    out = jax.eval_shape(lambda: mod.apply(_fill(mod, feats), feats))
    tokens, pooled = {
        "concat": ((B, 1 + 4 + L, 16), (B, 16)),
        "cross_attention": ((B, L, 16), (B, 16)),
        "co_attention": ((B, 4 + L, 16), (B, 32)),
        "late": ((B, 4 + L, 16), (B, 16)),
    }[kind]
    assert out["tokens"].shape == tokens
    assert out["pooled"].shape == pooled
    assert out["mask"].shape == tokens[:2]
    with pytest.raises(ValueError, match="two or more modalities"):
        _shapes(mod, {"text": feats["text"]})


@pytest.mark.parametrize("pool", ["first", "mean"])
def test_fusion_pool(pool):
    rng = np.random.default_rng(18)
    feats = {
        "image": {"tokens": rng.normal(size=(B, 4, 24)).astype(np.float32), "mask": None},
        "text": {"tokens": rng.normal(size=(B, L, 32)).astype(np.float32), "mask": _mask()},
    }
    feats["image"]["pooled"] = feats["image"]["tokens"].mean(1)
    feats["text"]["pooled"] = feats["text"]["tokens"][:, 0]
    mod = fusion_lib.build({"kind": "cross_attention", "width": 16, "num_heads": 2, "mlp_dim": 32,
                            "pool": pool})
    out = _jitted(mod)(_fill(mod, feats), feats)
    tok = np.asarray(out["tokens"], np.float64)
    mask = _mask()[..., None]
    expected = tok[:, 0] if pool == "first" else (tok * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(np.asarray(out["pooled"]), expected, rtol=RTOL, atol=ATOL)


def _fusion_feats(seed: int, text_mask: np.ndarray | None) -> dict:
    rng = np.random.default_rng(seed)
    feats = {
        "image": {"tokens": rng.normal(size=(B, 4, 24)).astype(np.float32), "mask": None},
        "text": {"tokens": rng.normal(size=(B, L, 32)).astype(np.float32), "mask": text_mask},
    }
    for f in feats.values():
        f["pooled"] = f["tokens"][:, 0]
    return feats


def _assert_same_fusion(a: dict, b: dict) -> None:
    for key in ("tokens", "pooled"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["concat", "cross_attention", "co_attention"])
def test_fusion_unmasked_modality_same_as_all_ones_mask(kind):
    """A modality without a mask (image tokens) is attended to without one (cuDNN's plain
    kernel); the result is that of an all-ones mask, with the text masked or not, and (for
    cross_attention) with the unmasked stream as the queries or as the context."""
    feats = _fusion_feats(33, _mask())
    ones = {**feats, "image": {**feats["image"], "mask": np.ones((B, 4), np.int32)}}
    nomask = {**feats, "text": {**feats["text"], "mask": None}}
    allones = {**ones, "text": {**feats["text"], "mask": np.ones((B, L), np.int32)}}
    # Only cross-attention reads ``query``; the other kinds would recompile the same function.
    for query in ("image", "text") if kind == "cross_attention" else ("text",):
        cfg = {"kind": kind, "width": 16, "num_heads": 2, "mlp_dim": 32}
        mod = fusion_lib.build({**cfg, "query": query} if kind == "cross_attention" else cfg)
        variables = _fill(mod, feats, seed=3)
        for without, with_ones in ((feats, ones), (nomask, allones)):
            _assert_same_fusion(_jitted(mod)(variables, without),
                                _jitted(mod)(variables, with_ones))


def test_heads_initial_values_and_outputs_against_numpy():
    """The classifier starts at exactly zero logits (big_vision's zero-initialised output); the
    contrastive head starts at log(1 / init_temperature) and returns the L2-normalised
    projections; the regression head is one affine map, squeezed to [B]. References are float64
    numpy with the heads' own initial parameters."""
    rng = np.random.default_rng(16)
    feats = {
        k: rng.normal(size=(B, d)).astype(np.float32)
        for k, d in (("pooled", 32), ("image", 24), ("text", 32))
    }
    specs = {
        "cls": {"kind": "classification", "num_classes": 5},
        "reg": {"kind": "regression"},
        "clip": {"kind": "contrastive", "embed_dim": 16, "init_temperature": 0.25},
    }
    heads = {t: make_head(t, c, layers.Options(), parent=None) for t, c in specs.items()}
    both = jax.jit(lambda k: {t: h.init_with_output(k, feats) for t, h in heads.items()})(
        _key(1))
    out = {t: o for t, (o, _) in both.items()}
    variables = {t: v["params"] for t, (_, v) in both.items()}
    np.testing.assert_array_equal(np.asarray(out["cls"]["logits"]), np.zeros((B, 5)))
    reg = variables["reg"]["out"]
    want = feats["pooled"].astype(np.float64) @ np.asarray(reg["kernel"], np.float64)
    want = want[:, 0] + float(reg["bias"][0])
    assert out["reg"]["predictions"].shape == (B,)
    np.testing.assert_allclose(np.asarray(out["reg"]["predictions"]), want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(out["clip"]["logit_scale"]), np.log(4.0), rtol=1e-6)
    assert out["clip"]["logit_scale"].shape == ()
    for m in ("image", "text"):
        z = feats[m].astype(np.float64) @ np.asarray(variables["clip"][f"{m}_proj"]["kernel"])
        want = z / np.linalg.norm(z, axis=-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(out["clip"][f"{m}_embeds"]), want,
                                   rtol=RTOL, atol=ATOL)


def test_build_model_outputs_and_param_tree(fused):
    kind, apply, params = fused
    out = apply({"params": params}, _batch(20))
    assert set(out) == {"cls", "reg", "clip"}
    assert out["cls"]["logits"].shape == (B, 5)
    assert out["reg"]["predictions"].shape == (B,)
    assert out["clip"]["image_embeds"].shape == (B, 16)
    assert out["clip"]["text_embeds"].shape == (B, 16)
    for m in ("image", "text"):
        norms = np.linalg.norm(np.asarray(out["clip"][f"{m}_embeds"], np.float64), axis=-1)
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert out["clip"]["logit_scale"].shape == ()
    for leaf in jax.tree.leaves(out):
        assert np.isfinite(np.asarray(leaf)).all(), kind
    assert set(params) == {"image", "text", "fusion", "heads"}
    assert set(params["heads"]) == {"cls", "reg", "clip"}
    assert set(params["heads"]["clip"]) == {"image_proj", "text_proj", "logit_scale"}
    assert "embedding" in params["image"] and "token_embedding" in params["text"]
    assert {"image_proj", "text_proj"} <= set(params["fusion"])


def test_fusion_depends_on_both_modalities(fused):
    """The heads read the fused features: changing either input moves the logits."""
    kind, apply, params = fused
    batch = _batch(21)
    logits = lambda b: np.asarray(apply({"params": params}, b)["cls"]["logits"])
    base = logits(batch)
    assert np.abs(base).max() > 1e-3  # classifier kernel is random here, not zero
    moved = logits({**batch, "image": _images(22)})
    assert np.abs(moved - base).max() > 1e-3, f"{kind}: logits ignore the image"
    moved = logits({**batch, "text": {"ids": _ids(23), "mask": batch["text"]["mask"]}})
    assert np.abs(moved - base).max() > 1e-3, f"{kind}: logits ignore the text"


def test_fused_outputs_ignore_padded_text(fused):
    kind, apply, params = fused
    batch = _batch(24)
    mask = batch["text"]["mask"]
    ids = np.where(mask == 0, _ids(99), batch["text"]["ids"])
    assert (ids != batch["text"]["ids"]).any()
    a = apply({"params": params}, batch)
    b = apply({"params": params}, {**batch, "text": {"ids": ids, "mask": mask}})
    for task, key in (("cls", "logits"), ("reg", "predictions"), ("clip", "text_embeds")):
        np.testing.assert_allclose(
            np.asarray(a[task][key]),
            np.asarray(b[task][key]),
            rtol=RTOL,
            atol=ATOL,
            err_msg=f"{kind} {task}",
        )


def test_two_tower_model_has_no_fusion():
    cfg = _model_cfg(heads={"clip": {"kind": "contrastive", "embed_dim": 8}})
    cfg["fusion"] = {"kind": "none"}
    model = build_model(cfg)
    batch = _batch(28)
    variables = _fill(model, batch)
    assert set(variables["params"]) == {"image", "text", "heads"}
    out = _jitted(model)(variables, batch)["clip"]
    assert out["image_embeds"].shape == out["text_embeds"].shape == (B, 8)
    cfg.pop("fusion")  # an absent fusion is "none" too
    assert set(_shapes(build_model(cfg), batch)["params"]) == {"image", "text", "heads"}
    # A classification head reads the fused "pooled", which a two-tower model does not have.
    cfg["heads"] = {"cls": {"kind": "classification", "num_classes": 2}}
    with pytest.raises(ValueError, match="'pooled'"):
        _shapes(build_model(cfg), batch)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda c: c["fusion"].update(kind="bogus"), r"model\.fusion\.kind"),
        (lambda c: c["fusion"].update(bogus=1), r"model\.fusion\.bogus"),
        (lambda c: c["fusion"].update(query="audio"), r"model\.fusion\.query"),
        (lambda c: c["fusion"].update(pool="bogus"), r"model\.fusion\.pool"),
        (lambda c: c["heads"]["cls"].update(kind="bogus"), r"model\.heads\.cls\.kind"),
        (lambda c: c["heads"]["cls"].update(bogus=1), r"model\.heads\.cls\.bogus"),
        (lambda c: c["encoders"]["image"].update(bogus=1), r"model\.encoders\.image\.bogus"),
        (lambda c: c["encoders"]["text"].update(bogus=1), r"model\.encoders\.text\.bogus"),
        (lambda c: c["encoders"]["image"].update(kind="bogus"), r"model\.encoders\.image"),
        (lambda c: c["encoders"].update(smell={"kind": "vit"}), r"no modality 'smell'"),
        (lambda c: c.update(image=c["encoders"].pop("image")),
         r"model\.image: towers are configured under config\.model\.encoders\.image"),
        (lambda c: c.update(remat="bogus"), r"model\.remat"),
        (lambda c: c.update(dtype="float8"), r"model\.dtype"),
        (lambda c: c.update(heads={}), r"model\.heads"),
    ],
)
def test_config_errors_name_the_key(edit, match):
    cfg = _model_cfg(heads={"cls": {"kind": "classification", "num_classes": 2}})
    edit(cfg)
    with pytest.raises(ValueError, match=match):
        _shapes(build_model(cfg), _batch(0))


def test_missing_batch_input_is_named():
    model = build_model(_model_cfg(heads={"cls": {"kind": "classification", "num_classes": 2}}))
    with pytest.raises(ValueError, match="'text'"):
        _shapes(model, {"image": _images(0)})


# --------------------------------------------------------------------------------- ResNet (7)


def _np_conv(x: np.ndarray, k: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Float64 NHWC convolution with symmetric zero padding (HWIO kernel)."""
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, k.shape[:2], axis=(1, 2))
    win = win[:, ::stride, ::stride]  # [B, H', W', C, kh, kw]
    return np.einsum("bhwcij,ijco->bhwo", win, np.asarray(k, np.float64))


@pytest.mark.parametrize(
    ("variant", "width", "tokens"), [("mu", None, (B, 16, 16)), ("18", 8, (B, 1, 64))]
)
def test_resnet_shapes_and_batch_stats(variant, width, tokens):
    x = _images(30, size=32)
    model = ResNet(variant, width=width)
    variables = _fill(model, x, seed=3)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["batch_stats"]["stem"]["bn"]) == {"mean", "var"}
    apply = _jitted(model)
    out = apply(variables, x)  # eval mode: running statistics, nothing mutable
    assert out["tokens"].shape == tokens
    assert out["pooled"].shape == (B, tokens[-1])
    np.testing.assert_allclose(
        np.asarray(out["pooled"]), np.asarray(out["tokens"]).mean(1), rtol=RTOL, atol=ATOL
    )
    out_train, updates = apply(variables, x, train=True, mutable=("batch_stats",))
    old, new = _flat(variables["batch_stats"]), _flat(updates["batch_stats"])
    assert old.keys() == new.keys()
    for k in old:
        assert not np.allclose(old[k], new[k]), f"{k} was not updated in train mode"
    # Train mode normalises with batch statistics, eval mode with the running ones.
    assert not np.allclose(np.asarray(out_train["pooled"]), np.asarray(out["pooled"]), atol=1e-4)
    # The stem's running moments move 10% (momentum 0.9) towards its conv output's moments.
    y = _np_conv(x, variables["params"]["stem"]["conv"]["kernel"], stride=2, pad=3)
    bn_old, bn_new = variables["batch_stats"]["stem"]["bn"], updates["batch_stats"]["stem"]["bn"]
    np.testing.assert_allclose(
        np.asarray(bn_new["mean"]),
        0.9 * np.asarray(bn_old["mean"]) + 0.1 * y.mean((0, 1, 2)),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(bn_new["var"]),
        0.9 * np.asarray(bn_old["var"]) + 0.1 * y.var((0, 1, 2)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_resnet_unknown_variant():
    with pytest.raises(ValueError, match="'17'"):
        _shapes(ResNet("17"), _images(0, b=1, size=32))


def test_resnet_tower_keeps_batch_stats_under_its_modality():
    cfg = _model_cfg("late", heads={"reg": {"kind": "regression"}})
    cfg["encoders"]["image"] = {"kind": "resnet", "variant": "mu"}
    model = build_model(cfg)
    batch = {**_batch(31), "image": _images(31, size=32)}
    variables = _fill(model, batch)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["batch_stats"]) == {"image"}
    assert set(variables["params"]) == {"image", "text", "fusion", "heads"}
    out, upd = _jitted(model)(variables, batch, train=True, mutable=("batch_stats",))
    assert out["reg"]["predictions"].shape == (B,)
    assert set(upd["batch_stats"]) == {"image"}


_PMAP_BN = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from flax import traverse_util
    from mmjax.models.layers import Options
    from mmjax.models.resnet import ResNet

    n = jax.local_device_count()
    rng = np.random.default_rng(0)
    # Each device's shard has its own offset and scale, so local and global moments differ.
    x = rng.normal(size=(n, 2, 32, 32, 3)) * (1 + np.arange(n))[:, None, None, None, None]
    x = (x + np.arange(n)[:, None, None, None, None]).astype(np.float32)
    shapes = jax.eval_shape(
        lambda: ResNet("mu").init(jax.random.key(0, impl="unsafe_rbg"), x[0]))
    variables = traverse_util.unflatten_dict({
        k: (np.ones(s.shape) if k[-1] in ("var", "scale") else 0.3 * rng.normal(size=s.shape)
            ).astype(np.float32)
        for k, s in traverse_util.flatten_dict(shapes).items()})

    def stats(model):
        def step(v, xs):
            return model.apply(v, xs, train=True, mutable=["batch_stats"])[1]["batch_stats"]
        return step

    synced = jax.pmap(stats(ResNet("mu", opts=Options(bn_axis_name="data"))), axis_name="data",
                      in_axes=(None, 0))(variables, x)
    local = jax.pmap(stats(ResNet("mu")), axis_name="data", in_axes=(None, 0))(variables, x)
    single = jax.jit(stats(ResNet("mu")))(variables, x.reshape(n * 2, 32, 32, 3))
    dump = lambda t: {"/".join(k): np.asarray(v).tolist()
                      for k, v in traverse_util.flatten_dict(t).items()}
    print(json.dumps({"devices": n, "synced": dump(synced), "local": dump(local),
                      "single": dump(single)}))
    """
)


def test_resnet_cross_device_batchnorm_matches_global_batch():
    flags = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", _PMAP_BN],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["devices"] == 4
    single = {k: np.asarray(v) for k, v in res["single"].items()}
    assert len(single) == 2 * 6  # mean, var of: stem, 2 + 2 block convs, 1 shortcut
    local_differs = False
    for k, ref in single.items():
        synced, local = np.asarray(res["synced"][k]), np.asarray(res["local"][k])
        assert synced.shape == local.shape == (4, *ref.shape), k
        for d in range(4):  # every replica holds the global batch's statistics
            np.testing.assert_allclose(synced[d], ref, rtol=1e-5, atol=1e-6, err_msg=f"{k} {d}")
        local_differs |= not np.allclose(local, ref[None], rtol=1e-3)
    assert local_differs, "per-device statistics equal the global ones: the check has no teeth"


# ------------------------------------------------------------------------- compute dtype (8)


def test_bfloat16_compute_float32_params():
    batch = _batch(40)
    model = build_model(_model_cfg("cross_attention", dtype="bfloat16"))
    assert model.opts.dtype == jnp.bfloat16
    shapes = _shapes(model, batch)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    f32 = build_model(_model_cfg("cross_attention"))
    params = _fill(f32, batch, seed=5)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(shapes)
    # One compile for both models: the bf16 model and the float32 one with the same weights.
    out, ref = jax.jit(
        lambda p: (model.apply({"params": p}, batch), f32.apply({"params": p}, batch)))(params)
    assert out["cls"]["logits"].dtype == jnp.bfloat16
    assert out["reg"]["predictions"].dtype == jnp.bfloat16
    assert out["clip"]["image_embeds"].dtype == jnp.float32  # normalised in float32
    assert out["clip"]["logit_scale"].dtype == jnp.float32
    # Same weights in float32: bf16 keeps ~3 significant digits.
    for task, key in (("cls", "logits"), ("reg", "predictions")):
        got = np.asarray(out[task][key], np.float32)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, np.asarray(ref[task][key]), rtol=0.05, atol=0.1)


# ------------------------------------------------------------------------------- dropout (9)


def test_dropout_train_vs_eval():
    batch = _batch(50)
    model = build_model(_model_cfg("cross_attention", dropout=0.1))
    params = _fill(model, batch, seed=6)["params"]

    def outputs(train):
        def fn(p, key):
            out = model.apply({"params": p}, batch, train=train, rngs={"dropout": key})
            return {t: out[t][k] for t, k in (("cls", "logits"), ("reg", "predictions"))}

        return jax.jit(fn)

    train, evaluate = outputs(True), outputs(False)
    a, b, a2 = (jax.tree.map(np.asarray, train(params, _key(k))) for k in (1, 2, 1))
    e1, e2 = (jax.tree.map(np.asarray, evaluate(params, _key(k))) for k in (3, 4))
    for t in a:
        assert not np.allclose(a[t], b[t], atol=1e-5), t  # different rngs, different masks
        np.testing.assert_array_equal(a[t], a2[t])  # same rng, same masks
        np.testing.assert_array_equal(e1[t], e2[t])  # eval ignores the dropout rng
        assert not np.allclose(e1[t], a[t], atol=1e-5), t
    # ... and does not need one.
    jax.eval_shape(lambda: model.apply({"params": params}, batch, train=False))
    with pytest.raises(InvalidRngError, match="dropout"):
        jax.eval_shape(lambda: model.apply({"params": params}, batch, train=True))


# --------------------------------------------------------------------------------- remat (10)


@pytest.mark.slow
def test_remat_same_loss_and_grads():
    """Rematerialisation changes memory, not maths; dropout 0.1 with one rng checks that the
    recomputed forward pass draws the same masks."""
    batch = _batch(60)
    heads = {"cls": {"kind": "classification", "num_classes": 5}}
    plain = build_model(_model_cfg(heads=heads, dropout=0.1))
    remat = build_model(_model_cfg(heads=heads, dropout=0.1, remat="nothing_saveable"))
    assert plain.opts.remat is None and remat.opts.remat == "nothing_saveable"
    params = _fill(plain, batch, seed=7)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(_shapes(remat, batch)["params"])
    labels = np.random.default_rng(61).integers(0, 5, size=B)

    def loss_and_grad(model, p, key):
        def loss(p):
            out = model.apply({"params": p}, batch, train=True, rngs={"dropout": key})
            logp = jax.nn.log_softmax(out["cls"]["logits"])
            return -logp[np.arange(B), labels].mean()

        return jax.value_and_grad(loss)(p)

    # One compile for both (about half the time of two); jax.checkpoint's optimisation barriers
    # keep the recomputation from being merged with the plain forward pass.
    (l0, g0), (l1, g1) = jax.jit(
        lambda p, k: (loss_and_grad(plain, p, k), loss_and_grad(remat, p, k)))(params, _key(7))
    np.testing.assert_allclose(float(l1), float(l0), rtol=RTOL)
    f0, f1 = _flat(g0), _flat(g1)
    assert f0.keys() == f1.keys()
    gmax = max(np.abs(np.asarray(v)).max() for v in f0.values())
    for k in f0:
        # Some gradients are zero in exact arithmetic (a key bias does not change a softmax) and
        # only rounding noise here; the absolute floor is relative to the largest gradient.
        ref = np.asarray(f0[k])
        np.testing.assert_allclose(
            np.asarray(f1[k]),
            ref,
            rtol=RTOL,
            atol=max(1e-5 * np.abs(ref).max(), 1e-7 * gmax),
            err_msg=k,
        )
    for part in ("image", "text", "fusion", "heads"):  # gradients reach every part
        assert max(np.abs(np.asarray(v)).max() for k, v in f0.items() if k.startswith(part)) > 0

    # Remat was applied: one jax.checkpoint per transformer layer, with the asked-for policy,
    # and none without it.
    layers = {k.split("/layer_")[0] + k.split("/layer_")[1].split("/")[0] for k in f0
              if "/layer_" in k}
    for model, want in ((plain, 0), (remat, len(layers))):
        fwd = jax.make_jaxpr(lambda p, m=model: loss_and_grad(m, p, _key(7))[0])(params)
        found = [e for e in fwd.jaxpr.eqns if e.primitive.name == "remat2"]
        assert len(found) == want, (len(found), sorted(layers))
        assert all(e.params["policy"] is jax.checkpoint_policies.nothing_saveable for e in found)
    assert len(layers) >= 3  # the image, text and fusion layers
