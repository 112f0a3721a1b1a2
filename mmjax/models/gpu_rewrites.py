"""Opt-in GPU rewrites (``model.gpu_rewrites=True``): same math, a different compiled layout.

Each function here computes exactly what its plain counterpart in ``layers`` computes (the
tests compare them), but is written so that XLA's GPU compiler lays the step out differently.
Their effect is estimated from the step compiled for an H200 (scripts/gpu_hlo.py), not timed on
a GPU (docs/performance.md has the estimates and the script that measures them), so they are
off by default and the default path reads like the math:

- ``gelu`` / ``gelu_tanh``: a backward pass that keeps only the activation's input, instead of
  the intermediates autodiff saves; for the tanh form XLA can then fuse the activation into the
  preceding matmul's cuBLAS epilogue.
- ``HeadsDense``: the query/key/value projection as one 2-D matmul plus a vector bias, which XLA
  folds into the matmul (``nn.DenseGeneral`` adds the bias after reshaping to heads).
- ``add_positions``: the position-embedding gradient as a matmul with ones instead of a batch
  sum, which otherwise makes XLA store the text stream batch-minor.
- ``masked_mean``: the masked token sum as a batched matmul instead of a reduction, for the
  same reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))
_SQRT_2_OVER_PI = float(np.sqrt(2.0 / np.pi))


def _keeps_input(fn: Callable[[Array], Array],
                 slope: Callable[[Array], Array]) -> Callable[[Array], Array]:
    """``fn`` whose backward pass is ``g · slope(x)`` (in float32 at least), saving only x."""
    wrapped = jax.custom_vjp(fn)

    def bwd(x: Array, g: Array) -> tuple[Array]:
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        return ((g.astype(xf.dtype) * slope(xf)).astype(x.dtype),)

    wrapped.defvjp(lambda x: (wrapped(x), x), bwd)
    return wrapped


def _gelu_slope(x: Array) -> Array:
    """Φ(x) + x·φ(x), the exact GELU's derivative."""
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
    pdf = jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return cdf + x * pdf


def _gelu_tanh_slope(x: Array) -> Array:
    """d/dx of x·(1 + tanh u)/2 with u = c·(x + 0.044715·x³)."""
    x2 = x * x
    t = jnp.tanh(_SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x2))
    du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x2)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


gelu = _keeps_input(functools.partial(nn.gelu, approximate=False), _gelu_slope)
gelu_tanh = _keeps_input(functools.partial(nn.gelu, approximate=True), _gelu_tanh_slope)
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {"gelu": gelu, "gelu_tanh": gelu_tanh}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_positions(x: Array, pos: Array, dtype: Any) -> Array:
    """``(x + pos).astype(dtype)`` for x [B, T, D] and pos [T, D]; the gradient of ``pos`` is a
    matmul with ones (float32 accumulation) instead of a sum over the batch."""
    return (x + pos).astype(dtype)


def _add_positions_fwd(x: Array, pos: Array, dtype: Any) -> tuple[Array, tuple[Array, Array]]:
    return add_positions(x, pos, dtype), (jnp.ones((x.shape[0],), x.dtype), pos)


def _add_positions_bwd(dtype: Any, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    ones, pos = res
    exact = jnp.finfo(g.dtype).bits <= 16  # a 16-bit g times 1 is exact at any precision
    gpos = jnp.einsum("b,btd->td", ones.astype(g.dtype), g,
                      precision=None if exact else jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.promote_types(g.dtype, jnp.float32))
    return g.astype(ones.dtype), gpos.reshape(pos.shape).astype(pos.dtype)


add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)


def masked_mean(x: Array, mask: Array) -> Array:
    """``layers.masked_mean`` as a batched product of the rows ``[mask, 0]`` with x (a single
    row would be rewritten back into a reduction by XLA)."""
    m = mask.astype(x.dtype)
    rows = jnp.stack([m, jnp.zeros_like(m)], axis=1)
    exact = jnp.finfo(x.dtype).bits <= 16  # products with 0 and 1 are exact at any precision
    total = jnp.einsum("bkt,btd->bkd", rows, x,
                       precision=None if exact else jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))[:, 0]
    count = jnp.maximum(mask.astype(total.dtype).sum(axis=1, keepdims=True), 1)
    return (total / count).astype(x.dtype)


class HeadsDense(nn.Module):
    """``nn.DenseGeneral((heads, head_dim))``'s params and values (same initialisers), computed
    as one 2-D matmul plus a vector bias."""

    num_heads: int
    head_dim: int
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d, n = x.shape[-1], self.num_heads * self.head_dim
        shape = (d, self.num_heads, self.head_dim)
        kernel = self.param(  # drawn on the flat [D, heads*head_dim] shape, as DenseGeneral does
            "kernel", lambda rng, s, t=jnp.float32: nn.initializers.lecun_normal()(
                rng, (s[0], s[1] * s[2]), t).reshape(s), shape, jnp.float32)
        y = jnp.dot(x.astype(self.dtype), kernel.reshape(d, n).astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.num_heads, self.head_dim),
                              jnp.float32)
            y = y + bias.reshape(n).astype(self.dtype)
        return y.reshape(*x.shape[:-1], self.num_heads, self.head_dim)
