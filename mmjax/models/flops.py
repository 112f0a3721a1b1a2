r"""Analytic FLOPs of the model's parts, read off their configs (``mmjax.perf.flops`` sums them).

Why analytic: MFU compares the work the *model* defines with the chip's peak, independently of
how a backend executes it (a fused kernel that skips masked blocks, rematerialisation that runs
the forward twice) — so the count is read off the config, not off a compiled program. It is the
convention of PaLM's MFU and of torch's FLOP counter.

Per example; one multiply-add = 2 FLOPs; T tokens, width D, MLP width M:

* a dense layer with n_in inputs and n_out outputs applied to T tokens: 2·T·n_in·n_out;
* a transformer layer, forward: ``8·T·D²`` (query, key, value, output projections)
  ``+ 4·T·D·M`` (the two MLP matrices) ``+ 4·T²·D`` (QKᵀ and the attention-weighted sum of V);
  a causal mask is counted as the full T² (what the dense model defines; torch's counter does
  the same), and a cross-attention sublayer with Tq queries over Tk keys adds
  ``4·Tq·D² + 4·Tk·D² + 4·Tq·Tk·D``;
* patch embeddings: 2·N·(patch volume)·D for N patches; token embeddings are look-ups (0).

Not counted: LayerNorm, softmax, activations, biases, residual additions (all O(T·D) per layer
against the O(T·D²) above: under 1% at B/16 sizes).
"""

from __future__ import annotations


def dense_flops(tokens: int, n_in: int, n_out: int) -> int:
    """Forward FLOPs of a dense layer ``n_in -> n_out`` applied to ``tokens`` positions."""
    return 2 * tokens * n_in * n_out


def attention_flops(q_len: int, kv_len: int, width: int) -> int:
    """Forward FLOPs of one attention sublayer: four projections plus QKᵀ and A·V."""
    projections = 2 * dense_flops(q_len, width, width) + 2 * dense_flops(kv_len, width, width)
    return projections + 2 * 2 * q_len * kv_len * width


def layer_flops(tokens: int, width: int, mlp_dim: int, *, context_len: int = 0) -> int:
    """Forward FLOPs of one transformer block (self-attention, optional cross-attention, MLP).

    With ``context_len == 0`` this is ``8·T·D² + 4·T·D·M + 4·T²·D``.
    """
    total = attention_flops(tokens, tokens, width)
    if context_len:
        total += attention_flops(tokens, context_len, width)
    return total + dense_flops(tokens, width, mlp_dim) + dense_flops(tokens, mlp_dim, width)
