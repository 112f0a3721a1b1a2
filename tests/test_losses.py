"""Losses against float64 numpy references, padding invariance, gradients and the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import losses

RTOL, ATOL = 2e-6, 1e-6


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _normed(rng: np.random.Generator, b: int, d: int) -> np.ndarray:
    x = rng.normal(size=(b, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _infonce_ref(img: np.ndarray, txt: np.ndarray, logit_scale: float) -> float:
    logits = min(np.exp(logit_scale), 100.0) * img.astype(np.float64) @ txt.astype(np.float64).T
    i2t = -np.diag(_log_softmax(logits)).mean()
    t2i = -np.diag(_log_softmax(logits.T)).mean()
    return 0.5 * (i2t + t2i)


def _pad(batch_or_outputs: dict, rng: np.random.Generator, extra: int) -> dict:
    """Appends `extra` random (non-zero) rows to every array, like an eval pipeline's padding."""
    out = {}
    for k, v in batch_or_outputs.items():
        v = np.asarray(v)
        if v.ndim == 0:
            out[k] = v
            continue
        if np.issubdtype(v.dtype, np.integer):
            filler = rng.integers(0, int(v.max()) + 1, size=(extra, *v.shape[1:])).astype(v.dtype)
        else:
            filler = rng.normal(size=(extra, *v.shape[1:])).astype(v.dtype)
        out[k] = np.concatenate([v, filler])
    return out


# --------------------------------------------------------------------------------------------
# Registry and weighted_total.


def test_registry_knows_all_losses_and_rejects_unknown_names():
    names = ("softmax_xent", "sigmoid_xent", "mse", "infonce", "siglip", "itm", "mlm", "mim",
             "caption")
    for name in names:  # each name is bound to the function of that name
        assert losses.get_loss(name) is getattr(losses, name)
    for exc in (KeyError, ValueError):
        with pytest.raises(exc, match="softmax_xent") as info:
            losses.get_loss("softmax_xnet")
        assert "infonce" in str(info.value) and "softmax_xnet" in str(info.value)


def test_register_adds_and_refuses_duplicates():
    @losses.register("test_only_constant")
    def constant(outputs, batch, cfg):
        return jnp.float32(1.0), {}

    try:
        assert losses.get_loss("test_only_constant") is constant
        with pytest.raises(ValueError, match="already registered"):
            losses.register("test_only_constant")(constant)
    finally:
        losses.LOSSES.pop("test_only_constant")


def test_weighted_total():
    rng = np.random.default_rng(0)
    vals = rng.uniform(0.1, 3.0, size=3)
    task_losses = {"a": jnp.float32(vals[0]), "b": jnp.float32(vals[1]), "c": jnp.float32(vals[2])}
    weights = {"a": 0.5, "b": 2.0, "c": 1.0}
    expected = 0.5 * vals[0] + 2.0 * vals[1] + vals[2]
    np.testing.assert_allclose(losses.weighted_total(task_losses, weights), expected, rtol=RTOL)
    jitted = jax.jit(lambda t: losses.weighted_total(t, weights))(task_losses)
    np.testing.assert_allclose(jitted, expected, rtol=RTOL)
    # A zero weight drops the task, so a NaN there cannot poison the total.
    total = losses.weighted_total({"a": jnp.float32(vals[0]), "b": jnp.nan}, {"a": 1.0, "b": 0.0})
    np.testing.assert_allclose(total, vals[0], rtol=RTOL)


def test_weighted_total_rejects_mismatched_tasks():
    with pytest.raises(ValueError, match="'b'"):
        losses.weighted_total({"a": jnp.float32(1.0), "b": jnp.float32(1.0)}, {"a": 1.0})
    with pytest.raises(ValueError, match="'c'"):
        losses.weighted_total({"a": jnp.float32(1.0)}, {"a": 1.0, "c": 1.0})


# --------------------------------------------------------------------------------------------
# softmax_xent.


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_xent_matches_numpy(smoothing):
    rng = np.random.default_rng(1)
    b, c = 16, 7
    logits = rng.normal(scale=3.0, size=(b, c)).astype(np.float32)
    labels = rng.integers(0, c, size=b).astype(np.int32)
    cfg = {"label_smoothing": smoothing} if smoothing else {}
    loss, metrics = jax.jit(lambda o, bt: losses.softmax_xent(o, bt, cfg))(
        {"logits": logits}, {"label": labels}
    )
    targets = np.eye(c)[labels] * (1 - smoothing) + smoothing / c
    expected = -(targets * _log_softmax(logits.astype(np.float64))).sum(-1).mean()
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["accuracy"], (logits.argmax(-1) == labels).mean())
    assert loss.dtype == jnp.float32 and loss.shape == ()


