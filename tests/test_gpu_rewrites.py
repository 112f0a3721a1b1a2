"""``model.gpu_rewrites``: every rewrite computes what the plain path computes.

The rewrites (``mmjax/models/gpu_rewrites.py``: GELU with a hand-written backward pass, the
position-embedding gradient and the masked mean as matmuls, ``HeadsDense``) exist only to change
how XLA lays out the step on a GPU, so each is checked against the plain path it replaces
(``gpu_rewrites=False``) and against an independent float64 reference (numpy or a hand-derived
formula): forward values and gradients, float32 (and bfloat16 where the rewrite treats 16-bit
inputs specially), fresh random inputs, explicit tolerances. The last test runs a whole model
both ways (every rewrite on its real call site) against the same model in float64.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from jax.ad_checkpoint import print_saved_residuals

from mmjax.models import gpu_rewrites, layers
from mmjax.models.multimodal import build_model

PLAIN = layers.Options()
REWRITES = layers.Options(gpu_rewrites=True)


# ------------------------------------------------------------------------------------- GELU


def _gelu_erf64(x: np.ndarray) -> np.ndarray:
    """x·Φ(x) in float64, Φ through math.erf (independent of jax)."""
    erf = np.vectorize(math.erf)
    return x * 0.5 * (1.0 + erf(x / math.sqrt(2.0)))


def _gelu_erf64_slope(x: np.ndarray) -> np.ndarray:
    """d/dx x·Φ(x) = Φ(x) + x·φ(x)."""
    erf = np.vectorize(math.erf)
    return 0.5 * (1.0 + erf(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _gelu_tanh64(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_tanh64_slope(x: np.ndarray) -> np.ndarray:
    """d/dx ½x(1 + tanh u) with u = c(x + 0.044715x³), c = √(2/π):
    ½(1 + tanh u) + ½x(1 - tanh²u)·c(1 + 3·0.044715x²)."""
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


GELUS = [("gelu", _gelu_erf64, _gelu_erf64_slope), ("gelu_tanh", _gelu_tanh64, _gelu_tanh64_slope)]


@pytest.mark.parametrize(("name", "ref", "ref_slope"), GELUS)
def test_gelu_rewrite_matches_plain_and_the_float64_formula(name, ref, ref_slope):
    """Value and gradient (a random cotangent) of the rewrite equal the plain activation's: in
    float64 to rounding, in float32 to float32 rounding of the float64 formula; in bfloat16 the
    gradient stays bfloat16 and within bfloat16 rounding of the float32 one."""
    rewrite, plain = layers.get_activation(name, REWRITES), layers.get_activation(name, PLAIN)
    rng = np.random.default_rng(17)
    x64 = 3.0 * rng.standard_normal((64, 33))
    w64 = rng.standard_normal((64, 33))
    want, want_grad = ref(x64), ref_slope(x64) * w64
    with jax.enable_x64(True):
        x, w = jnp.asarray(x64), jnp.asarray(w64)
        grad = lambda f: jax.grad(lambda x: jnp.vdot(f(x), w))(x)
        for f in (rewrite, plain):
            np.testing.assert_allclose(f(x), want, rtol=1e-14, atol=1e-14)
            # Near the slope's zero (x ≈ -0.75) the two formulas cancel differently (~1e-14).
            np.testing.assert_allclose(grad(f), want_grad, rtol=1e-12, atol=1e-13)
    x32, w32 = jnp.asarray(x64, jnp.float32), jnp.asarray(w64, jnp.float32)
    outs = jax.jit(lambda x, w: [(f(x), jax.grad(lambda x, f=f: jnp.vdot(f(x), w))(x))
                                 for f in (rewrite, plain)])(x32, w32)
    (y_r, g_r), (y_p, g_p) = outs
    np.testing.assert_array_equal(y_r, y_p)  # the forward is the same function
    want32 = ref(np.asarray(x32, np.float64))
    grad32 = ref_slope(np.asarray(x32, np.float64)) * np.asarray(w32, np.float64)
    for y, g in ((y_r, g_r), (y_p, g_p)):
        np.testing.assert_allclose(y, want32, rtol=1e-6, atol=1e-6)
        # In float32 the tanh form's slope cancels in the negative tail (1 - tanh² of a tanh
        # rounded near -1): ~4e-6 absolute per unit of cotangent, on both paths alike.
        np.testing.assert_allclose(g, grad32, rtol=1e-5, atol=3e-5)
    err_r, err_p = (np.abs(np.asarray(g, np.float64) - grad32).max() for g in (g_r, g_p))
    assert err_r <= 2 * err_p + 1e-6, (err_r, err_p)  # as accurate as autodiff of the plain one

    xb = jnp.asarray(rng.standard_normal((4, 8)), jnp.bfloat16)
    gb = jax.grad(lambda x: rewrite(x).astype(jnp.float32).sum())(xb)
    assert gb.dtype == jnp.bfloat16
    slope = ref_slope(np.asarray(xb.astype(jnp.float32), np.float64))
    np.testing.assert_allclose(np.asarray(gb, np.float64), slope, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_gelu_rewrite_saves_only_its_input(capsys, name):
    """What the rewrite is for: its backward pass keeps the activation's input alone, where
    autodiff of the plain activation keeps three or more tensors of that shape."""
    xb = jnp.asarray(np.random.default_rng(3).standard_normal((4, 8)), jnp.bfloat16)

    def saved(f) -> list[str]:
        capsys.readouterr()
        print_saved_residuals(lambda x: f(x).astype(jnp.float32).sum(), xb)
        return [ln for ln in capsys.readouterr().out.splitlines() if "[4,8]" in ln]

    assert saved(layers.get_activation(name, REWRITES)) == ["bf16[4,8] from the argument x"]
    assert len(saved(layers.get_activation(name, PLAIN))) >= 3


def test_activations_without_a_rewrite_are_the_plain_ones():
    for name in ("quick_gelu", "relu", "silu"):
        assert layers.get_activation(name, REWRITES) is layers.get_activation(name, PLAIN)
    with pytest.raises(ValueError, match="'swish'"):
        layers.get_activation("swish", REWRITES)


# ---------------------------------------------------------------------------- add_positions


def test_add_positions_rewrite_matches_plain_and_numpy():
    """x [B, T, D] + pos [T, D]: the value, dL/dx = w and dL/dpos = Σ_b w (w a random cotangent),
    in float64 and float32, and with a bfloat16 compute dtype (float32 x and pos: the position
    gradient is the float32 sum of the bfloat16 cotangent)."""
    rng = np.random.default_rng(29)
    x64, pos64 = rng.standard_normal((6, 7, 5)), rng.standard_normal((7, 5))
    w64 = rng.standard_normal((6, 7, 5))

    def value_and_grads(opts, x, pos, w):
        f = lambda x, p: jnp.vdot(layers.add_positions(x, p, opts).astype(w.dtype), w)
        return layers.add_positions(x, pos, opts), jax.grad(f, (0, 1))(x, pos)

    with jax.enable_x64(True):
        args = (jnp.asarray(x64), jnp.asarray(pos64), jnp.asarray(w64))
        for gpu in (True, False):
            y, (gx, gp) = value_and_grads(layers.Options(jnp.float64, gpu_rewrites=gpu), *args)
            assert y.dtype == gx.dtype == gp.dtype == jnp.float64 and gp.shape == (7, 5)
            np.testing.assert_array_equal(y, x64 + pos64)
            np.testing.assert_array_equal(gx, w64)
            np.testing.assert_allclose(gp, w64.sum(0), rtol=1e-13, atol=1e-13)

    x32, pos32, w32 = (jnp.asarray(a, jnp.float32) for a in (x64, pos64, w64))
    f32 = jax.jit(lambda *a: [value_and_grads(layers.Options(gpu_rewrites=g), *a)
                              for g in (True, False)])(x32, pos32, w32)
    for y, (gx, gp) in f32:
        np.testing.assert_array_equal(y, np.asarray(x32) + np.asarray(pos32))
        np.testing.assert_array_equal(gx, w32)
        np.testing.assert_allclose(gp, np.asarray(w32, np.float64).sum(0), rtol=1e-6, atol=1e-6)

    wb = jnp.asarray(w64, jnp.bfloat16)
    bf16 = jax.jit(lambda *a: [value_and_grads(layers.Options(jnp.bfloat16, gpu_rewrites=g), *a)
                               for g in (True, False)])(x32, pos32, wb)
    want_gp = np.asarray(wb.astype(jnp.float32), np.float64).sum(0)
    for y, (gx, gp) in bf16:
        assert y.dtype == jnp.bfloat16 and gx.dtype == gp.dtype == jnp.float32
        np.testing.assert_array_equal(y, (x32 + pos32).astype(jnp.bfloat16))
        np.testing.assert_array_equal(gx, wb.astype(jnp.float32))
        np.testing.assert_allclose(gp, want_gp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opts", [PLAIN, REWRITES])
def test_add_positions_rejects_positions_of_another_shape(opts):
    x = jnp.ones((6, 7, 5), jnp.float32)
    for pos in (jnp.ones((7, 4)), jnp.ones((1, 7, 5))):
        with pytest.raises(ValueError, match=r"positions \(.*\) do not fit tokens \(6, 7, 5\)"):
            layers.add_positions(x, pos, opts)


# ------------------------------------------------------------------------------ masked_mean


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_masked_mean_rewrite_matches_plain_and_numpy(dtype):
    """Both forms against float64 numpy: the mean over the tokens where the mask is 1, zeros for
    a row without any, and the gradient mask / count broadcast over D (a random cotangent)."""
    rng = np.random.default_rng(31)
    x = rng.normal(size=(4, 7, 5)).astype(np.float32)
    mask = (rng.random((4, 7)) < 0.6).astype(np.int32)
    mask[0] = 0
    mask[1] = 0
    mask[1, 3] = 1
    xd = jnp.asarray(x, dtype)
    x64 = np.asarray(xd.astype(jnp.float32), np.float64)  # the values the function sees
    count = np.maximum(mask.sum(1, keepdims=True), 1)
    expected = (x64 * mask[..., None]).sum(1) / count
    w = rng.normal(size=(4, 5))
    expected_grad = mask[..., None] / count[..., None] * w[:, None, :]
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=8e-3, atol=8e-3)

    def run(x, m):
        out = []
        for opts in (REWRITES, PLAIN):
            f = lambda v, opts=opts: layers.masked_mean(v, m, opts)
            g = jax.grad(lambda v, f=f: (f(v).astype(jnp.float32) * w).sum())(x)
            out.append((f(x), g))
        return out

    results = jax.jit(run)(xd, jnp.asarray(mask))
    for got, grad in results:
        assert got.dtype == xd.dtype and got.shape == (4, 5) and grad.dtype == xd.dtype
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, **tol)
        np.testing.assert_array_equal(np.asarray(got[0], np.float64), 0.0)
        np.testing.assert_allclose(np.asarray(grad, np.float64), expected_grad, **tol)
    (a, ga), (b, gb) = results
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **tol)
    np.testing.assert_allclose(np.asarray(ga, np.float64), np.asarray(gb, np.float64), **tol)
    for opts in (REWRITES, PLAIN):  # no mask: the plain mean
        np.testing.assert_allclose(np.asarray(layers.masked_mean(xd, None, opts), np.float64),
                                   x64.mean(1), **tol)


# ------------------------------------------------------------------------------- HeadsDense


def test_heads_dense_is_dense_general_with_a_flat_bias():
    """HeadsDense draws DenseGeneral((heads, head_dim))'s params for the same key, and computes
    its function: against DenseGeneral and a float64 einsum, with random (non-zero) params."""

    class Reference(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((4, 8), name="query")(x)

    class Rewrite(nn.Module):
        @nn.compact
        def __call__(self, x):
            return gpu_rewrites.HeadsDense(4, 8, name="query")(x)

    rng = np.random.default_rng(23)
    x = jnp.asarray(rng.standard_normal((3, 5, 32)), jnp.float32)
    want, got = Reference().init(jax.random.key(4), x), Rewrite().init(jax.random.key(4), x)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), want)
    y, y_ref = jax.jit(lambda p, x: (Rewrite().apply(p, x), Reference().apply(p, x)))(params, x)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["params"]["query"]
    y64 = np.einsum("btd,dnh->btnh", np.asarray(x, np.float64), q["kernel"]) + q["bias"]
    assert y.shape == (3, 5, 4, 8)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, y64, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- the model, both ways

# Every rewrite on its call site: HeadsDense in every attention, GELU (erf in the text tower,
# fusion and decoder; tanh in the ViT), add_positions in the text tower and the caption decoder,
# masked_mean in the text tower's "mean" pool and the co-attention fusion's pooling.
MODEL = {
    "encoders": {
        "image": {"kind": "vit", "variant": "mu/4", "width": 16, "depth": 1, "num_heads": 2,
                  "mlp_dim": 24, "activation": "gelu_tanh"},
        "text": {"kind": "text", "vocab_size": 23, "width": 16, "depth": 1, "num_heads": 2,
                 "mlp_dim": 24, "max_len": 8, "pool": "mean"},
    },
    "fusion": {"kind": "co_attention", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 24},
    "heads": {"cls": {"kind": "classification", "num_classes": 3},
              "clip": {"kind": "contrastive", "embed_dim": 8},
              "cap": {"kind": "caption", "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 24,
                      "max_len": 8}},
}


def _batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lengths = np.array([8, 5, 2])
    mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
    return {"image": rng.standard_normal((3, 8, 8, 3)).astype(np.float32),
            "text": {"ids": (rng.integers(1, 23, (3, 8)) * mask).astype(np.int32), "mask": mask}}


def _random_params(model, batch, seed: int) -> dict:
    """Params shaped like ``model.init``'s, fan-in-scaled random values (no zero classifier)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "scale":
            v = 1 + 0.1 * rng.normal(size=s.shape)
        elif len(s.shape) >= 2:
            fan_in = s.shape[0] if path[-2] in ("query", "key", "value") else np.prod(s.shape[:-1])
            v = rng.normal(size=s.shape) / np.sqrt(fan_in)
        else:
            v = 0.1 * rng.normal(size=s.shape)
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def _objective(model, batch, weights):
    """A fixed random linear functional of every output, and the outputs."""
    def f(p):
        outs = model.apply({"params": p}, batch)
        leaves = jax.tree.leaves(outs)
        return sum(jnp.vdot(o, w.astype(o.dtype)) for o, w in zip(leaves, weights, strict=True))
    return f


