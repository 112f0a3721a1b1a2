"""Pretraining objectives on CPU: SigLIP, ITM with hard negatives, MLM, MAE-style MIM, captioning.

Losses and random draws are checked against numpy re-implementations; the model-level tests
share one tiny model (ViT + text tower of depth 1, cross-attention fusion, every objective head)
whose parameters are random numbers in the shapes ``model.init`` would create, and compile each
function once with XLA's cheap CPU settings (the whole file is meant to stay well under 40 s).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mmjax.models import heads as heads_lib
from mmjax.models import layers, losses, objectives
from mmjax.models.multimodal import MultimodalModel, build_model, loss_spec, make_head
from mmjax.models.vit import ViT
from mmjax.optim import weighting
from mmjax.trainer import state as state_lib
from mmjax.trainer import step as step_lib

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
V, B, L, IMG, P = 24, 4, 8, 16, 4  # vocabulary, batch, text length, image size, patch size
N = (IMG // P) ** 2  # patches per image


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="unsafe_rbg")  # cheap to compile on CPU


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _texts(rng: np.random.Generator, b: int, length: int, lengths=None) -> tuple:
    """Rows ``[CLS] words [SEP] PAD…`` with word ids in [5, V) and the given numbers of words."""
    lengths = rng.integers(1, length - 1, size=b) if lengths is None else np.asarray(lengths)
    ids = np.zeros((b, length), np.int32)
    for r, n in enumerate(lengths):
        ids[r, 0] = CLS
        ids[r, 1 : 1 + n] = rng.integers(5, V, size=n)
        ids[r, 1 + n] = SEP
    return ids, (ids != PAD).astype(np.int32)


# --------------------------------------------------------------------------------- SigLIP


def test_siglip_loss_matches_numpy():
    rng = np.random.default_rng(0)
    n, d = 6, 5
    img, txt = rng.normal(size=(2, n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    scale, bias = np.float32(1.7), np.float32(-2.3)
    outputs = {"image_embeds": img, "text_embeds": txt, "logit_scale": scale, "logit_bias": bias}
    fn = jax.jit(lambda o, b: losses.siglip(o, b, {}))

    def reference(i, t):
        logits = np.exp(np.float64(scale)) * (i.astype(np.float64) @ t.T.astype(np.float64))
        logits += bias
        labels = np.where(np.eye(len(i)) > 0, 1.0, -1.0)
        acc = np.mean(np.argmax(logits, 1) == np.arange(len(i)))
        return -_log_sigmoid(labels * logits).sum() / len(i), acc

    loss, metrics = fn(outputs, {"valid": np.ones(n, np.float32)})
    ref, ref_acc = reference(img, txt)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["i2t_accuracy"]), ref_acc, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["temperature"]), math.exp(1.7), rtol=1e-6)
    # Padding examples drop out as anchors and as negatives: equal to the loss without them.
    valid = np.array([1, 1, 0, 1, 0, 1], np.float32)
    loss, metrics = fn(outputs, {"valid": valid})
    keep = valid > 0
    ref, ref_acc = reference(img[keep], txt[keep])
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["i2t_accuracy"]), ref_acc, rtol=1e-6)
    with pytest.raises(ValueError, match="init_bias"):
        losses.siglip({k: v for k, v in outputs.items() if k != "logit_bias"}, {}, {})


def test_siglip_head_defaults_and_registration():
    """SigLIP's published initialisation (Zhai et al. 2023: t' = log 10, b = -10), a contrastive
    head that asks for a bias and temperature, and CLIP's parameter tree without one; every head
    kind resolves to a registered loss, and a head's own ``loss`` key wins."""
    rng = np.random.default_rng(1)
    feats = {"image": rng.normal(size=(3, 12)), "text": rng.normal(size=(3, 10))}
    specs = {
        "sig": {"kind": "siglip", "embed_dim": 8},
        "biased": {"kind": "contrastive", "embed_dim": 8, "init_bias": -3.0,
                   "init_temperature": 0.5, "loss": "siglip"},
        "clip": {"kind": "contrastive", "embed_dim": 8},
    }
    heads = {t: make_head(t, c, layers.Options(), parent=None) for t, c in specs.items()}
    both = jax.jit(lambda k: {t: h.init_with_output(k, feats) for t, h in heads.items()})(_key(0))
    out = {t: o for t, (o, _) in both.items()}
    params = {t: v["params"] for t, (_, v) in both.items()}
    np.testing.assert_allclose(float(out["sig"]["logit_scale"]), math.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(float(out["sig"]["logit_bias"]), -10.0)
    np.testing.assert_allclose(float(out["biased"]["logit_scale"]), math.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(float(out["biased"]["logit_bias"]), -3.0)
    # Without init_bias the head (and its parameter tree) is CLIP's.
    assert "logit_bias" not in out["clip"]
    assert set(params["clip"]) == {"image_proj", "text_proj", "logit_scale"}
    assert params["sig"]["logit_bias"].shape == ()
    assert loss_spec(specs["biased"]) == "siglip" and loss_spec(specs["clip"]) == "infonce"
    for kind in heads_lib.HEADS:  # every kind has a default loss that the registry knows
        losses.get_loss(loss_spec({"kind": kind}))


def test_siglip_gradient_accumulation_matches_full_batch():
    """siglip is batch-coupled: GradCache (trainer.accumulated_grads) must give the full batch's
    loss and gradients, ``logit_bias`` merged across micro-batches like ``logit_scale``."""
    rng = np.random.default_rng(13)
    batch = {"image": rng.normal(size=(8, 12)).astype(np.float32),
             "text": rng.normal(size=(8, 10)).astype(np.float32)}
    model = _SigLIPOnly()  # features = the batch itself
    params = jax.jit(model.init)(_key(0), batch)["params"]
    params = {**params, "sig": {**params["sig"], "logit_bias": jnp.float32(-1.5)}}
    tasks = (state_lib.Task("sig", "siglip", 1.0, {"kind": "siglip"}),)
    weights = weighting.Weighting(lambdas=(("sig", 1.0),))
    step = jnp.int32(0)

    def both(p, key):
        full = jax.value_and_grad(step_lib.loss_fn, has_aux=True)(
            p, {}, batch, key, step, model=model, tasks=tasks, weights=weights, train=True)
        accum = step_lib.accumulated_grads(p, {}, batch, key, step, model=model, tasks=tasks,
                                           weights=weights, accum_steps=2)
        return full, accum

    ((loss, (metrics, _)), grads), (accum_grads, accum_metrics, _) = jax.jit(both)(params, _key(1))
    np.testing.assert_allclose(float(accum_metrics["loss"]), float(loss), rtol=1e-6)
    for k in ("sig_loss", "sig_i2t_accuracy", "sig_bias"):
        np.testing.assert_allclose(float(accum_metrics[k]), float(metrics[k]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["sig_bias"]), -1.5, rtol=1e-6)
    flat = traverse_util.flatten_dict(grads)
    for k, v in traverse_util.flatten_dict(accum_grads).items():
        assert np.abs(np.asarray(flat[k])).max() > 0, k
        np.testing.assert_allclose(np.asarray(v), np.asarray(flat[k]), rtol=1e-5, atol=1e-6,
                                   err_msg="/".join(k))


class _SigLIPOnly(nn.Module):
    """A model that is one SigLIP head reading the batch's arrays as its features."""

    @nn.compact
    def __call__(self, batch, *, train: bool = False):
        return {"sig": heads_lib.SigLIPHead(embed_dim=8, name="sig")(batch, train=train)}


# --------------------------------------------------------------------------------------- MLM


def test_mlm_masking_statistics_and_specials():
    rng = np.random.default_rng(2)
    b, length, vocab = 512, 32, 50
    ids, mask = _texts(rng, b, length, lengths=rng.integers(20, length - 1, size=b))
    ids[ids >= 5] = rng.integers(5, vocab, size=int((ids >= 5).sum()))
    ids[:, 5] = np.where(rng.random(b) < 0.3, UNK, ids[:, 5])  # UNK and MASK are never masked
    ids[:, 6] = np.where(rng.random(b) < 0.3, MASK, ids[:, 6])
    ids[0], mask[0] = 0, 0  # a row with nothing to mask
    ids[0, :2], mask[0, :2] = (CLS, SEP), 1
    fn = jax.jit(lambda k, i, m: objectives.mlm_mask(k, i, m, vocab_size=vocab))
    masked, selected = (np.asarray(x) for x in fn(_key(3), ids, mask))
    maskable = (mask > 0) & (ids > MASK)
    assert not (selected & ~maskable).any()  # PAD, UNK, CLS, SEP, MASK are never selected
    np.testing.assert_array_equal(masked[~selected], ids[~selected])
    assert selected[maskable.any(1)].any(1).all() and not selected[0].any()
    rate = selected.sum() / maskable.sum()
    assert abs(rate - 0.15) < 0.015, rate
    sel_new, sel_old = masked[selected], ids[selected]
    to_mask = np.mean(sel_new == MASK)
    unchanged = np.mean(sel_new == sel_old)
    random = (sel_new != MASK) & (sel_new != sel_old)
    assert abs(to_mask - 0.8) < 0.04, to_mask
    assert abs(unchanged - 0.1) < 0.03, unchanged
    assert abs(random.mean() - 0.1) < 0.03, random.mean()
    assert (sel_new[random] > MASK).all() and (sel_new < vocab).all()  # random ids: no specials
    assert len(np.unique(sel_new[random])) > 30  # ... spread over the vocabulary
    again, _ = fn(_key(3), ids, mask)
    _, other_sel = fn(_key(4), ids, mask)
    np.testing.assert_array_equal(np.asarray(again), masked)
    assert (np.asarray(other_sel) != selected).any()


def test_mlm_loss_counts_only_selected_positions():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 6, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 6)).astype(np.int32)
    weights = (rng.random((3, 6)) < 0.4).astype(np.float32)
    weights[:, 0] = 1
    targets[0, 0] = np.argmax(logits[0, 0])  # at least one correct prediction
    fn = jax.jit(lambda o, b: losses.mlm(o, b, {}))
    out = {"logits": logits, "targets": targets, "weights": weights}
    for valid in (np.ones(3, np.float32), np.array([1, 0, 1], np.float32)):
        loss, metrics = fn(out, {"valid": valid})
        w = weights * valid[:, None]
        xent = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
        np.testing.assert_allclose(float(loss), (xent * w).sum() / w.sum(), rtol=1e-5)
        correct = np.argmax(logits, -1) == targets
        np.testing.assert_allclose(float(metrics["accuracy"]), (correct * w).sum() / w.sum(),
                                   rtol=1e-6)
    # Logits at unselected positions do not matter.
    noisy = logits + 5 * rng.normal(size=logits.shape).astype(np.float32) * (1 - weights)[..., None]
    ones = {"valid": np.ones(3, np.float32)}
    np.testing.assert_allclose(float(fn({**out, "logits": noisy}, ones)[0]),
                               float(fn(out, ones)[0]), rtol=1e-6)


