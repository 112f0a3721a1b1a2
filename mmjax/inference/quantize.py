"""Post-training weight-only int8 quantization with per-channel scales, for any mmjax params.

Every weight matrix becomes int8 values and one float32 scale per output channel (symmetric,
absmax: ``scale = max|W| / 127`` over the channel, ``q = round(W / scale)``); the model still
computes in float32 from ``q · scale``, dequantized inside the jitted function, so only storage
shrinks (the exported file ~4x) and the arithmetic is the float model's on weights moved by at
most half a step, ``scale / 2``.

Which leaves, and the axes each scale is shared over (its "input" axes):

* ``…/kernel`` of a Dense layer [n_in, n_out], an attention projection ([D, H, hd] for
  query/key/value, [H, hd, D] for ``out``) or a convolution [kh, kw, c_in, c_out]: one scale per
  output channel, over the axes the layer contracts (``mmjax.optim.lora.n_in_axes``, the same rule
  LoRA uses);
* an embedding table (``…/embedding`` of ``nn.Embed``, ``…/*_embedding`` such as position
  embeddings) [rows, D]: one scale per row (token, position);
* a leaf stacked by ``model.scan_layers`` ([depth, …]) keeps one set of scales per layer;
* everything else (biases, norms, class tokens, temperatures, BatchNorm statistics) stays
  float32.

Why not Qwix (Google's JAX quantization library): its PTQ intercepts ``dot_general`` inside
``model.apply``, but refuses weight-only int8 for convolutions (the ViT patch embedding) and does
not touch embedding gathers, which are most of a folder run's text tower; AQT needs its
``dot_general`` injected into each module. This file covers every case with one rule and needs
no change to the model code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import scan
from mmjax.models.paths import path_str
from mmjax.optim import lora

MODES = ("int8",)
QMAX = 127


@flax.struct.dataclass
class QTensor:
    """A weight as int8 ``values`` (the weight's shape) and float32 ``scale`` (the weight's rank,
    size 1 on the axes it is shared over); the weight is ``values * scale``."""

    values: Any
    scale: Any


def scale_axes(path: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The axes a leaf's scales are shared over, or None when the leaf stays float32."""
    name = path.rsplit("/", 1)[-1]
    offset = 1 if scan.is_stacked(path) else 0
    core = tuple(shape[offset:])
    if len(core) < 2:
        return None
    if name == "kernel":
        return tuple(range(offset, offset + lora.n_in_axes(path, core)))
    if name == "embedding" or name.endswith("_embedding"):
        return (len(shape) - 1,)
    return None


def quantize_array(w: np.ndarray, axes: tuple[int, ...]) -> QTensor:
    """Symmetric absmax int8 of ``w`` with one scale per index of the axes not in ``axes``.

    The scale is rounded to float32 first and ``q = round(w / scale)`` computed against that
    float32 scale, so ``|w - q·scale| <= scale / 2`` holds for the stored values. A channel of
    zeros gets scale 1 (and zeros).
    """
    w = np.asarray(w)
    amax = np.max(np.abs(w.astype(np.float64)), axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float64) / scale.astype(np.float64)), -QMAX, QMAX)
    return QTensor(values=q.astype(np.int8), scale=scale)


def quantize(params: Any, mode: str = "int8") -> Any:
    """``params`` with every weight matrix as a :class:`QTensor` (host numpy), rest as is."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}; supported: {MODES}")

    def leaf(path: tuple, x: Any) -> Any:
        axes = scale_axes(path_str(path), np.shape(x))
        if axes is None or not np.issubdtype(np.asarray(x).dtype, np.floating):
            return x
        return quantize_array(x, axes)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _is_q(x: Any) -> bool:
    return isinstance(x, QTensor)


def quantized_variables(variables: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """``variables`` with their ``params`` quantized by ``mode`` (``""``: unchanged)."""
    if not mode:
        return dict(variables)
    return {**variables, "params": quantize(variables["params"], mode)}


def dequantize(tree: Any) -> Any:
    """Every :class:`QTensor` of ``tree`` as float32 ``values * scale`` (jnp: traceable, so a
    jitted or exported function holds the int8 arrays and dequantizes them when it runs)."""
    if not any(_is_q(x) for x in jax.tree.leaves(tree, is_leaf=_is_q)):
        return tree
    # jnp, not numpy: on numpy values the product would be computed while tracing and stored
    # as a float32 constant, undoing the compression.
    return jax.tree.map(
        lambda x: jnp.asarray(x.values).astype(jnp.float32) * jnp.asarray(x.scale)
        if _is_q(x) else x, tree, is_leaf=_is_q)


def summary(tree: Any) -> dict[str, int]:
    """Counts for a report: quantized leaves and their elements, the bytes of all leaves."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_q)
    qs = [x for x in leaves if _is_q(x)]
    return {
        "quantized_leaves": len(qs),
        "quantized_elements": int(sum(np.size(x.values) for x in qs)),
        "float_elements": int(sum(np.size(x) for x in leaves if not _is_q(x))),
        "bytes": int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))),
    }
