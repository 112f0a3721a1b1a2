"""mmjax against transformers' PyTorch model, layer by layer, on fresh random inputs.

torch and transformers are imported inside the functions that run them: they take seconds to
import and only ``compare`` (``python -m mmjax.convert --verify``, the tests) needs them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np

from mmjax.hf import io, registry
from mmjax.hf.common import HFError, Rows, max_abs_diff


def random_inputs(cfg: Mapping[str, Any], batch: int = 2, length: int = 7,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh random inputs; text rows after the first are right-padded to different lengths."""
    return registry.architecture(cfg).inputs(cfg, np.random.default_rng(seed), batch, length)


def _torch_outputs(path: str | Path, inputs: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Hugging Face outputs and per-layer hidden states: ({name: array}, {tower: [states]})."""
    import torch

    arch = registry.architecture(io.read_config(path))
    hf = arch.reference_model(path).eval()
    tin = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    if "pixel_values" in tin and tin["pixel_values"].ndim == 4:  # images: NHWC -> NCHW
        tin["pixel_values"] = tin["pixel_values"].permute(0, 3, 1, 2)
    with torch.no_grad():
        out = hf(**tin, output_hidden_states=True)
    return arch.reference(out, lambda t: t.detach().float().numpy())


def compare(
    path: str | Path,
    model: nn.Module | None = None,
    variables: Mapping[str, Any] | None = None,
    *,
    batch: int = 2,
    seed: int = 0,
) -> Rows:
    """Max |mmjax - transformers| per layer and per output, on fresh random inputs.

    Rows ``<tower>/embeddings`` (where both expose it) and ``<tower>/layer_<i>`` (a ResNet:
    ``image/stage<i>``) compare each layer's output, so a divergence shows where it starts; the
    output rows are Hugging Face's.
    """
    if model is None or variables is None:
        model, variables = io.load(path)
    cfg = json.loads(model.hf_config)
    arch = registry.architecture_of(model)
    inputs = random_inputs(cfg, batch=batch, seed=seed)
    ref, ref_states = _torch_outputs(path, inputs)

    def keep(mdl: nn.Module, method: str) -> bool:
        return method == "__call__" and (mdl.name or "").startswith(arch.captured)

    out, state = model.apply(variables, **inputs,  # type: ignore[arg-type]
                             capture_intermediates=keep)
    inter = state["intermediates"]
    rows: Rows = []
    for tower, states in ref_states.items():
        rows += arch.layer_rows(tower, inter.get(tower, {}), states)
    for name, value in ref.items():
        if name == "pooler_output" and name not in out:
            continue  # the folder has no pooler: transformers' is freshly random, not a reference
        if name not in out:
            raise HFError(f"mmjax output lacks {name!r}")
        rows.append((name, max_abs_diff(out[name], value)))
    return rows


def format_table(rows: Sequence[tuple[str, float]]) -> str:
    """The rows of ``compare`` as an aligned two-column text table."""
    width = max(len(n) for n, _ in rows)
    lines = [f"{'tensor':<{width}}  max_abs_diff"]
    lines += [f"{n:<{width}}  {d:.3e}" for n, d in rows]
    return "\n".join(lines)
