"""Explain a trained classifier on a split: ``explanations.jsonl``, PNG overlays, ``index.html``.

One jitted function per batch shape computes the prediction, the method's scores for every
modality and the modality contributions; batches come from the evaluation pipeline in split
order, so line ``index`` is the row of the split file.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mmjax import files, modalities
from mmjax.data import pipeline
from mmjax.data.records import SPLITS
from mmjax.inference import answer
from mmjax.interpret import capture, contributions, layout, methods, report, views
from mmjax.models import encoders
from mmjax.models.multimodal import prepare
from mmjax.pp import video as video_pp
from mmjax.trainer import runs
from mmjax.trainer import workdir as workdir_lib

log = logging.getLogger(__name__)

EXPLANATIONS = "explanations.jsonl"
OWNED = (EXPLANATIONS, "index.html", "img", "layers")  # all an explanation writes


def explain_batch(model: Any, task: str, method: str, names: list[str],
                  kwargs: Mapping[str, Any], variables: Any, batch: Any, perturb: Any
                  ) -> dict[str, Any]:
    """One batch: the method's ``{"probs", "target", "scores"}`` plus ``"modalities"`` (each
    modality's contribution to the target class, :mod:`mmjax.interpret.contributions`); jittable
    with everything before ``variables`` bound."""
    out = methods.run_method(method, model, task, variables, batch, perturb, **kwargs)
    target = out["target"]
    probs_fn = capture.probs_fn(model, task)

    def prob(b: Any) -> jax.Array:
        p = probs_fn(variables, b, perturb)
        return jax.numpy.take_along_axis(p, target[:, None], axis=1)[:, 0]

    out["modalities"] = (contributions.contributions(prob, batch, names) if len(names) > 1 else {})
    return out


def token_strings(tokenizer: Any, ids: list[int]) -> list[str]:
    """One string per token id (word pieces, special tokens kept)."""
    inner: Any = getattr(tokenizer, "_tok", None)
    if hasattr(inner, "convert_ids_to_tokens"):
        return [str(t) for t in inner.convert_ids_to_tokens(ids)]
    if hasattr(inner, "id_to_token"):
        return [inner.id_to_token(int(i)) or "[UNK]" for i in ids]
    vocab = getattr(tokenizer, "vocab", None)
    if vocab is not None:
        return [vocab[i] if 0 <= i < len(vocab) else "[UNK]" for i in ids]
    return [tokenizer.decode([i])[0] for i in ids]


def _record(model: Any, run: runs.Run, names: list[str], batch: Mapping[str, Any],
            out: Mapping[str, Any], r: int, index: int, label: int, method: str
            ) -> dict[str, Any]:
    target = int(out["target"][r])
    rec: dict[str, Any] = {
        "index": index,
        "label": run.label_names[label] if 0 <= label < len(run.label_names) else label,
        "predicted": run.label_names[target],
        "score": float(out["probs"][r, target]),
        "method": method,
    }
    for m in names:
        s = np.asarray(out["scores"][m][r], np.float64)
        modality = modalities.get(m)
        if modality.explained_as == "tokens":
            mask = np.asarray(batch[m].get("mask", np.ones_like(batch[m]["ids"])))[r] > 0
            ids = np.asarray(batch[m]["ids"])[r][mask].tolist()
            rec[m] = {"tokens": token_strings(run.tokenizer, ids),
                      "scores": [round(float(v), 6) for v in s[mask]]}
            continue
        shape = np.shape(modality.explained_value(batch[m]))[1:]
        if s.ndim == 2:  # input-shaped scores, drawn as the tower lays its input out
            heat = encoders.display(layout.tower(model, m), s)
        else:
            heat = layout.to_map(model, m, s, shape)
        rec[m] = {"heatmap": np.round(heat, 6).tolist()}
    rec["modalities"] = {m: round(float(v[r]), 6) for m, v in out["modalities"].items()}
    return rec


def explain(workdir: str | Path, output: str | Path, *, split: str = "test", limit: int = 0,
            method: str = "relevance", step: str | int | None = None, layers: bool = False,
            batch_size: int = 100, task: str = "", steps: int = 32,
            images: int = 50) -> dict[str, Any]:
    """Explains the first ``limit`` examples (0: all) of ``split``; returns a summary.

    ``steps``: integrated-gradients quadrature nodes. ``images``: examples that get PNG
    overlays and a gallery entry (all of them get a JSONL line). ``layers``: also the layer
    views of the first ``images`` examples.

    Everything is written into a fresh folder beside ``output`` that then replaces it whole
    (``mmjax.files.replaced_dir``): no picture of an earlier run stays in the new gallery, and
    an interrupted run leaves the earlier output as it was. An existing ``output`` may hold
    only an earlier explanation's files, and may not lie inside a training workdir.
    """
    if split not in SPLITS:
        raise runs.RunError(f"--split={split!r}; expected one of {SPLITS}")
    if limit < 0:
        raise runs.RunError(f"--limit={limit} must be >= 0 (0: the whole split)")
    if method not in methods.METHODS:
        raise runs.RunError(f"--method={method!r}; known: {list(methods.METHODS)}")
    out_dir = Path(output)
    workdir_lib.refuse_output_inside(out_dir)
    files.check_output_dir(out_dir, OWNED)
    run = runs.load(workdir, step)
    task, kind = runs.output_task(run.config, task)
    if kind != "classification":
        raise runs.RunError(f"head {task!r} is a {kind} head; mmjax.explain explains "
                               "classification heads")
    model, variables = capture.explained_model(run.build_model(), run.variables())
    names = answer.input_names(model, task, kind)
    kwargs = {"steps": steps} if method == "integrated_gradients" else {}
    fn = jax.jit(functools.partial(explain_batch, model, task, method, names, kwargs))
    vfn = views.features_fn(model) if layers else None
    start, count, perturb, gallery = time.time(), 0, None, []
    bs = min(batch_size, limit) if limit else batch_size
    with files.replaced_dir(out_dir, owned=OWNED) as tmp, \
            open(tmp / EXPLANATIONS, "w", encoding="utf-8") as f:
        # One view per example (the centre clip): the maps are drawn over the input itself.
        for batch in pipeline.eval_batches(video_pp.single_view(run.config.data), split,
                                           batch_size=bs, tokenizer=run.tokenizer):
            valid = np.asarray(batch["valid"]) > 0
            labels = np.asarray(batch["label"])
            # what the towers read (uint8 pixels as [-1, 1] floats): gradients need floats
            inputs = prepare(answer.model_inputs(batch, names), model.encoders)
            if perturb is None:
                perturb = capture.zero_perturbations(model, variables, inputs)
            out = jax.device_get(fn(variables, inputs, perturb))
            feats = jax.device_get(vfn(variables, inputs)) if vfn is not None else None
            for r in np.flatnonzero(valid).tolist():
                rec = _record(model, run, names, inputs, out, r, count, int(labels[r]), method)
                f.write(json.dumps(rec) + "\n")
                if count < images:
                    gallery.append(report.overlays(tmp, rec, inputs, r, model))
                    if feats is not None:
                        views.write(tmp, model, feats, inputs, r, count)
                count += 1
                if limit and count >= limit:
                    break
            if limit and count >= limit:
                break
        report.index_html(tmp, gallery, method=method, step=run.step, split=split,
                          layers=layers)
    seconds = time.time() - start
    log.info("explained %d examples of %s (%s) in %.1f s", count, split, method, seconds)
    return {"count": count, "method": method, "step": run.step, "split": split,
            "output": str(out_dir), "seconds": round(seconds, 2)}