def test_softmax_xent_label_smoothing_hand_computed():
    # Two classes, logits (0, 0): log p = -log 2 for both, so the loss is log 2 at any smoothing.
    # Logits (log 3, 0): p = (3/4, 1/4); with ε=0.2 the target is (0.9, 0.1).
    logits = np.array([[np.log(3.0), 0.0]], np.float32)
    loss, _ = jax.jit(lambda o, b: losses.softmax_xent(o, b, {"label_smoothing": 0.2}))(
        {"logits": logits}, {"label": np.array([0])}
    )
    np.testing.assert_allclose(loss, -(0.9 * np.log(0.75) + 0.1 * np.log(0.25)), rtol=RTOL)


def test_softmax_xent_target_key_and_bf16_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=8)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    loss, metrics = jax.jit(lambda o, b: losses.softmax_xent(o, b, {"target": "answer"}))(
        {"logits": bf16}, {"answer": labels}
    )
    assert loss.dtype == jnp.float32 and metrics["accuracy"].dtype == jnp.float32
    ref = np.asarray(bf16.astype(jnp.float32), np.float64)
    expected = -_log_softmax(ref)[np.arange(8), labels].mean()
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# sigmoid_xent.


def _sigmoid_xent_ref(logits: np.ndarray, targets: np.ndarray) -> float:
    x = logits.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())


def test_sigmoid_xent_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(12, 6)).astype(np.float32)
    targets = rng.uniform(size=(12, 6)) < 0.3
    for t in (targets, targets.astype(np.float32)):
        loss, metrics = jax.jit(lambda o, b: losses.sigmoid_xent(o, b, {}))(
            {"logits": logits}, {"label": t}
        )
        np.testing.assert_allclose(loss, _sigmoid_xent_ref(logits, targets), rtol=RTOL, atol=ATOL)
        assert metrics == {}


def test_sigmoid_xent_integer_labels_are_one_hot():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(10, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=10).astype(np.int32)
    loss, _ = jax.jit(lambda o, b: losses.sigmoid_xent(o, b, {}))(
        {"logits": logits}, {"label": labels}
    )
    np.testing.assert_allclose(loss, _sigmoid_xent_ref(logits, np.eye(4)[labels]), rtol=RTOL)


# --------------------------------------------------------------------------------------------
# mse.


@pytest.mark.parametrize("shape", [(9,), (9, 3), (9, 1)])
def test_mse_matches_numpy(shape):
    rng = np.random.default_rng(5)
    preds = rng.normal(size=shape).astype(np.float32)
    targets = rng.normal(size=shape[:1] if shape == (9, 1) else shape).astype(np.float32)
    loss, metrics = jax.jit(lambda o, b: losses.mse(o, b, {"target": "y"}))(
        {"predictions": preds}, {"y": targets}
    )
    err = preds.reshape(9, -1).astype(np.float64) - targets.reshape(9, -1)
    np.testing.assert_allclose(loss, (err**2).mean(-1).mean(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["mae"], np.abs(err).mean(-1).mean(), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# infonce.


def test_infonce_hand_computed_3x3():
    # img = e1, e2, e3 and txt rows chosen so that img @ txt.T is exactly
    #   [[1, 0, 0], [0, .6, .8], [0, .8, .6]]   (txt = [[1,0,0],[0,.6,.8],[0,.8,.6]], symmetric).
    # With logit_scale = log 2 the logits are twice that. Row losses:
    #   row 0: -(2 - log(e^2 + 2)),  row 1: -(1.2 - log(1 + e^1.2 + e^1.6)),
    #   row 2: -(1.2 - log(1 + e^1.6 + e^1.2));  the matrix is symmetric, so t2i = i2t.
    img = np.eye(3, dtype=np.float32)
    txt = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]], np.float32)
    rows = [
        -(2.0 - np.log(np.exp(2.0) + 2.0)),
        -(1.2 - np.log(1.0 + np.exp(1.2) + np.exp(1.6))),
        -(1.2 - np.log(1.0 + np.exp(1.6) + np.exp(1.2))),
    ]
    outputs = {"image_embeds": img, "text_embeds": txt, "logit_scale": np.float32(np.log(2.0))}
    loss, metrics = jax.jit(lambda o: losses.infonce(o, {}, {}))(outputs)
    np.testing.assert_allclose(loss, np.mean(rows), rtol=RTOL)
    # Rows 1 and 2 prefer each other's text (0.8 > 0.6), so only pair 0 is retrieved.
    np.testing.assert_allclose(metrics["i2t_accuracy"], 1 / 3, rtol=RTOL)
    np.testing.assert_allclose(metrics["t2i_accuracy"], 1 / 3, rtol=RTOL)
    np.testing.assert_allclose(metrics["temperature"], 2.0, rtol=RTOL)


