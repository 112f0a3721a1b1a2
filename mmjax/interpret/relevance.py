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

from mmjax.models.fusion import base as fusion_base

Array = jax.Array


def head_mean(a: Array, g: Array | None, gradient: bool) -> Array:
    """[B, H, Q, K] → [B, Q, K]: ``mean((g ⊙ a)⁺)`` (relevance) or ``mean(a)`` (rollout)."""
    if gradient:
        if g is None:
            raise ValueError("relevance needs the attention map's gradient")
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

    def layer_paths(self, prefix: str, sub: str = "attn") -> list[str]:
        """``<prefix>layer_<i>/<sub>`` for i = 0, 1, ... as long as attention was captured."""
        paths: list[str] = []
        while self.has(f"{prefix}layer_{len(paths)}/{sub}"):
            paths.append(f"{prefix}layer_{len(paths)}/{sub}")
        return paths

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


def tower(rules: Rules, modality: str, num_tokens: int, batch_size: int) -> Array:
    """R [B, T, T] of a tower's output tokens over its input tokens (identity if the tower has
    no attention, e.g. a ResNet or a depth-0 tower)."""
    r = fusion_base.eye(batch_size, num_tokens)
    for path in rules.layer_paths(f"{modality}/encoder/"):
        (r,) = rules.self_attention(path, r)
    return r


def propagate(rules: Rules, fuser: Any, towers: Mapping[str, Array],
              pool_rows: Mapping[str, Array], fusion_rows: Array | None
              ) -> dict[str, Array]:
    """Relevance [B, T_m] of every modality's input tokens for the prediction.

    ``fuser``: the model's fusion module (None: a two-tower model), which carries the rules of
    its own kind (``relevance``); ``towers``: R of each tower; ``pool_rows``: each tower's
    pooling weights over its tokens (used when the head reads the towers' pooled features);
    ``fusion_rows``: the fusion's pooling weights over its output tokens.
    """
    out = None if fuser is None else fuser.relevance(rules, towers, fusion_rows)
    if out is None:
        return {m: fusion_base.pooled_row(towers[m], pool_rows[m]) for m in sorted(towers)}
    return out
