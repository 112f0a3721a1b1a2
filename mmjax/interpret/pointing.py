"""The pointing game: does the heat map's peak fall in the grid cell of the object the question
names? Scored over the examples the model answers correctly (chance: 1 / cells)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def peak_cell(heatmap: Sequence[Sequence[float]], grid: int) -> int:
    """Row-major index of the ``grid`` x ``grid`` cell holding the heat map's maximum (any map
    resolution: one value per patch or per pixel)."""
    h = np.asarray(heatmap, np.float64)
    if h.ndim != 2:
        raise ValueError(f"a heat map is 2-D, got shape {h.shape}")
    r, c = np.unravel_index(int(np.argmax(h)), h.shape)
    return int(r * grid // h.shape[0]) * grid + int(c * grid // h.shape[1])


def score(records: Iterable[Mapping[str, Any]], cells: Sequence[int], grid: int = 4,
          modality: str = "image") -> dict[str, Any]:
    """``{"correct", "hits", "pointing"}``: among the records whose ``predicted`` equals
    ``label``, the fraction whose peak cell is ``cells[record["index"]]``."""
    correct = hits = 0
    for rec in records:
        if rec["predicted"] != rec["label"]:
            continue
        correct += 1
        hits += peak_cell(rec[modality]["heatmap"], grid) == int(cells[rec["index"]])
    return {"correct": correct, "hits": hits,
            "pointing": hits / correct if correct else float("nan")}


def score_file(explanations: str | Path, cells: str | Path, grid: int = 4) -> dict[str, Any]:
    """:func:`score` of an ``explanations.jsonl`` against a JSON list of cells per split row."""
    lines = Path(explanations).read_text().splitlines()
    return score([json.loads(x) for x in lines], json.loads(Path(cells).read_text()), grid)
