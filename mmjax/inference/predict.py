"""Answer new inputs with a trained run: a JSONL file in the folder format in, one JSON line per
input out (or the contrastive embeddings as ``.npz``).

Every input line is validated first (as training validates its splits), so a bad line stops
the command before anything is written, naming FILE:LINE; with ``skip_bad`` it is dropped and
counted. The inputs then go through the run's eval preprocessing (``data.pp_eval``, the
workdir's tokenizer) and the model runs data-parallel over all local devices. The output is
written to a temporary name and renamed when complete (``mmjax.files``); it may not lie inside
a training workdir.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mmjax import files
from mmjax.data import pipeline
from mmjax.inference import answer
from mmjax.runtime import parallel
from mmjax.trainer import runs
from mmjax.trainer import workdir as workdir_lib

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


def _rows(kind: str, out: Mapping[str, np.ndarray], run: runs.Run,
          top_k: int) -> Iterator[dict[str, Any]]:
    """The answer of each row of one batch, without its index."""
    if kind == "classification":
        probs = out["probs"]
        k = min(top_k, probs.shape[1])
        for p in probs:
            best = np.argsort(-p, kind="stable")[:k]
            yield {"predictions": [{"label": run.label_names[c], "score": float(p[c])}
                                   for c in best]}
    elif kind == "regression":
        for v in out["values"]:
            yield {"value": v.tolist()}
    else:  # caption
        for text in run.tokenizer.decode(out["tokens"]):
            yield {"text": text}


def _batch_size(run: runs.Run, batch_size: int) -> int:
    """``batch_size`` (default: the run's eval batch) rounded up to the local device count."""
    n = jax.local_device_count()
    bs = batch_size or int(run.config.get("eval_batch_size") or run.config.batch_size)
    return max(n, math.ceil(bs / n) * n)


def predict(workdir: str | Path, input_file: str | Path, output: str | Path, *,
            top_k: int = DEFAULT_TOP_K, step: str | int | None = None, batch_size: int = 0,
            skip_bad: bool = False, task: str = "", embed: bool = False,
            progress: bool = True) -> dict[str, Any]:
    """Writes the answers to ``output`` and returns ``{"output", "count", "skipped", "step",
    "task"}``. With ``embed`` the output is ``<output without suffix>.npz`` holding ``index``
    and ``<modality>_embeds`` [N, E] for the modalities the contrastive head embeds."""
    if top_k < 1:
        raise runs.RunError(f"--top_k={top_k} must be at least 1")
    out_path = Path(output).with_suffix(".npz") if embed else Path(output)
    workdir_lib.refuse_output_inside(out_path)
    run = runs.load(workdir, step)
    task, kind = runs.output_task(run.config, task, embed=embed)
    model = run.build_model()
    names = answer.input_names(model, task, kind)
    source, batches = pipeline.file_batches(
        run.config.data, input_file, batch_size=_batch_size(run, batch_size),
        tokenizer=run.tokenizer, skip_bad=skip_bad,
        modalities=tuple(names))
    par = parallel.MeshParallel(1)  # data-parallel over the devices, params replicated
    variables = par.put_state(run.variables())
    fn = par.compile_eval(answer.output_fn(model, task, kind))
    bar = _bar(len(source), enabled=progress)
    try:
        outputs = _outputs(batches, par, fn, variables, names, bar)
        with files.atomic_path(out_path) as tmp:
            if embed:
                embeds: dict[str, list[np.ndarray]] = {}
                for out in outputs:
                    for k, v in out.items():
                        embeds.setdefault(k, []).append(v)
                arrays = {k: np.concatenate(v) for k, v in embeds.items()}
                with open(tmp, "wb") as f:  # (numpy's stubs type savez's keywords as allow_pickle)
                    np.savez(f, index=np.asarray(source.indices, np.int64),
                             **arrays)  # type: ignore[arg-type]
            else:
                indices = iter(source.indices)
                with open(tmp, "w", encoding="utf-8") as f:
                    for out in outputs:
                        for row in _rows(kind, out, run, top_k):
                            f.write(json.dumps({"index": next(indices), **row}) + "\n")
    finally:
        if bar is not None:
            bar.close()
    return {"output": str(out_path), "count": len(source), "skipped": source.skipped,
            "step": run.step, "task": task}


def _outputs(batches: Iterator[dict], par: Any, fn: Any, variables: Any, names: Any,
             bar: Any) -> Iterator[dict[str, np.ndarray]]:
    """The model's answers on each batch, real rows only, as host arrays."""
    for batch in batches:
        keep = np.asarray(batch["valid"]) > 0
        inputs = par.put_batch(answer.model_inputs(batch, names))
        yield {k: np.asarray(v)[keep] for k, v in par.fetch(fn(variables, inputs)).items()}
        if bar is not None:
            bar.update(int(keep.sum()))


def _bar(total: int, *, enabled: bool) -> Any:
    """A progress bar on stderr for inputs longer than a few hundred examples."""
    if not enabled or total < 256:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="ex", file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
