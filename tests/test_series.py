"""The time-series tower: patch embedding against numpy, padding invariance, errors."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mmjax.models.series import SeriesEncoder


def _series(seed: int, b: int = 3, t: int = 24, c: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, t, c)).astype(np.float32)


def test_patch_embedding_matches_numpy():
    """Depth 0: tokens = LayerNorm(patches @ W + b + positions), written out in numpy."""
    x = _series(0)
    tower = SeriesEncoder(width=8, depth=0, num_heads=2, patch_size=4, max_patches=10,
                          pos_embedding_std=0.5)
    params = tower.init(jax.random.PRNGKey(0), x)["params"]
    out = tower.apply({"params": params}, x)
    w, bias = np.asarray(params["embedding"]["kernel"]), np.asarray(params["embedding"]["bias"])
    pos = np.asarray(params["pos_embedding"])[0, :6]
    h = x.reshape(3, 6, 4 * 2) @ w + bias + pos
    ln = params["encoder"]["final_norm"]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    ref = (h - mu) / np.sqrt(var + 1e-6) * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
    np.testing.assert_allclose(np.asarray(out["tokens"]), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["pooled"]), ref.mean(1), rtol=1e-4, atol=1e-5)


def test_padded_series_equals_the_unpadded_one():
    """A series padded with noise beyond its mask pools to the unpadded series' feature."""
    tower = SeriesEncoder(width=16, depth=2, num_heads=2, patch_size=4, max_patches=8)
    short = _series(1, t=16)
    padded = np.concatenate([short, _series(2, t=8)], axis=1)
    mask = np.concatenate([np.ones((3, 16)), np.zeros((3, 8))], axis=1).astype(np.int32)
    params = tower.init(jax.random.PRNGKey(1), padded, mask)["params"]
    a = tower.apply({"params": params}, short)["pooled"]
    b = tower.apply({"params": params}, padded, mask)["pooled"]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    c = tower.apply({"params": params}, padded)["pooled"]  # unmasked: the noise counts
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


@pytest.mark.parametrize("shape, match", [
    ((2, 10, 3), "not a multiple of patch_size"),
    ((2, 48, 3), "more than max_patches"),
    ((2, 16), r"\[batch, time, channels\]"),
])
def test_bad_series_shapes(shape, match):
    tower = SeriesEncoder(width=8, depth=0, num_heads=2, patch_size=4, max_patches=8)
    with pytest.raises(ValueError, match=match):
        tower.init(jax.random.PRNGKey(0), np.ones(shape, np.float32))