def test_infonce_matches_numpy_and_is_symmetric():
    rng = np.random.default_rng(6)
    img, txt = _normed(rng, 8, 16), _normed(rng, 8, 16)
    scale = np.float32(np.log(10.0))
    fn = jax.jit(lambda o: losses.infonce(o, {}, {}))
    loss, metrics = fn({"image_embeds": img, "text_embeds": txt, "logit_scale": scale})
    np.testing.assert_allclose(loss, _infonce_ref(img, txt, scale), rtol=RTOL, atol=ATOL)
    swapped, swapped_metrics = fn({"image_embeds": txt, "text_embeds": img, "logit_scale": scale})
    np.testing.assert_allclose(swapped, loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(swapped_metrics["i2t_accuracy"], metrics["t2i_accuracy"])
    np.testing.assert_allclose(swapped_metrics["t2i_accuracy"], metrics["i2t_accuracy"])
    # Matching pairs everywhere: both directions retrieve every pair.
    _, perfect = fn({"image_embeds": img, "text_embeds": img, "logit_scale": scale})
    assert perfect["i2t_accuracy"] == 1.0 and perfect["t2i_accuracy"] == 1.0


def test_infonce_clamps_the_multiplier_at_100():
    rng = np.random.default_rng(7)
    img, txt = _normed(rng, 4, 8), _normed(rng, 4, 8)
    out = {"image_embeds": img, "text_embeds": txt, "logit_scale": np.float32(np.log(1000.0))}
    loss, metrics = jax.jit(lambda o: losses.infonce(o, {}, {}))(out)
    np.testing.assert_allclose(metrics["temperature"], 100.0, rtol=RTOL)
    np.testing.assert_allclose(loss, _infonce_ref(img, txt, np.log(1000.0)), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Shared properties: padding changes nothing, gradients are finite under jit.


def _cases(rng: np.random.Generator, b: int) -> list[tuple[str, dict, dict, dict]]:
    return [
        (
            "softmax_xent",
            {"logits": rng.normal(size=(b, 5)).astype(np.float32)},
            {"label": rng.integers(0, 5, size=b).astype(np.int32)},
            {"label_smoothing": 0.1},
        ),
        (
            "sigmoid_xent",
            {"logits": rng.normal(size=(b, 4)).astype(np.float32)},
            {"label": (rng.uniform(size=(b, 4)) < 0.5).astype(np.float32)},
            {},
        ),
        (
            "mse",
            {"predictions": rng.normal(size=(b, 3)).astype(np.float32)},
            {"label": rng.normal(size=(b, 3)).astype(np.float32)},
            {},
        ),
        (
            "infonce",
            {
                "image_embeds": _normed(rng, b, 8),
                "text_embeds": _normed(rng, b, 8),
                "logit_scale": np.float32(np.log(1 / 0.07)),
            },
            {"label": rng.integers(0, 5, size=b).astype(np.int32)},  # Unused; any batch key.
            {},
        ),
    ]


@pytest.mark.parametrize("index", range(4))
def test_padding_changes_nothing(index):
    rng = np.random.default_rng(8 + index)
    b, extra = 6, 3
    name, outputs, batch, cfg = _cases(rng, b)[index]
    fn = jax.jit(lambda o, bt: losses.get_loss(name)(o, bt, cfg))
    loss, metrics = fn(outputs, batch)
    padded_batch = _pad(batch, rng, extra)
    padded_batch["valid"] = np.concatenate([np.ones(b), np.zeros(extra)]).astype(np.float32)
    padded_loss, padded_metrics = fn(_pad(outputs, rng, extra), padded_batch)
    np.testing.assert_allclose(padded_loss, loss, rtol=RTOL, atol=ATOL)
    assert padded_metrics.keys() == metrics.keys()
    for k in metrics:
        np.testing.assert_allclose(padded_metrics[k], metrics[k], rtol=RTOL, atol=ATOL)
    # An explicit all-ones mask is the same as no mask.
    ones_loss, _ = fn(outputs, {**batch, "valid": np.ones(b, np.float32)})
    np.testing.assert_allclose(ones_loss, loss, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("index", range(4))
def test_gradients_are_finite_with_padding(index):
    rng = np.random.default_rng(20 + index)
    name, outputs, batch, cfg = _cases(rng, 5)[index]
    fn = losses.get_loss(name)
    for valid in ([1, 1, 0, 1, 0], [0, 0, 0, 0, 0]):
        bt = {**batch, "valid": np.asarray(valid, np.float32)}
        grads = jax.jit(jax.grad(lambda o, bt=bt: fn(o, bt, cfg)[0]))(outputs)
        for g in jax.tree.leaves(grads):
            assert np.all(np.isfinite(g)), (name, valid)
        if sum(valid):
            # Padded examples receive exactly zero gradient; real ones do not.
            mask = np.asarray(valid) == 1
            for g in jax.tree.leaves(grads):
                if np.ndim(g):
                    assert np.all(np.asarray(g)[~mask] == 0), name
                    assert np.any(np.asarray(g)[mask] != 0), name