# ------------------------------------------------------------------------------------- MIM


def test_mae_keep_indices():
    assert objectives.num_kept(196, 0.75) == 49 and objectives.num_kept(16, 0.6) == 6
    assert objectives.num_kept(4, 0.99) == 1
    with pytest.raises(ValueError, match="mask_ratio"):
        objectives.num_kept(16, 1.0)
    keep = np.asarray(jax.jit(objectives.random_keep, static_argnums=(1, 2, 3))(
        _key(6), 2000, N, 0.75))
    assert keep.shape == (2000, 4) and keep.dtype == np.int32
    assert ((keep >= 0) & (keep < N)).all()
    assert all(len(set(row)) == 4 for row in keep.tolist())
    # Independent uniform permutations: every patch is kept a quarter of the time.
    freq = np.bincount(keep.ravel(), minlength=N) / 2000
    np.testing.assert_allclose(freq, 0.25, atol=0.04)
    assert len({tuple(sorted(r)) for r in keep.tolist()}) > 1000


def _np_patchify(images: np.ndarray, p: int) -> np.ndarray:
    b, h, w, c = images.shape
    out = np.zeros((b, (h // p) * (w // p), p * p * c), images.dtype)
    for i in range(h // p):
        for j in range(w // p):
            out[:, i * (w // p) + j] = images[:, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(
                b, -1
            )
    return out


def test_vit_keep_equals_blocks_on_gathered_tokens():
    rng = np.random.default_rng(7)
    vit = ViT("mu/8", width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=P,
              class_token=True, pool="gap")
    images = rng.uniform(-1, 1, size=(3, IMG, IMG, 3)).astype(np.float32)
    keep = np.stack([rng.permutation(N)[:5] for _ in range(3)]).astype(np.int32)
    shapes = jax.eval_shape(lambda: vit.init(_key(0), images))
    flat = {k: jnp.asarray(rng.normal(size=v.shape) * 0.3, np.float32)
            for k, v in traverse_util.flatten_dict(shapes).items()}
    variables = traverse_util.unflatten_dict(flat)
    encoder = layers.Encoder(depth=1, num_heads=2, mlp_dim=32)
    params = variables["params"]

    def both(v, x, k, tokens):
        return vit.apply(v, x, keep=k), encoder.apply({"params": v["params"]["encoder"]}, tokens)

    # Independent embedding: numpy patches x kernel + bias + position, gathered, class token.
    kernel = np.asarray(params["embedding"]["kernel"]).reshape(-1, 16)
    emb = _np_patchify(images, P) @ kernel + np.asarray(params["embedding"]["bias"])
    pos = np.asarray(params["pos_embedding"])[0]
    emb = emb + pos[1:]
    gathered = np.take_along_axis(emb, keep[..., None], axis=1)
    cls = np.broadcast_to(np.asarray(params["cls"])[0] + pos[:1], (3, 1, 16))
    tokens = np.concatenate([cls, gathered], axis=1).astype(np.float32)
    out, ref = jax.jit(both)(variables, images, keep, tokens)
    assert out["tokens"].shape == (3, 6, 16)
    np.testing.assert_allclose(np.asarray(out["tokens"]), np.asarray(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["pooled"]), np.asarray(ref)[:, 1:].mean(1),
                               rtol=1e-4, atol=1e-4)


def test_mim_targets_and_loss_match_numpy():
    rng = np.random.default_rng(8)
    images = rng.uniform(-1, 1, size=(3, 8, 12, 3)).astype(np.float32)
    patches = _np_patchify(images, 4)
    np.testing.assert_array_equal(np.asarray(objectives.patchify(images, 4)), patches)
    mean = patches.mean(-1, keepdims=True)
    var = ((patches - mean) ** 2).mean(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(heads_lib.normalize_patches(patches)),
                               (patches - mean) / np.sqrt(var + 1e-6), rtol=1e-4, atol=1e-5)
    preds = rng.normal(size=patches.shape).astype(np.float32)
    hidden = (rng.random((3, 6)) < 0.5).astype(np.float32)
    hidden[:, 0] = 1
    valid = np.array([1, 1, 0], np.float32)
    loss, _ = jax.jit(lambda o, b: losses.mim(o, b, {}))(
        {"predictions": preds, "targets": patches, "mask": hidden}, {"valid": valid}
    )
    w = hidden * valid[:, None]
    per_patch = ((preds.astype(np.float64) - patches) ** 2).mean(-1)
    np.testing.assert_allclose(float(loss), (per_patch * w).sum() / w.sum(), rtol=1e-5)


# ------------------------------------------------------------------------------------- ITM


def test_itm_negatives_follow_similarity_and_skip_positive():
    rng = np.random.default_rng(9)
    n = 6
    logits = rng.normal(size=(n, n)).astype(np.float32)
    logits[0, 3] = 12.0  # one strongly similar off-diagonal pair
    logits[2, 2] = 50.0  # the positive is never a negative, however similar
    valid = np.array([1, 1, 1, 1, 1, 0], np.float32)
    keys = jax.random.split(_key(10), 4000)
    draw = jax.jit(jax.vmap(objectives.sample_negatives, in_axes=(0, None, None)))
    neg = np.asarray(draw(keys, logits, np.ones(n, np.float32)))
    assert neg.shape == (4000, n) and (neg != np.arange(n)).all()
    assert np.mean(neg[:, 0] == 3) > 0.99
    # Row 1's frequencies follow softmax over the off-diagonal entries.
    expected = np.exp(_log_softmax(np.where(np.eye(n) > 0, -np.inf, logits))[1])
    np.testing.assert_allclose(np.bincount(neg[:, 1], minlength=n) / 4000, expected, atol=0.03)
    neg_valid = np.asarray(draw(keys, logits, valid))
    assert (neg_valid != 5).all() and (neg_valid != np.arange(n)).all()
    # A duplicate (the same caption elsewhere in the batch) is skipped however similar; a row
    # whose every candidate is a duplicate still gets one of them rather than the positive.
    dup = np.zeros((n, n), bool)
    dup[0, 3] = True
    dup[4, :] = True
    draw_dup = jax.jit(jax.vmap(objectives.sample_negatives, in_axes=(0, None, None, None)))
    neg_dup = np.asarray(draw_dup(keys, logits, np.ones(n, np.float32), dup))
    assert (neg_dup[:, 0] != 3).all() and (neg_dup != np.arange(n)).all()
    assert set(np.unique(neg_dup[:, 4])) <= {0, 1, 2, 3, 5}
    with pytest.raises(ValueError, match="B >= 2"):
        objectives.sample_negatives(_key(0), np.zeros((1, 1), np.float32))


def test_itm_and_caption_losses_match_numpy():
    rng = np.random.default_rng(11)
    logits = rng.normal(size=(3 * 4, 2)).astype(np.float32)
    valid = np.array([1, 0, 1, 1], np.float32)
    loss, metrics = jax.jit(lambda o, b: losses.itm(o, b, {}))({"logits": logits}, {"valid": valid})
    labels = np.array([1] * 4 + [0] * 8)
    w = np.tile(valid, 3)
    xent = -_log_softmax(logits)[np.arange(12), labels]
    np.testing.assert_allclose(float(loss), (xent * w).sum() / w.sum(), rtol=1e-5)
    acc = ((np.argmax(logits, -1) == labels) * w).sum() / w.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)

    logits = rng.normal(size=(4, 5, 9)).astype(np.float32)
    weights = np.ones((4, 5), np.float32)
    weights[:, 3:] = 0
    targets = rng.integers(0, 9, size=(4, 5)).astype(np.int32)
    targets[0, :3] = np.argmax(logits[0, :3], -1)  # row 0: every valid token right
    targets[1, :3] = np.argmax(logits[1, :3], -1)  # row 1: all right but one
    targets[1, 1] = (targets[1, 1] + 1) % 9
    targets[2, :3] = np.argmax(logits[2, :3], -1)  # row 2: right, but a padding example
    valid = np.array([1, 1, 0, 1], np.float32)
    out = {"logits": logits, "targets": targets, "weights": weights}
    loss, metrics = jax.jit(lambda o, b: losses.caption(o, b, {}))(out, {"valid": valid})
    w = weights * valid[:, None]
    xent = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    correct = np.argmax(logits, -1) == targets
    np.testing.assert_allclose(float(loss), (xent * w).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), (correct * w).sum() / w.sum(),
                               rtol=1e-6)
    exact = np.array([correct[r, :3].all() for r in range(4)], np.float32)
    assert exact[0] == 1 and exact[1] == 0
    np.testing.assert_allclose(float(metrics["exact_match"]), (exact * valid).sum() / 3,
                               rtol=1e-6)


# -------------------------------------------------------------------- the model, end to end


def _config() -> ml_collections.ConfigDict:
    tower = {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
    heads = {
        "clip": {"kind": "siglip", "embed_dim": 8},
        "itm": {"kind": "itm", "contrastive": "clip"},
        "mlm": {"kind": "mlm", "vocab_size": 0},
        "mim": {"kind": "mim", "decoder_width": 16, "decoder_depth": 1, "decoder_heads": 2},
        "cap": {"kind": "caption", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32,
                "max_len": L},
    }
    return ml_collections.ConfigDict({
        "model": {
            "encoders": {
                "image": {"kind": "vit", "variant": "mu/8", "patch_size": P, **tower},
                "text": {"kind": "text", "variant": "mu", "vocab_size": V, "max_len": 16, **tower},
            },
            "fusion": {"kind": "cross_attention", **tower},
            "heads": heads,
        },
        "losses": {"clip": 1.0, "itm": 0.5, "mlm": 1.0, "mim": 0.7, "cap": 1.0},
    })


def _fill(model, batch, seed: int = 0) -> dict:
    """Parameters shaped like ``model.init``'s, filled with fan-in-scaled random numbers."""
    shapes = jax.eval_shape(lambda: model.init(_key(0), batch))["params"]
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "scale":
            v = 1 + 0.1 * rng.normal(size=s.shape)
        elif path[-1] == "logit_scale":
            v = np.full(s.shape, np.log(10.0))
        elif len(s.shape) >= 2:
            fan_in = s.shape[0] if path[-2] in ("query", "key", "value") else np.prod(s.shape[:-1])
            v = rng.normal(size=s.shape) / np.sqrt(fan_in)
        else:
            v = 0.1 * rng.normal(size=s.shape)
        out[path] = jnp.asarray(v, s.dtype)
    return traverse_util.unflatten_dict(out)


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids, mask = _texts(rng, B, L, lengths=[6, 3, 5, 1])
    images = rng.uniform(-1, 1, size=(B, IMG, IMG, 3)).astype(np.float32)
    return {"image": images, "text": {"ids": ids, "mask": mask}, "label": np.zeros(B, np.int32)}


@pytest.fixture(scope="module")
def setup():
    config = _config()
    model = build_model(config.model)
    tasks = state_lib.tasks_from_config(config)
    batch = _batch(12)
    params = _fill(model, batch)

    def evaluate(p, b):  # eval_step's computation (no rng; batches carry "valid")
        outputs, _ = step_lib.forward(p, {}, b, None, model=model, train=False)
        return outputs, step_lib.task_losses(outputs, b, tasks)[1]

    return model, tasks, batch, params, jax.jit(evaluate)


@pytest.mark.slow
def test_all_objectives_train_together(setup):
    model, tasks, batch, params, _ = setup
    assert {t.name: t.loss for t in tasks} == {
        "clip": "siglip", "itm": "itm", "mlm": "mlm", "mim": "mim", "cap": "caption"}

    weights = weighting.from_config(_config())

    def loss_fn(p, rng):  # step.loss_fn, keeping the outputs to inspect them
        outputs, _ = step_lib.forward(p, {}, batch, rng, model=model, train=True)
        per_task, metrics = step_lib.task_losses(outputs, batch, tasks)
        total, _ = weights.combine(per_task, 0, p)
        return total, (metrics, outputs)

    def step(p, rng):
        (loss, (metrics, outputs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, rng)
        return loss, metrics, grads, outputs

    step = jax.jit(step)
    loss, metrics, grads, out = step(params, _key(1))
    assert np.isfinite(float(loss))
    for name in ("clip_loss", "itm_loss", "mlm_loss", "mim_loss", "cap_loss", "itm_accuracy",
                 "mlm_accuracy", "cap_exact_match", "clip_i2t_accuracy", "clip_bias"):
        assert np.isfinite(float(metrics[name])), name
    weighted = sum(t.weight * float(metrics[f"{t.name}_loss"]) for t in tasks)
    np.testing.assert_allclose(float(loss), weighted, rtol=1e-5)
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(grads).items()}
    assert all(np.isfinite(v).all() for v in flat.values())
    for part in ("image/", "text/", "fusion/", "heads/clip/", "heads/itm/", "heads/mlm/",
                 "heads/mim/", "heads/cap/", "heads/clip/logit_bias"):
        assert max(np.abs(v).max() for k, v in flat.items() if k.startswith(part)) > 0, part
    # What the objectives drew: negatives are never the positive, masks have the right sizes.
    rows = np.arange(B)
    assert out["itm"]["logits"].shape == (3 * B, 2)
    assert (np.asarray(out["itm"]["negative_text"]) != rows).all()
    assert (np.asarray(out["itm"]["negative_image"]) != rows).all()
    ids = batch["text"]["ids"]
    sel = np.asarray(out["mlm"]["weights"]) > 0
    assert not (sel & (ids <= MASK)).any() and sel.any(1).all()
    np.testing.assert_array_equal(np.asarray(out["mlm"]["targets"]), ids)
    hidden = np.asarray(out["mim"]["mask"])
    np.testing.assert_array_equal(hidden.sum(1), N - objectives.num_kept(N, 0.75))
    assert out["mim"]["predictions"].shape == (B, N, P * P * 3)
    np.testing.assert_array_equal(np.asarray(out["cap"]["targets"]), ids[:, 1:])
    np.testing.assert_array_equal(np.asarray(out["cap"]["weights"]), batch["text"]["mask"][:, 1:])
    # Another masking rng, other draws (same compiled step).
    _, _, _, out2 = step(params, _key(2))
    assert (np.asarray(out2["mim"]["mask"]) != hidden).any()
    assert (np.asarray(out2["mlm"]["weights"] > 0) != sel).any()


def _eval_batch(batch: dict) -> dict:
    return {**batch, "valid": np.array([1, 1, 1, 0], np.float32)}  # the last row is padding


def test_eval_is_deterministic_and_skips_padding(setup):
    _, _, batch, params, evaluate = setup
    batch = _eval_batch(batch)
    # A second, separately traced and compiled evaluation, on a batch whose padding row holds
    # other content: the same masks and negatives, and metrics that ignore the padding row.
    again = jax.jit(lambda p, b: evaluate.__wrapped__(p, b))  # a new function: a fresh trace
    other = _batch(13)
    padded = _eval_batch(jax.tree.map(lambda x, y: np.concatenate([x[:3], y[3:]]),
                                      {k: batch[k] for k in other}, other))
    assert not np.array_equal(padded["image"][3], batch["image"][3])
    (out1, m1), (out2, m2) = evaluate(params, batch), again(params, padded)
    for k in m1:
        assert np.isfinite(float(m1[k])), k
        np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(m1[k]), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    for t, k in (("mim", "mask"), ("mlm", "weights"), ("itm", "negative_text")):
        np.testing.assert_array_equal(np.asarray(out1[t][k]), np.asarray(out2[t][k]))
    for k in ("negative_text", "negative_image"):  # never the positive, never the padding row
        neg = np.asarray(out1["itm"][k])
        assert (neg != np.arange(B)).all() and (neg != 3).all(), neg
    # MLM reads the image through the fusion: other images, other logits at the same masks.
    swapped, _ = evaluate(params, {**batch, "image": batch["image"][::-1].copy()})
    np.testing.assert_array_equal(np.asarray(swapped["mlm"]["weights"]),
                                  np.asarray(out1["mlm"]["weights"]))
    sel = np.asarray(out1["mlm"]["weights"]) > 0
    assert not np.allclose(np.asarray(swapped["mlm"]["logits"])[sel],
                           np.asarray(out1["mlm"]["logits"])[sel], atol=1e-4)


def test_embed_matches_forward(setup):
    model, _, batch, params, evaluate = setup
    full = evaluate(params, _eval_batch(batch))[0]["clip"]

    def embed(p, b):
        return model.apply({"params": p}, b, method=MultimodalModel.embed, task="clip")

    text, image = jax.jit(lambda p: (embed(p, {"text": batch["text"]}),
                                  embed(p, {"image": batch["image"]})))(params)
    assert set(text) == {"text_embeds"} and set(image) == {"image_embeds"}
    for m, got in (("text", text), ("image", image)):
        np.testing.assert_allclose(np.asarray(got[f"{m}_embeds"]),
                                   np.asarray(full[f"{m}_embeds"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="contrastive"):
        jax.eval_shape(lambda: model.apply({"params": params}, batch,
                                           method=MultimodalModel.embed, task="mlm"))


def test_generate_is_greedy_teacher_forcing(setup):
    model, _, batch, params, evaluate = setup
    generate = jax.jit(lambda p, b: model.apply({"params": p}, b, method=MultimodalModel.generate,
                                             task="cap"))
    images = {"image": batch["image"]}
    # A second parameter set that ends captions mid-way: decoder position 3 gets a large
    # embedding along [SEP]'s output direction, so the token after it is [SEP].
    cap = params["heads"]["cap"]
    k = np.asarray(cap["out"]["kernel"])[:, SEP]
    pos = np.asarray(cap["position_embedding"]).copy()
    pos[3] = 20 * (k - k.mean()) / np.linalg.norm(k - k.mean())
    ending = {**params, "heads": {**params["heads"], "cap": {**cap, "position_embedding": pos}}}
    for p, expected_stop in ((params, None), (ending, 4)):
        seq = np.asarray(generate(p, images))
        assert seq.shape == (B, L) and seq.dtype == np.int32 and (seq[:, 0] == CLS).all()
        # Teacher forcing on the generated captions predicts each next token of them.
        tf_batch = {**batch, "text": {"ids": seq, "mask": (seq != PAD).astype(np.int32)}}
        tf = evaluate(p, _eval_batch(tf_batch))
        logits = np.asarray(tf[0]["cap"]["logits"])
        pred = np.argmax(logits, -1)
        for r in range(B):
            ends = np.flatnonzero(seq[r] == SEP)
            stop = ends[0] if len(ends) else L - 1
            if expected_stop is not None:
                assert stop == expected_stop, seq[r]
            np.testing.assert_array_equal(seq[r, 1 : stop + 1], pred[r, :stop])
            assert (seq[r, stop + 1 :] == PAD).all()
        # The decoder reads the image: same prefix, different images, different logits.
        same = np.broadcast_to(seq[:1], seq.shape)
        same_batch = {**batch, "text": {"ids": same, "mask": (same != PAD).astype(np.int32)}}
        same_logits = np.asarray(evaluate(p, _eval_batch(same_batch))[0]["cap"]["logits"])
        assert not np.allclose(same_logits[0], same_logits[1], atol=1e-4)


def test_objective_config_errors(setup):
    _, _, batch, _, _ = setup

    def trace(config):
        model = build_model(config.model)
        return jax.eval_shape(lambda: model.init(_key(0), batch))

    config = _config()
    config.model.fusion.kind = "none"
    config.model.heads = {"clip": {"kind": "siglip"}, "itm": {"kind": "itm"}}
    with pytest.raises(ValueError, match="fusion"):
        trace(config)
    config = _config()
    config.model.fusion.kind = "concat"
    config.model.heads = {"mlm": {"kind": "mlm"}}
    with pytest.raises(ValueError, match="cross_attention"):
        trace(config)
    config.model.fusion.kind = "none"  # no fusion: plain MLM on the text tower's tokens
    shapes = jax.eval_shape(
        lambda v: build_model(config.model).apply(v, batch), trace(config))["mlm"]
    assert shapes["logits"].shape == (B, L, V)
    config = _config()
    config.model.encoders.image = {"kind": "resnet", "variant": "mu"}
    config.model.heads = {"mim": {"kind": "mim"}}
    with pytest.raises(ValueError, match="vit"):
        trace(config)
