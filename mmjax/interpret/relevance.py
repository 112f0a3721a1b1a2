"""Attention relevance of every input token: Chefer et al. 2021 and attention rollout.

Chefer, Gur & Wolf (ICCV 2021), "Generic Attention-model Explainability for Interpreting Bi-Modal
and Encoder-Decoder Transformers": each attention map ``A`` is weighted by the gradient of the
target logit, ``Ā = mean_heads((∇A ⊙ A)⁺)``, and relevance matrices between every pair of token
sets start at the identity (within a modality) or zero (across) and are updated layer by layer:

- self-attention of stream ``s``: ``R_ss += Ā R_ss``, ``R_sq += Ā R_sq``;
- attention of ``s`` (queries) to ``q`` (keys): ``R_sq += R̂_ssᵀ Ā R̂_qq``, ``R_ss += Ā R_qs``,
  where ``R̂ = (R - I) / rowsum(R - I) + I`` (their residual normalisation).

Rollout (Abnar & Zuidema 2020) multiplies ``0.5·mean_heads(A) + 0.5·I`` (rows renormalised)
through a stream's self-attention; cross-attention adds the head-averaged map composed with the
keys' rollout, ``R_sq += Ā R_qq`` (the rollout paper has no cross-attention; this is the
natural composition). The relevance of an input token for the prediction is the pooled row of
the final matrices (the fusion's first token, or the mean over the pooled tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def head_mean(a: Array, g: Array | None, gradient: bool) -> Array:
    """[B, H, Q, K] → [B, Q, K]: ``mean((g ⊙ a)⁺)`` (relevance) or ``mean(a)`` (rollout)."""
    if gradient:
        return jnp.maximum(a * g, 0.0).mean(axis=1)
    return a.mean(axis=1)


def normalize_residual(r: Array) -> Array:
    """Chefer's R̂: the part beyond the identity with rows summing to one, plus the identity."""
    eye = jnp.eye(r.shape[-1], dtype=r.dtype)
    extra = r - eye
    total = extra.sum(-1, keepdims=True)
    return extra / jnp.where(total > 0, total, 1.0) + eye


class Rules:
    """The update rules of one method: ``gradient=True`` Chefer relevance, else rollout."""

    def __init__(self, attention: Mapping[str, Array], grads: Mapping[str, Array],
                 gradient: bool):
        self.attention, self.grads, self.gradient = attention, grads, gradient

    def has(self, path: str) -> bool:
        return path in self.attention

    def bar(self, path: str) -> Array:
        return head_mean(self.attention[path], self.grads.get(path), self.gradient)

    def self_attention(self, path: str, r_ss: Array, *others: Array) -> tuple[Array, ...]:
        """Updates ``R_ss`` and each ``R_sq`` in ``others`` for self-attention at ``path``."""
        a = self.bar(path)
        if self.gradient:
            return (r_ss + a @ r_ss, *(r + a @ r for r in others))
        eye = jnp.eye(a.shape[-1], dtype=a.dtype)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdims=True)
        return (a @ r_ss, *(a @ r for r in others))

    def cross_attention(self, path: str, r_ss: Array, r_sq: Array, r_qq: Array, r_qs: Array
                        ) -> tuple[Array, Array]:
        """(R_ss, R_sq) after the queries ``s`` attend to the keys ``q`` at ``path``."""
        a = self.bar(path)
        if not self.gradient:
            return r_ss, r_sq + a @ r_qq
        r_sq = r_sq + jnp.swapaxes(normalize_residual(r_ss), -1, -2) @ a @ normalize_residual(r_qq)
        return r_ss + a @ r_qs, r_sq


def _eye(b: int, t: int) -> Array:
    return jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32), (b, t, t))


def _layer_paths(rules: Rules, prefix: str, sub: str = "attn") -> list[str]:
    paths, i = [], 0
    while rules.has(f"{prefix}layer_{i}/{sub}"):
        paths.append(f"{prefix}layer_{i}/{sub}")
        i += 1
    return paths


def tower(rules: Rules, modality: str, num_tokens: int, batch_size: int) -> Array:
    """R [B, T, T] of a tower's output tokens over its input tokens (identity if the tower has
    no attention, e.g. a ResNet or a depth-0 tower)."""
    r = _eye(batch_size, num_tokens)
    for path in _layer_paths(rules, f"{modality}/encoder/"):
        (r,) = rules.self_attention(path, r)
    return r


