"""Time series: ``"series": "sensor.npy"`` in a record (floats ``[time, channels]``),
``{"values": float32 [B, length, channels], "mask": int32 [B, length]}`` in a batch (the
``series`` op pads or cuts to ``length`` steps; ``mmjax.pp.series``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.modalities.base import Modality, register
from mmjax.pp import ops
from mmjax.pp import series as series_pp


def _fitted(ctx: ops.Context) -> dict[str, np.ndarray]:
    """An absent series after the eval ops' ``series`` op: its shapes and dtypes."""
    spec = ctx.data.get("pp_eval", "") if ctx.data is not None else ""
    fit = ops.of_key(ops.parse(spec, ctx), "series") if spec else []
    example = ops.apply(fit, {"series": series_pp.placeholder()}, None)
    if not fit or not isinstance(example["series"], dict):
        raise ValueError("series inputs need a 'series(length, channels)' op in data.pp_eval")
    return example["series"]


def _synthetic(batch_size: int, ctx: ops.Context, tower: Mapping[str, Any],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    fitted = _fitted(ctx)
    values = rng.standard_normal((batch_size, *fitted["values"].shape), dtype=np.float32)
    return {"values": values, "mask": np.ones((batch_size, *fitted["mask"].shape), np.int32)}


def _steps(ctx: ops.Context, spec: str, tokenizer_file: str) -> list[str]:
    fitted = _fitted(ctx)
    length, channels = fitted["values"].shape
    return [f"load the .npy as float32 [time, channels] ({channels} channels)",
            f"cut it to {length} steps or pad it with zeros; mask 1 on the series' own steps"]


_MEANINGS = {"values": "the series, float32 [length, channels] (see Series)",
             "mask": "1 on the series' own steps, 0 on padding"}

SERIES = register(Modality(
    name="series",
    towers=("series",),
    load=lambda path, ctx: series_pp.load_series(path),
    placeholder=lambda ctx: series_pp.placeholder(),
    required_ops=("series",),
    default_pp="series(64, 1)",
    synthetic=_synthetic,
    explained_value=lambda entry: entry["values"],
    with_explained=lambda entry, x: {**entry, "values": x},
    describe=lambda leaf, dtype: _MEANINGS.get(leaf, f"{leaf} ({dtype})"),
    steps=_steps,
))
