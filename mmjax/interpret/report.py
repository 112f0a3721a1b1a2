"""PNG overlays and a static ``index.html`` gallery (relative paths: opens without a server)."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmjax import modalities
from mmjax.interpret import layout
from mmjax.models import encoders

# A perceptually ordered colour ramp (dark blue → red → yellow), sampled at 5 stops.
_STOPS = np.array([[12, 7, 134], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]],
                  np.float64)


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → uint8 RGB [..., 3]."""
    t = np.clip(x, 0, 1) * (len(_STOPS) - 1)
    i = np.minimum(t.astype(int), len(_STOPS) - 2)
    f = (t - i)[..., None]
    return np.round(_STOPS[i] * (1 - f) + _STOPS[i + 1] * f).astype(np.uint8)


def unit(x: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] (a constant map gives zeros)."""
    x = np.asarray(x, np.float64)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def _resize(a: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    im = Image.fromarray(a)
    mode = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return np.asarray(im.resize(size, mode))


def overlay(image: np.ndarray, heat: np.ndarray, size: int = 160) -> Image.Image:
    """An image (any range, [H, W, 3] or [H, W]) with ``heat`` blended over it, side by side
    with the heat map alone."""
    img = np.round(unit(image) * 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    h, w = img.shape[:2]
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = _resize(img, shape).astype(np.float64)
    heat_rgb = _resize(colormap(unit(heat)), shape).astype(np.float64)
    blend = np.round(0.45 * base + 0.55 * heat_rgb).astype(np.uint8)
    gap = np.full((shape[1], 6, 3), 255, np.uint8)
    return Image.fromarray(np.concatenate([blend, gap, heat_rgb.astype(np.uint8)], axis=1))


def overlays(out_dir: Path, rec: Mapping[str, Any], batch: Mapping[str, Any], r: int,
             model: Any) -> dict[str, Any]:
    """Writes ``img/<index>_<modality>.png`` for every image-like modality of one example;
    returns the gallery entry (the record plus the PNG paths, relative to ``out_dir``)."""
    (out_dir / "img").mkdir(exist_ok=True)
    pngs = {}
    for m, value in rec.items():
        if not isinstance(value, Mapping) or "heatmap" not in value:
            continue
        x = np.asarray(modalities.get(m).explained_value(batch[m]))[r]
        heat = np.asarray(value["heatmap"], np.float64)
        if x.ndim == 2:  # a spectrogram or a series: drawn as the tower lays it out, row 0 low
            x = encoders.display(layout.tower(model, m), x)[::-1]
            heat = heat[::-1]
        name = f"img/{rec['index']:05d}_{m}.png"
        overlay(x, heat).save(out_dir / name)
        pngs[m] = name
    return {"record": dict(rec), "pngs": pngs}


_SPECIAL = {"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<|endoftext|>", "<|startoftext|>"}


def _tokens_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens shaded by score, scaled to the largest |score| of a non-special token (a pooled
    [CLS] keeps its own relevance of about 1, which would wash out every word)."""
    s = np.asarray(scores, np.float64)
    words = [abs(v) for t, v in zip(tokens, s, strict=True) if t not in _SPECIAL]
    top = max(words) if words else (np.abs(s).max() if s.size else 0.0)
    spans = []
    for t, v in zip(tokens, s, strict=True):
        a = min(abs(v) / top, 1.0) if top > 0 else 0.0
        colour = "255,140,0" if v >= 0 else "70,130,255"
        spans.append(f'<span class="tok" style="background:rgba({colour},{a:.2f})" '
                     f'title="{v:.4g}">{html.escape(t)}</span>')
    return " ".join(spans)


def _bars_html(contrib: Mapping[str, float]) -> str:
    if not contrib:
        return ""
    top = max(abs(v) for v in contrib.values()) or 1.0
    rows = []
    for m, v in contrib.items():
        width = round(100 * abs(v) / top)
        colour = "#e8590c" if v >= 0 else "#1c7ed6"
        rows.append(f'<div class="bar"><span class="m">{html.escape(m)}</span>'
                    f'<span class="b" style="width:{width}px;background:{colour}"></span>'
                    f' {v:+.3f}</div>')
    return "".join(rows)


def index_html(out_dir: Path, gallery: Sequence[Mapping[str, Any]], *, method: str, step: int,
               split: str, layers: bool = False) -> Path:
    """``out_dir/index.html``: one card per example (overlays, highlighted tokens, modality
    bars, layer views)."""
    cards = []
    for entry in gallery:
        rec, pngs = entry["record"], entry["pngs"]
        ok = "ok" if rec["label"] == rec["predicted"] else "wrong"
        parts = [f'<div class="card {ok}"><div class="head">#{rec["index"]}: '
                 f'gold <b>{html.escape(str(rec["label"]))}</b>, predicted '
                 f'<b>{html.escape(str(rec["predicted"]))}</b> ({rec["score"]:.3f})</div>']
        for m, path in pngs.items():
            parts.append(f'<div><div class="m">{html.escape(m)}</div>'
                         f'<img src="{html.escape(path)}" alt="{html.escape(m)} heat map"></div>')
        for m, value in rec.items():
            if isinstance(value, Mapping) and "tokens" in value:
                parts.append(f'<div class="text"><span class="m">{html.escape(m)}</span> '
                             f'{_tokens_html(value["tokens"], value["scores"])}</div>')
        parts.append(_bars_html(rec.get("modalities", {})))
        if layers:
            for p in sorted((out_dir / "layers").glob(f"{rec['index']:05d}_*.png")):
                rel = p.relative_to(out_dir).as_posix()
                parts.append(f'<div class="layer"><div class="m">{html.escape(p.stem[6:])}</div>'
                             f'<img src="{html.escape(rel)}" alt="layer view"></div>')
        parts.append("</div>")
        cards.append("".join(parts))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mmjax explanations: {html.escape(method)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.card {{ display: inline-block; vertical-align: top; border: 1px solid #ccc; margin: 6px;
  padding: 6px; max-width: 420px; }}
.card.wrong {{ border-color: #e03131; }}
.m {{ font-size: 80%; color: #555; }}
.tok {{ padding: 1px 2px; border-radius: 3px; }}
.bar .b {{ display: inline-block; height: 10px; margin-left: 4px; }}
.layer img {{ image-rendering: pixelated; }}
</style></head><body>
<h1>{html.escape(method)} — {html.escape(split)}, checkpoint step {step}</h1>
<p>Left: input with heat map (larger = more evidence for the predicted class); right: the map
alone. Text: token highlights (orange for, blue against). Bars: drop in the predicted class's
probability without the modality (Shapley values with three or more).</p>
{"".join(cards)}
</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
