"""Layer views: per encoder layer, the token features' first three principal components as RGB
over the token grid, and each attention head's entropy.

``layers/<index>_<layer>.png`` holds the PCA picture (tokens that form no grid, such as text or
a text-query fusion, are one row); ``layers/<index>_<layer>_entropy.png`` one bar per head, its
height the mean entropy of the head's attention rows over log(keys), the uniform maximum; the
numbers are in ``layers/<index>.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw

from mmjax import modalities
from mmjax.interpret import capture, layout
from mmjax.models import encoders


def features_fn(model: Any) -> Any:
    """Jitted ``fn(variables, batch) -> (block tokens {path: [B, T, D]}, attention maps)``."""
    def fn(variables: Any, batch: Any) -> tuple[dict, dict]:
        _, state = model.apply(variables, batch, mutable=["intermediates"])
        inter = state["intermediates"]
        return capture.paths(inter, "tokens"), capture.paths(inter, "attention")
    return jax.jit(fn)


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """[T, D] → [T, 3] in [0, 1]: projections on the first three principal components, each
    min-max scaled (fewer components than three: the rest zero)."""
    x = np.asarray(tokens, np.float64)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    out = np.zeros((x.shape[0], 3))
    for c in range(proj.shape[1]):
        col = proj[:, c]
        span = col.max() - col.min()
        out[:, c] = (col - col.min()) / span if span > 0 else 0.0
    return out


def head_entropy(attention: np.ndarray, query_mask: np.ndarray | None = None) -> np.ndarray:
    """[H, Q, K] attention rows → [H] mean entropy (nats) over the (valid) query rows."""
    a = np.asarray(attention, np.float64)
    ent = -(a * np.log(np.where(a > 0, a, 1.0))).sum(-1)  # [H, Q]
    if query_mask is None:
        return ent.mean(-1)
    w = np.asarray(query_mask, np.float64)
    return (ent * w).sum(-1) / max(w.sum(), 1.0)


def _grid_for(model: Any, path: str, batch: Mapping[str, Any], n: int
              ) -> tuple[int, int, int] | None:
    """(prefix, rows, cols) when the path's tokens are a tower's grid; else None."""
    m = path.split("/")[0]
    if m not in model.encoders or modalities.get(m).explained_as == "tokens":
        return None
    shape = np.shape(modalities.get(m).explained_value(batch[m]))[1:]
    t = layout.tower(model, m)
    rows, cols = encoders.token_grid(t, shape, n)
    p = encoders.prefix_tokens(t)
    return (p, rows, cols) if p + rows * cols == n else None


def _bars(values: np.ndarray, top: float, size: tuple[int, int] = (120, 60)) -> Image.Image:
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w = size[0] / max(len(values), 1)
    for i, v in enumerate(values):
        h = (size[1] - 2) * min(v / top, 1.0) if top > 0 else 0
        d.rectangle([i * w + 2, size[1] - 1 - h, (i + 1) * w - 2, size[1] - 1], fill=(232, 89, 12))
    return im


def write(out_dir: Path, model: Any, feats: tuple[dict, dict], batch: Mapping[str, Any],
          r: int, index: int) -> dict[str, Any]:
    """Writes example ``r``'s layer views (``feats`` from :func:`features_fn`)."""
    tokens, attention = feats
    folder = out_dir / "layers"
    folder.mkdir(exist_ok=True)
    numbers: dict[str, Any] = {}
    for path, t in sorted(tokens.items()):
        x = np.asarray(t[r])
        g = _grid_for(model, path, batch, x.shape[0])
        mask = _query_mask(model, path, batch, r, x.shape[0])
        rgb = pca_rgb(x[mask > 0] if g is None else x[g[0]:])
        pic = rgb.reshape(1, -1, 3) if g is None else rgb.reshape(g[1], g[2], 3)
        im = Image.fromarray(np.round(pic * 255).astype(np.uint8))
        scale = max(1, 96 // max(pic.shape[:2]))
        im = im.resize((pic.shape[1] * scale, pic.shape[0] * scale), Image.Resampling.NEAREST)
        name = path.replace("/", ".")
        im.save(folder / f"{index:05d}_{name}.png")
        numbers[path] = {"tokens": int(x.shape[0])}
    for path, a in sorted(attention.items()):
        a = np.asarray(a[r])
        mask = _query_mask(model, path, batch, r, a.shape[1])
        ent = head_entropy(a, mask)
        top = float(np.log(a.shape[-1]))
        _bars(ent, top).save(folder / f"{index:05d}_{path.replace('/', '.')}_entropy.png")
        numbers.setdefault(path, {})["entropy"] = [round(float(e), 6) for e in ent]
    (folder / f"{index:05d}.json").write_text(json.dumps(numbers, indent=1))
    return numbers


def _query_mask(model: Any, path: str, batch: Mapping[str, Any], r: int, n: int) -> np.ndarray:
    """Validity of the tokens at ``path`` (text padding is invalid), all ones when unknown."""
    m = path.split("/")[0]
    source = m if m in model.encoders else model.fusion.get("query", "text")
    x = batch.get(source)
    if isinstance(x, Mapping) and "mask" in x and np.asarray(x["mask"]).shape[1] == n:
        return np.asarray(x["mask"])[r]
    return np.ones(n)