@pytest.mark.slow
def test_model_with_rewrites_matches_plain_model_and_float64():
    """The same params through ``build_model`` with and without ``gpu_rewrites`` (float32): equal
    param trees, outputs and gradients of a random functional of all outputs; both as close to
    the plain model run in float64 (x64) as float32 rounding allows."""
    batch = _batch(1)
    rewrite = build_model({**MODEL, "gpu_rewrites": True})
    plain = build_model(MODEL)
    params = _random_params(plain, batch, seed=2)
    assert jax.tree.structure(params) == jax.tree.structure(
        _random_params(rewrite, batch, seed=2))
    out_shapes = jax.eval_shape(lambda: plain.apply({"params": params}, batch))
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal(o.shape) for o in jax.tree.leaves(out_shapes)]

    def both(p):
        return [(m.apply({"params": p}, batch), jax.grad(_objective(m, batch, weights))(p))
                for m in (rewrite, plain)]

    (out_r, g_r), (out_p, g_p) = jax.device_get(jax.jit(both)(params))
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
        b64 = {"image": batch["image"].astype(np.float64), "text": batch["text"]}
        m64 = plain.clone(opts=layers.Options(dtype=jnp.float64))
        out64, g64 = jax.device_get(jax.jit(lambda p: (
            m64.apply({"params": p}, b64), jax.grad(_objective(m64, b64, weights))(p)))(p64))
    assert {g.dtype for g in jax.tree.leaves(g64)} == {np.dtype(np.float64)}

    out_scale = max(np.abs(o).max() for o in jax.tree.leaves(out64))
    for o_r, o_p, o64 in zip(*(jax.tree.leaves(t) for t in (out_r, out_p, out64)), strict=True):
        tol = dict(rtol=1e-5, atol=1e-6 * out_scale)
        np.testing.assert_allclose(o_r, o_p, **tol)
        np.testing.assert_allclose(o_r, o64, **tol)
        np.testing.assert_allclose(o_p, o64, **tol)
    flat = {k: traverse_util.flatten_dict(t) for k, t in (("r", g_r), ("p", g_p), ("64", g64))}
    g_scale = max(np.abs(v).max() for v in flat["64"].values())
    for k, want in flat["64"].items():
        name = "/".join(k)
        # Relative to the leaf, floored at a millionth of the largest gradient (a key bias has a
        # true gradient of zero, where only rounding is left).
        tol = dict(rtol=1e-4, atol=max(1e-5 * np.abs(want).max(), 1e-6 * g_scale), err_msg=name)
        np.testing.assert_allclose(flat["r"][k], want, **tol)
        np.testing.assert_allclose(flat["p"][k], want, **tol)
        np.testing.assert_allclose(flat["r"][k], flat["p"][k], **tol)
    for part in ("image", "text", "fusion", "heads"):  # the gradient reaches every part
        assert max(np.abs(v).max() for k, v in flat["r"].items() if k[0] == part) > 0, part
