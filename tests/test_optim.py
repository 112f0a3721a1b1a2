"""The config-built optimizer against hand-computed numpy updates, freezing and config errors."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax.models.paths import path_str
from mmjax.optim import optimizers


def _cfg(**kw) -> ml_collections.ConfigDict:
    base = {
        "name": "adamw",
        "lr": 1e-2,
        "warmup_steps": 0,
        "decay": "constant",
        "end_lr_fraction": 0.0,
        "weight_decay": 0.0,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "momentum": 0.0,
        "nesterov": False,
        "clip_norm": 0.0,
        "freeze": "",
    }
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _params(rng: np.random.Generator) -> dict:
    def leaf(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "image": {
            "encoder": {"layer_0": {"attn": {"query": {"kernel": leaf(4, 3), "bias": leaf(3)}}}},
            "norm": {"scale": leaf(3)},
        },
        "text": {"embed": {"embedding": leaf(5, 3)}, "dense": {"kernel": leaf(3, 3)}},
        "heads": {"cls": {"kernel": leaf(3, 2), "bias": leaf(2)}},
    }


def _grads(rng: np.random.Generator, params: dict) -> dict:
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)


def _step(tx: optax.GradientTransformation):
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


# --------------------------------------------------------------------------------------------
# Schedules.


def test_schedules_warmup_peak_and_end():
    lr, warmup, total, end = 0.4, 10, 110, 0.1
    for decay in ("cosine", "linear", "constant"):
        sched = optimizers.make_schedule(
            _cfg(lr=lr, warmup_steps=warmup, decay=decay, end_lr_fraction=end), total
        )
        values = {s: float(sched(s)) for s in (0, 5, 10, 60, 110, 200)}
        assert values[0] == 0.0
        np.testing.assert_allclose(values[5], lr / 2, rtol=1e-6)
        np.testing.assert_allclose(values[10], lr, rtol=1e-6)
        if decay == "constant":
            expected_mid, expected_end = lr, lr
        else:
            expected_mid = (lr + lr * end) / 2  # Halfway through the decay, both give the midpoint.
            expected_end = lr * end
        np.testing.assert_allclose(values[60], expected_mid, rtol=1e-6)
        np.testing.assert_allclose(values[110], expected_end, rtol=1e-6)
        np.testing.assert_allclose(values[200], expected_end, rtol=1e-6)  # Stays at the end.
    # Quarter of the way, where cosine and linear differ.
    cos = optimizers.make_schedule(_cfg(lr=lr, warmup_steps=warmup, decay="cosine"), total)
    lin = optimizers.make_schedule(_cfg(lr=lr, warmup_steps=warmup, decay="linear"), total)
    np.testing.assert_allclose(cos(35), lr * 0.5 * (1 + math.cos(math.pi / 4)), rtol=1e-6)
    np.testing.assert_allclose(lin(35), lr * 0.75, rtol=1e-6)
    # Without warmup the first step already uses the peak rate; the schedule also works in jit.
    no_warm = optimizers.make_schedule(_cfg(lr=lr, decay="cosine"), total)
    np.testing.assert_allclose(jax.jit(no_warm)(jnp.int32(0)), lr, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Updates against numpy.


def test_adamw_matches_numpy_with_decay_only_on_matrices():
    rng = np.random.default_rng(0)
    params = _params(rng)
    lr, b1, b2, eps, wd = 3e-2, 0.8, 0.95, 1e-6, 0.1
    cfg = _cfg(name="adamw", lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
    tx = optimizers.make_optimizer(cfg, params, total_steps=100)
    state = tx.init(params)
    step = _step(tx)

    ref = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    m = jax.tree.map(np.zeros_like, ref)
    v = jax.tree.map(np.zeros_like, ref)
    new = params
    for t in (1, 2):
        grads = _grads(rng, params)
        new, state, _ = step(new, state, grads)
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_**2, v, g)

        def update(p, m_, v_, t=t):
            adam = (m_ / (1 - b1**t)) / (np.sqrt(v_ / (1 - b2**t)) + eps)
            decay = wd * p if p.ndim >= 2 else 0.0
            return p - lr * (adam + decay)

        ref = jax.tree.map(update, ref, m, v)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new, ref)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_numpy(nesterov):
    rng = np.random.default_rng(1)
    params = _params(rng)
    lr, mu, wd = 0.1, 0.9, 0.01
    cfg = _cfg(name="sgd", lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    tx = optimizers.make_optimizer(cfg, params, total_steps=100)
    state = tx.init(params)
    step = _step(tx)
    ref = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    trace = jax.tree.map(np.zeros_like, ref)
    new = params
    for _ in range(3):
        grads = _grads(rng, params)
        new, state, _ = step(new, state, grads)
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), grads)
        trace = jax.tree.map(lambda t_, g_: g_ + mu * t_, trace, g)
        direction = jax.tree.map(lambda t_, g_: g_ + mu * t_, trace, g) if nesterov else trace
        ref = jax.tree.map(
            lambda p, d: p - lr * (d + (wd * p if p.ndim >= 2 else 0.0)), ref, direction
        )
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new, ref)


def test_clipping_bounds_the_global_norm_of_the_update():
    rng = np.random.default_rng(2)
    params = _params(rng)
    tx = optimizers.make_optimizer(_cfg(name="sgd", lr=1.0, clip_norm=0.5), params, total_steps=10)
    step = _step(tx)
    big = jax.tree.map(lambda g: 10 * np.asarray(g), _grads(rng, params))
    big_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in jax.tree.leaves(big)))
    assert big_norm > 0.5
    _, _, updates = step(params, tx.init(params), big)
    update_norm = np.sqrt(
        sum(np.sum(np.asarray(u, np.float64) ** 2) for u in jax.tree.leaves(updates))
    )
    np.testing.assert_allclose(update_norm, 0.5, rtol=1e-5)
    # Direction is kept: the update is the gradient rescaled.
    jax.tree.map(
        lambda u, g: np.testing.assert_allclose(u, -0.5 / big_norm * g, rtol=1e-5, atol=1e-7),
        updates,
        big,
    )
    # A gradient already inside the ball passes unchanged.
    small = jax.tree.map(lambda g: (g * (0.1 / big_norm)).astype(np.float32), big)
    _, _, updates = step(params, tx.init(params), small)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6), updates, small)


# --------------------------------------------------------------------------------------------
# Freezing and masks.


def test_frozen_tower_stays_bit_identical_while_others_train():
    rng = np.random.default_rng(3)
    params = _params(rng)
    cfg = _cfg(name="adamw", lr=1e-2, weight_decay=0.1, clip_norm=1.0, freeze="^image/")
    tx = optimizers.make_optimizer(cfg, params, total_steps=20)
    state = tx.init(params)
    # Frozen leaves carry no optimizer state: only the trainable leaves have Adam moments.
    n_state = sum(x.size for x in jax.tree.leaves(state) if np.ndim(x))
    n_trainable = sum(x.size for k, v in params.items() if k != "image" for x in jax.tree.leaves(v))
    assert n_state == 2 * n_trainable
    step = _step(tx)
    new = params
    for _ in range(4):
        new, state, _ = step(new, state, _grads(rng, params))
    for a, b in zip(jax.tree.leaves(params["image"]), jax.tree.leaves(new["image"]), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    for key in ("text", "heads"):
        for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(new[key]), strict=True):
            assert np.all(np.asarray(a) != np.asarray(b))


def test_path_str_and_masks():
    params = _params(np.random.default_rng(4))
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    assert "image/encoder/layer_0/attn/query/kernel" in paths
    assert (
        path_str(jax.tree_util.tree_leaves_with_path({"a": [0, {"b": 1}]})[1][0]) == "a/1/b"
    )

    mask = optimizers.trainable_mask(params, "attn/query|^heads/")
    assert mask["image"]["encoder"]["layer_0"]["attn"]["query"] == {"kernel": False, "bias": False}
    assert mask["heads"]["cls"] == {"kernel": False, "bias": False}
    assert mask["image"]["norm"]["scale"] and mask["text"]["dense"]["kernel"]
    assert all(jax.tree.leaves(optimizers.trainable_mask(params, "")))

    dmask = optimizers.decay_mask(params)
    assert dmask["text"]["embed"]["embedding"] and dmask["heads"]["cls"]["kernel"]
    assert not dmask["heads"]["cls"]["bias"] and not dmask["image"]["norm"]["scale"]
    # An attention projection's bias is [heads, head_dim]: still a bias.
    qkv = {"attn": {"query": {"kernel": np.ones((8, 2, 4)), "bias": np.ones((2, 4))}}}
    assert optimizers.decay_mask(qkv) == {"attn": {"query": {"kernel": True, "bias": False}}}


# --------------------------------------------------------------------------------------------
# Config errors.


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"name": "adamx"}, r"optimizer\.name.*'adamx'"),
        ({"decay": "exponential"}, r"optimizer\.decay.*'exponential'"),
        ({"freeze": "^imgae/"}, r"optimizer\.freeze.*'\^imgae/'"),
        ({"freeze": "image/("}, r"optimizer\.freeze"),
        ({"freeze": "."}, r"optimizer\.freeze.*every parameter"),
        ({"warmup_steps": 50}, r"optimizer\.warmup_steps"),
        ({"name": "adam", "weight_decay": 0.1}, r"optimizer\.weight_decay"),
        ({"clip_norm": -1.0}, r"optimizer\.clip_norm"),
    ],
)
def test_config_errors_name_the_key(overrides, match):
    params = _params(np.random.default_rng(5))
    with pytest.raises(ValueError, match=match):
        optimizers.make_optimizer(_cfg(**overrides), params, total_steps=10)


def test_bf16_first_moment_when_asked():
    params = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(4, 3)), jnp.float32)}
    cfg = ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3, "mu_dtype": "bfloat16"})
    state = optimizers.make_optimizer(cfg, params, total_steps=10).init(params)
    is_adam = lambda s: hasattr(s, "mu")
    adam = next(s for s in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(s))
    assert adam.mu["w"].dtype == jnp.bfloat16 and adam.nu["w"].dtype == jnp.float32
    cfg.mu_dtype = "float8"
    with pytest.raises(ValueError, match=r"optimizer\.mu_dtype"):
        optimizers.make_optimizer(cfg, params, total_steps=10)
