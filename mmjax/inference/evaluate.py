"""Evaluate a checkpoint of a run again, with the trainer's own evaluation code.

The run's config, tokenizer and labels come from its workdir; ``trainer.loop.assemble`` builds
the same ``Setup`` training built, and ``trainer.loop.evaluate`` produces the metrics, so for a
checkpoint that training evaluated the numbers are those of its ``metrics.jsonl`` line. Options
that change what is evaluated are edits of the state (or, through ``batch_fn``, of each batch)
applied in :func:`evaluate` before that one call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mmjax import weighting
from mmjax.data.records import SPLITS
from mmjax.inference import quantize as quantize_lib
from mmjax.inference import run as run_lib
from mmjax.trainer import loop
from mmjax.trainer.state import TrainState

log = logging.getLogger(__name__)


def _quantized_params(run: run_lib.Run, mode: str) -> dict[str, Any]:
    """The run's params with the model's weights through int8 and back (what an int8 export
    computes with); learned loss weights kept, so the weighted ``loss`` is the run's own."""
    quantized = run.model_params(mode)
    summary = quantize_lib.summary(quantized)
    params = quantize_lib.dequantize(quantized)
    if weighting.PARAMS_KEY in run.params:
        params = {**params, weighting.PARAMS_KEY: run.params[weighting.PARAMS_KEY]}
    log.info("%s: %d weight leaves (%s elements) through int8", mode,
             summary["quantized_leaves"], f"{summary['quantized_elements']:,}")
    return params


def evaluate(workdir: str | Path, *, split: str = "test", step: str | int | None = None,
             quantize: str = "") -> dict[str, Any]:
    """``{"step", "split", **metrics}`` of checkpoint ``step`` (default: the newest) on
    ``split``: the keys and values a training line of that split carries."""
    if split not in SPLITS:
        raise run_lib.RunError(f"--split={split!r}; expected one of {SPLITS}")
    run = run_lib.load(workdir, step)
    par = run_lib.parallel_for(run.config)
    info = {"vocab_size": run.tokenizer.vocab_size, "num_classes": len(run.label_names)}
    s = loop.assemble(run.config, run.workdir, par=par, tokenizer=run.tokenizer,
                      data_info=info, label_names=run.label_names)
    # The float path evaluates the params exactly as saved (LoRA adapters applied inside the
    # step, as in training), so its numbers are training's to the last bit.
    params = _quantized_params(run, quantize) if quantize else run.params
    state = TrainState(step=np.asarray(run.step, np.int32), params=params, opt_state=None,
                       model_state=run.model_state, rng=None)
    state = par.put_state(state)
    metrics = loop.evaluate(s, loop.compile_eval(s), state, split)
    out = {"step": run.step, "split": split, **metrics}
    if quantize:
        out["quantize"] = quantize
    return out
