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

import numpy as np

from mmjax import modalities
from mmjax.data import records
from mmjax.models import encoders, layers
from mmjax.models import fusion as fusion_lib
from mmjax.models.flops import dense_flops
from mmjax.models.heads import CONTRASTIVE_KINDS


def input_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """One example's input shape per tower of ``config.model.encoders``, as the pipeline makes
    it (the first array of the modality's ``synthetic`` entry: pixels, token ids, features)."""
    ctx = records.context(config.data, None)
    rng = np.random.default_rng(0)
    out = {}
    for m, enc in config.model.encoders.items():
        entry = modalities.get(m).synthetic(1, ctx, dict(enc), rng)
        leaf = next(iter(entry.values())) if isinstance(entry, Mapping) else entry
        out[m] = tuple(np.shape(leaf)[1:])
    return out


def encoder_flops(modality: str, cfg: Mapping[str, Any], input_shape: tuple[int, ...]
                  ) -> tuple[int, int, int]:
    """(forward FLOPs per example, output tokens, width) of one tower, as the tower counts
    itself (``mmjax.models.encoders.flops``)."""
    t = encoders.tower(modality, cfg, layers.Options(), parent=None)
    return encoders.flops(t, input_shape)


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

    ``config`` is a full run config (the model, and the data config that gives the input
    shapes); ``device_batch`` (default: ``config.batch_size``) sizes the contrastive logits.
    """
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    device_batch = config.batch_size if device_batch is None else device_batch
    out: dict[str, int] = {}
    towers: dict[str, tuple[int, int]] = {}
    for m, shape in input_shapes(config).items():
        out[m], t, d = encoder_flops(m, model["encoders"][m], shape)
        towers[m] = (t, d)
    out["fusion"], fused_width = fusion_flops(model.get("fusion", {"kind": "none"}), towers)
    widths = {m: d for m, (_, d) in towers.items()}
    out["heads"] = sum(
        head_flops(h, fused_width, widths, device_batch) for h in model["heads"].values()
    )
    out["forward"] = sum(out.values())
    out["train"] = 3 * out["forward"]
    return out
