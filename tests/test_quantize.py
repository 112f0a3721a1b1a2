"""The int8 weight quantizer against a float64 numpy reference, on fresh random weights.

Each run draws new weights (the seed is in every failure message). The reference spells out, per
kind of leaf, the axes one scale covers; the checks are the definition (scale = max|W| / 127 per
output channel, q = round(W / scale)), the round-trip bound |W - q·scale| <= scale / 2, and what
that bound means for a layer's output.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmjax.inference import quantize

SEED = int(np.random.SeedSequence().entropy % 2**32)

# path, shape, the axes one scale covers (what the layer contracts; a table's row)
CASES = [
    ("heads/answer/out/kernel", (64, 9), (0,)),  # Dense [in, out]
    ("fusion/encoder/layer_0/attn/query/kernel", (64, 4, 16), (0,)),  # [D, H, hd]
    ("fusion/encoder/layer_0/attn/out/kernel", (4, 16, 64), (0, 1)),  # [H, hd, D]
    ("image/embedding/kernel", (8, 8, 3, 32), (0, 1, 2)),  # conv [kh, kw, c_in, c_out]
    ("text/token_embedding/embedding", (50, 32), (1,)),  # nn.Embed: one scale per row
    ("image/pos_embedding", (1, 16, 32), (2,)),  # one scale per position
    ("text/encoder/layers/mlp/fc1/kernel", (3, 32, 128), (1,)),  # scanned: per layer
    ("text/encoder/layers/attn/out/kernel", (3, 4, 8, 32), (1, 2)),
]
FLOAT = [  # stay float32, untouched
    ("heads/answer/out/bias", (9,)),
    ("text/embed_norm/scale", (32,)),
    ("text/encoder/layers/mlp/fc1/bias", (3, 128)),
    ("image/cls", (1, 1, 32)),
    ("heads/clip/logit_scale", ()),
]


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _get(tree: dict, path: str):
    for p in path.split("/"):
        tree = tree[p]
    return tree


@pytest.fixture
def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    flat = {}
    for path, shape, _ in CASES:
        # Heavy tails and a different size per channel, as trained weights have.
        w = rng.standard_t(4, size=shape) * rng.uniform(0.01, 2.0, size=shape[-1])
        flat[path] = w.astype(np.float32)
    flat["heads/answer/out/kernel"][:, 3] = 0.0  # an all-zero channel
    for path, shape in FLOAT:
        flat[path] = rng.normal(size=shape).astype(np.float32)
    return flat


def test_per_channel_int8_matches_a_float64_reference(weights):
    tree = quantize.quantize(_nest(weights))
    for path, shape, axes in CASES:
        w = weights[path].astype(np.float64)
        q = _get(tree, path)
        where = f"{path} (seed {SEED})"
        assert isinstance(q, quantize.QTensor), where
        assert q.values.dtype == np.int8 and q.values.shape == shape, where
        amax = np.abs(w).max(axis=axes, keepdims=True)
        ref_scale = np.where(amax > 0, amax / 127.0, 1.0)
        assert q.scale.dtype == np.float32 and q.scale.shape == ref_scale.shape, where
        np.testing.assert_allclose(q.scale, ref_scale, rtol=1e-7, err_msg=where)
        values = q.values.astype(np.float64)
        assert np.abs(values).max() <= 127, where
        # q is the nearest integer to W / scale (a float32-rounded scale moves ties at most 1)
        assert np.abs(values - np.rint(w / ref_scale)).max() <= 1, where
        error = np.abs(w - values * q.scale.astype(np.float64))
        assert (error <= q.scale.astype(np.float64) / 2 * (1 + 1e-6)).all(), where
        # Each channel's largest weight lands on ±127: the whole int8 range is used.
        hit = np.abs(values).max(axis=axes, keepdims=True)
        assert ((hit == 127) | (amax == 0)).all(), where
    zero = _get(tree, "heads/answer/out/kernel")
    assert not zero.values[:, 3].any() and zero.scale[0, 3] == 1.0
    for path, _ in FLOAT:
        assert _get(tree, path) is weights[path], path


def test_dequantized_layer_output_stays_within_the_bound(weights):
    """y = x W with W through int8: |y - ŷ| <= Σ_i |x_i| · scale_j / 2 for every output j."""
    rng = np.random.default_rng(SEED + 1)
    tree = quantize.quantize(_nest(weights))
    back = jax.tree.map(np.asarray, quantize.dequantize(tree))
    assert jax.tree.structure(back) == jax.tree.structure(_nest(weights))
    path = "text/encoder/layers/mlp/fc1/kernel"
    w, w_hat = weights[path].astype(np.float64), _get(back, path).astype(np.float64)
    assert _get(back, path).dtype == np.float32
    x = rng.normal(size=(16, w.shape[1]))
    scale = _get(tree, path).scale.astype(np.float64)  # [layers, 1, out]
    for layer in range(w.shape[0]):
        err = np.abs(x @ w[layer] - x @ w_hat[layer])
        bound = np.abs(x).sum(axis=1, keepdims=True) * scale[layer] / 2 + 1e-5
        assert (err <= bound).all(), f"layer {layer} (seed {SEED})"
    # and the error is a small fraction of the output (int8 keeps ~2 significant digits)
    rel = np.abs(x @ w[0] - x @ w_hat[0]).max() / np.abs(x @ w[0]).max()
    assert rel < 0.02, (rel, SEED)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="int4"):
        quantize.quantize({"w": {"kernel": np.ones((2, 2), np.float32)}}, "int4")
