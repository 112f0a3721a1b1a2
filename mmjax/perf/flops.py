r"""Analytic training FLOPs of a model config, for the benchmark's TFLOP/s and MFU.

Why analytic: MFU compares the work the *model* defines with the chip's peak, independently of
how a backend executes it (a fused kernel that skips masked blocks, rematerialisation that runs
the forward twice) — so the count is read off the config, not off a compiled program. It is the
convention of PaLM's MFU and of torch's FLOP counter (about 124 GFLOP/sample for CLIP B/16,
docs/performance.md).

The per-part rules (dense layers, transformer blocks, patch embeddings) are those of
``mmjax.models.flops``; each tower and fusion kind counts itself with them. Here:

* poolers and heads: their dense layers; the
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

from mmjax.models import fusion as fusion_lib
from mmjax.models import layers
from mmjax.models.flops import dense_flops, layer_flops
from mmjax.models.heads import CONTRASTIVE_KINDS
from mmjax.models.multimodal import MODEL_OPTIONS


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
    fuser = fusion_lib.build(fusion, parent=None)
    return (0, 0) if fuser is None else fuser.flops(towers)


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
