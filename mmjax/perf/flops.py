r"""Analytic training FLOPs of a model config, for the benchmark's TFLOP/s and MFU.

Why analytic: MFU compares the work the *model* defines with the chip's peak, independently of
how a backend executes it (a fused kernel that skips masked blocks, rematerialisation that runs
the forward twice) — so the count is read off the config, not off a compiled program. It is the
convention of PaLM's MFU and of torch's FLOP counter (about 124 GFLOP/sample for CLIP B/16,
docs/performance.md).

The formula (per example; one multiply-add = 2 FLOPs; T tokens, width D, MLP width M):

* a dense layer with n_in inputs and n_out outputs applied to T tokens: 2·T·n_in·n_out;
* a transformer layer, forward:
  ``8·T·D²`` (query, key, value, output projections) ``+ 4·T·D·M`` (the two MLP matrices)
  ``+ 4·T²·D`` (QKᵀ and the attention-weighted sum of V: 2·2·T²·D);
  a causal mask is counted as the full T² (what the dense model defines; torch's counter does
  the same), and a cross-attention sublayer with Tq queries over Tk keys adds
  ``4·Tq·D² + 4·Tk·D² + 4·Tq·Tk·D``;
* the ViT patch embedding: 2·N·(p²·3)·D for N patches of p x p pixels; token embeddings are
  look-ups (0 FLOPs);
* fusion input projections, poolers and heads: their dense layers by the first rule; the
  contrastive logits (a B x B similarity matrix over the batch B one device sees: the local
  batch under pmap, the global one under the mesh path) cost 2·B·E per example;
* training = 3 x forward: the backward pass computes a gradient with respect to each matmul's
  input and one with respect to its weight, each as costly as the forward matmul.

Not counted: LayerNorm, softmax, activations, biases, residual additions, the loss and the
optimizer (all O(T·D) per layer against the O(T·D²) above: under 1% at B/16 sizes), and the
input gradient of the patch embedding that x3 includes although no one needs it (0.05%).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmjax.models import layers
from mmjax.models.heads import CONTRASTIVE_KINDS
from mmjax.models.multimodal import MODEL_OPTIONS


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


def tower_sizes(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Width, depth, MLP width, heads (and patch) of a tower config: its variant plus overrides."""
    size = layers.decode_variant(cfg.get("variant", "mu"))
    for key in ("width", "depth", "mlp_dim", "num_heads", "patch_size"):
        if cfg.get(key) is not None:
            size[key] = cfg[key]
    return size


def encoder_flops(cfg: Mapping[str, Any], data: Mapping[str, Any]) -> tuple[int, int, int]:
    """(forward FLOPs per example, output tokens, width) of one tower of ``config.model``."""
    kind = cfg.get("kind")
    s = tower_sizes(cfg)
    d = s["width"]
    if kind == "vit":
        p = s["patch_size"]
        n = (data["image_size"] // p) ** 2
        t = n + (1 if cfg.get("class_token", False) else 0)
        total = dense_flops(n, p * p * 3, d)
    elif kind == "text":
        t = data["max_len"]
        total = 0
    else:
        raise NotImplementedError(f"no analytic FLOP count for encoder kind {kind!r}")
    total += s["depth"] * layer_flops(t, d, s["mlp_dim"])
    if cfg.get("pooler", False):
        total += dense_flops(1, d, d)
    return total, t, d


def fusion_flops(
    fusion: Mapping[str, Any], towers: Mapping[str, tuple[int, int]]
) -> tuple[int, int]:
    """(forward FLOPs per example, width of the fused pooled feature); ``towers``: (T, D)."""
    kind = fusion.get("kind", "none")
    if kind == "none":
        return 0, 0
    w = fusion.get("width", 64)
    depth = fusion.get("depth", 1)
    mlp = fusion.get("mlp_dim") or 4 * w
    order = sorted(towers)
    total = sum(dense_flops(t, d, w) for t, d in towers.values())  # input projections
    lengths = {m: towers[m][0] for m in order}
    if kind == "concat":
        t = 1 + sum(lengths.values())
        return total + depth * layer_flops(t, w, mlp), w
    if kind == "cross_attention":
        query = fusion.get("query", "text")
        ctx = sum(n for m, n in lengths.items() if m != query)
        return total + depth * layer_flops(lengths[query], w, mlp, context_len=ctx), w
    if kind == "co_attention":
        a, b = order
        per_layer = layer_flops(lengths[a], w, mlp, context_len=lengths[b]) + layer_flops(
            lengths[b], w, mlp, context_len=lengths[a]
        )
        return total + depth * per_layer, 2 * w
    if kind == "late":
        d_in = sum(d for _, d in towers.values())
        return dense_flops(1, d_in, mlp) + dense_flops(1, mlp, w), w
    raise ValueError(f"unknown fusion kind {kind!r} (model.fusion.kind)")


def head_flops(
    head: Mapping[str, Any], fused_width: int, tower_width: Mapping[str, int], device_batch: int
) -> int:
    """Forward FLOPs per example of one task head."""
    kind = head.get("kind")
    if kind in ("classification", "regression"):
        d = fused_width if head.get("input", "pooled") == "pooled" else tower_width[head["input"]]
        out = head["num_classes"] if kind == "classification" else head.get("out_dim", 1)
        hidden = head.get("hidden", 0)
        if hidden:
            return dense_flops(1, d, hidden) + dense_flops(1, hidden, out)
        return dense_flops(1, d, out)
    if kind in CONTRASTIVE_KINDS:  # contrastive and siglip: two projections and the logits
        e = head.get("embed_dim", 64)
        mods = head.get("modalities", ("image", "text"))
        return sum(dense_flops(1, tower_width[m], e) for m in mods) + 2 * device_batch * e
    raise NotImplementedError(f"no analytic FLOP count for head kind {kind!r}")


def model_flops(config: Any, device_batch: int | None = None) -> dict[str, int]:
    """Per-example forward FLOPs by part, their sum ``forward``, and ``train`` = 3·forward.

    ``config`` is a full run config (the model plus ``data.image_size``/``data.max_len``, the
    input shapes); ``device_batch`` (default: ``config.batch_size``) sizes the contrastive logits.
    """
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    data = config.data
    device_batch = config.batch_size if device_batch is None else device_batch
    out: dict[str, int] = {}
    towers: dict[str, tuple[int, int]] = {}
    for name, cfg in model.items():
        if name in MODEL_OPTIONS:
            continue
        out[name], t, d = encoder_flops(cfg, data)
        towers[name] = (t, d)
    out["fusion"], fused_width = fusion_flops(model.get("fusion", {"kind": "none"}), towers)
    widths = {m: d for m, (_, d) in towers.items()}
    out["heads"] = sum(
        head_flops(h, fused_width, widths, device_batch) for h in model["heads"].values()
    )
    out["forward"] = sum(out.values())
    out["train"] = 3 * out["forward"]
    return out