def _blockdiag(blocks: list[Array]) -> Array:
    b = blocks[0].shape[0]
    n = sum(x.shape[-1] for x in blocks)
    out = jnp.zeros((b, n, n), jnp.float32)
    i = 0
    for x in blocks:
        t = x.shape[-1]
        out = out.at[:, i:i + t, i:i + t].set(x)
        i += t
    return out


def _pool_rows(r: Array, rows: Array) -> Array:
    """Weighted rows: ``rows`` [B, T] (summing to one) · R [B, T, K] → [B, K]."""
    return jnp.einsum("bt,btk->bk", rows, r)


def propagate(rules: Rules, fusion: Mapping[str, Any], towers: Mapping[str, Array],
              pool_rows: Mapping[str, Array], fusion_rows: Array | None
              ) -> dict[str, Array]:
    """Relevance [B, T_m] of every modality's input tokens for the prediction.

    ``towers``: R of each tower; ``pool_rows``: each tower's pooling weights over its tokens
    (used when the head reads the towers' pooled features: fusion ``late`` or ``none``);
    ``fusion_rows``: the fusion's pooling weights over its output tokens.
    """
    kind = fusion.get("kind", "none")
    order = sorted(towers)
    sizes = [towers[m].shape[-1] for m in order]
    if kind in ("none", "late"):
        return {m: _pool_rows(towers[m], pool_rows[m]) for m in order}
    if kind == "concat":
        b = towers[order[0]].shape[0]
        r = _blockdiag([_eye(b, 1)] + [towers[m] for m in order])
        for path in _layer_paths(rules, "fusion/encoder/"):
            (r,) = rules.self_attention(path, r)
        row = _pool_rows(r, fusion_rows)
        out, i = {}, 1
        for m, t in zip(order, sizes, strict=True):
            out[m] = row[:, i:i + t]
            i += t
        return out
    if kind == "cross_attention":
        query = fusion.get("query", "text")
        others = [m for m in order if m != query]
        r_ss = towers[query]
        r_qq = _blockdiag([towers[m] for m in others])
        r_sq = jnp.zeros((r_ss.shape[0], r_ss.shape[-1], r_qq.shape[-1]), jnp.float32)
        r_qs = jnp.swapaxes(r_sq, 1, 2)  # the context never attends to the query: stays zero
        i = 0
        while rules.has(f"fusion/encoder/layer_{i}/attn"):
            r_ss, r_sq = rules.self_attention(f"fusion/encoder/layer_{i}/attn", r_ss, r_sq)
            r_ss, r_sq = rules.cross_attention(f"fusion/encoder/layer_{i}/cross_attn",
                                               r_ss, r_sq, r_qq, r_qs)
            i += 1
        out = {query: _pool_rows(r_ss, fusion_rows)}
        row, j = _pool_rows(r_sq, fusion_rows), 0
        for m in others:
            t = towers[m].shape[-1]
            out[m] = row[:, j:j + t]
            j += t
        return out
    if kind == "co_attention":
        a, b = order
        r = {(a, a): towers[a], (b, b): towers[b]}
        r[(a, b)] = jnp.zeros((r[(a, a)].shape[0], sizes[0], sizes[1]), jnp.float32)
        r[(b, a)] = jnp.swapaxes(r[(a, b)], 1, 2)
        i = 0
        while rules.has(f"fusion/{a}_layer_{i}/attn"):
            new = {}
            for s, q in ((a, b), (b, a)):  # both streams read the other's previous state
                r_ss, r_sq = rules.self_attention(f"fusion/{s}_layer_{i}/attn",
                                                  r[(s, s)], r[(s, q)])
                new[(s, s)], new[(s, q)] = rules.cross_attention(
                    f"fusion/{s}_layer_{i}/cross_attn", r_ss, r_sq, r[(q, q)], r[(q, s)])
            r = new
            i += 1
        rows_a, rows_b = fusion_rows[:, :sizes[0]], fusion_rows[:, sizes[0]:]
        return {m: _pool_rows(r[(a, m)], rows_a) + _pool_rows(r[(b, m)], rows_b)
                for m in order}
    raise ValueError(f"relevance: unknown fusion kind {kind!r}")
