"""Integrated gradients (Sundararajan et al. 2017) of a batched scalar function.

``IG(x) = (x - x') ⊙ ∫₀¹ ∇f(x' + a(x - x')) da``, the integral by a fixed quadrature: Gauss-
Legendre nodes on [0, 1] (Captum's default ``gausslegendre``) or the trapezoid rule
(``riemann_trapezoid``), with Captum's node and weight placement, so both give the numbers Captum
gives. By completeness the attributions sum to ``f(x) - f(x')`` as the quadrature converges.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
RULES = ("gausslegendre", "riemann_trapezoid")


def nodes(steps: int, rule: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of ``steps`` quadrature nodes on [0, 1], as Captum places them."""
    if steps < 2:
        raise ValueError(f"integrated gradients needs steps >= 2, got {steps}")
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (x + 1), 0.5 * w
    if rule == "riemann_trapezoid":
        w = np.full(steps, 1.0 / steps)  # Captum's weights: 1/n, halved at both ends
        w[0] /= 2
        w[-1] /= 2
        return np.linspace(0.0, 1.0, steps), w
    raise ValueError(f"unknown integration rule {rule!r}; known: {RULES}")


def integrated_gradients(fn: Callable[[Array], Array], x: Array, baseline: Array | None = None,
                         *, steps: int = 32, rule: str = "gausslegendre") -> Array:
    """Attributions of ``fn`` (input [B, ...] → one scalar per example [B]) at ``x``, same shape
    as ``x``; ``baseline`` defaults to zeros. The nodes run one after another (``lax.scan``), so
    memory is one batch's forward and backward pass."""
    x = jnp.asarray(x, jnp.float32)
    baseline = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape)
    alphas, weights = nodes(steps, rule)
    grad = jax.grad(lambda z: fn(z).sum())
    diff = x - baseline

    def body(total: Array, aw: tuple[Array, Array]) -> tuple[Array, None]:
        a, w = aw
        return total + w * grad(baseline + a * diff), None

    total, _ = jax.lax.scan(body, jnp.zeros_like(x),
                            (jnp.asarray(alphas, jnp.float32), jnp.asarray(weights, jnp.float32)))
    return diff * total
