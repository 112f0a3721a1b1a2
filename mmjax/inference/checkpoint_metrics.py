"""Evaluate a checkpoint of a run again, with the trainer's own evaluation code.

The run's config, tokenizer and labels come from its workdir; ``trainer.loop.assemble`` builds
the same ``Setup`` training built, and ``trainer.loop.split_metrics`` produces the metrics, so for a
checkpoint that training evaluated the numbers are those of its ``metrics.jsonl`` line. Options
that change what is evaluated are edits of the state (or, through ``batch_fn``, of each batch)
applied in :func:`evaluate` before that one call. Robustness options (``mmjax.robust``) are
batch edits too: ``drop`` marks modalities absent, each ``corrupt`` spec is one more pass over
the split with corrupted inputs, and ``attack`` runs FGSM/PGD on the classification head.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmjax.data import pipeline
from mmjax.data.records import SPLITS
from mmjax.inference import quantize as quantize_lib
from mmjax.robust import attacks as attacks_lib
from mmjax.robust import corruptions, drop
from mmjax.trainer import loop, runs
from mmjax.trainer.state import TrainState

log = logging.getLogger(__name__)


def _quantized_params(run: runs.Run, mode: str) -> dict[str, Any]:
    """The run's params (adapters merged) with the model's weights through int8 and back:
    what an int8 export computes with."""
    quantized = quantize_lib.quantize(run.model_params(), mode)
    summary = quantize_lib.summary(quantized)
    log.info("%s: %d weight leaves (%s elements) through int8", mode,
             summary["quantized_leaves"], f"{summary['quantized_elements']:,}")
    return quantize_lib.dequantize(quantized)


def _chain(*fns: Callable[[dict], dict] | None) -> Callable[[dict], dict] | None:
    chain = [f for f in fns if f is not None]
    if not chain:
        return None

    def fn(batch: dict) -> dict:
        for f in chain:
            batch = f(batch)
        return batch

    return fn


def _attacks(run: runs.Run, split: str, batch_size: int, *, method: str,
             eps: Sequence[float], steps: int, step_size: float | None, quantize: str,
             dropped: Sequence[str], batch_fn: Callable[[dict], dict] | None
             ) -> dict[str, dict[str, float]]:
    """``{"method:modalities:eps": robust accuracy entry}``: each attackable modality alone,
    then all of them together when there are several."""
    task, kind = runs.output_task(run.config)
    if kind != "classification":
        raise attacks_lib.AttackError(f"--attack needs a classification head; {task!r} is a "
                                      f"{kind} head")
    model = run.build_model()
    names = [m for m in attacks_lib.targets(model.encoders) if m not in dropped]
    sets = [[m] for m in names] + ([names] if len(names) > 1 else [])
    if not sets:
        raise attacks_lib.AttackError(
            f"--attack: no modality to attack (the model's {list(model.encoders)} declare no "
            f"attack, or are dropped: {list(dropped)})")
    variables = quantize_lib.dequantize(quantize_lib.quantized_variables(run.variables(), quantize))
    out = {}
    for mods in sets:
        for e in eps:
            batches = pipeline.eval_batches(run.config.data, split, batch_size=batch_size,
                                            tokenizer=run.tokenizer)
            if batch_fn is not None:
                batches = map(batch_fn, batches)
            out[f"{method}:{'+'.join(mods)}:{e:g}"] = attacks_lib.robust_accuracy(
                model, variables, batches, task=task, names=mods,
                method=method, eps=e, steps=steps, step_size=step_size)
    return out


def checkpoint_metrics(workdir: str | Path, *, split: str = "test", step: str | int | None = None,
             quantize: str = "", drop_modalities: Sequence[str] | str = (), corrupt: str = "",
             attack: str = "", eps: Sequence[float] = (), steps: int = 10,
             step_size: float | None = None) -> dict[str, Any]:
    """``{"step", "split", **metrics}`` of checkpoint ``step`` (default: the newest) on
    ``split``: the keys and values a training line of that split carries.

    ``drop_modalities`` evaluates with those modalities marked absent (``batch["present"]``);
    ``corrupt`` (``"name:severity,..."``) adds ``"corrupt": {"name:severity": metrics}``;
    ``attack`` (``"fgsm"``/``"pgd"``, with ``eps``) adds ``"attack": {"method:mods:eps":
    {"accuracy", ...}}``. docs/inference.md describes the entries.
    """
    if split not in SPLITS:
        raise runs.RunError(f"--split={split!r}; expected one of {SPLITS}")
    specs = corruptions.parse_specs(corrupt) if corrupt else []
    if attack and attack not in attacks_lib.METHODS:
        raise attacks_lib.AttackError(f"--attack={attack!r}; expected one of "
                                      f"{attacks_lib.METHODS}")
    if attack and not eps:
        raise attacks_lib.AttackError("--attack needs --eps (e.g. --eps=0.0314 for 8/255)")
    if eps and not attack:
        raise attacks_lib.AttackError(f"--eps={list(eps)} without --attack (fgsm or pgd)")
    if step_size is not None and attack != "pgd":
        raise attacks_lib.AttackError(f"--step_size={step_size} is a PGD option; --attack is "
                                      f"{attack or 'not set'}")
    run = runs.load(workdir, step)
    par = runs.parallel_for(run.config)
    info = {"vocab_size": run.tokenizer.vocab_size, "num_classes": len(run.label_names)}
    s = loop.assemble(run.config, run.workdir, par=par, tokenizer=run.tokenizer,
                      data_info=info, label_names=run.label_names)
    dropped = drop.parse_drop(drop_modalities, s.model.encoders)
    drop_fn = drop.batch_drop(dropped) if dropped else None
    if dropped and s.evaluators:
        # Evaluators read the split themselves, unchanged: their metrics would describe the
        # inputs with every modality present.
        log.info("--drop: evaluators %s not run", sorted(s.evaluators))
        s = dataclasses.replace(s, evaluators={})
    # The float path evaluates the params exactly as saved (LoRA adapters applied inside the
    # step, as in training), so its numbers are training's to the last bit; learned loss
    # weights are kept either way, so the weighted ``loss`` is the run's own.
    state = TrainState(step=np.asarray(run.step, np.int32), params=run.params, opt_state=None,
                       model_state=run.model_state, rng=None, adapters=run.adapters,
                       loss_weights=run.loss_weights)
    if quantize:
        state = state.replace(params=_quantized_params(run, quantize), adapters=None)
    state = par.put_state(state)
    eval_fn = loop.compile_eval(s)
    metrics = loop.split_metrics(s, eval_fn, state, split, batch_fn=drop_fn)
    out = {"step": run.step, "split": split, **metrics}
    if quantize:
        out["quantize"] = quantize
    if dropped:
        out["drop"] = list(dropped)
    if specs:
        plain = dataclasses.replace(s, evaluators={})  # evaluators would see clean inputs
        seed = int(run.config.get("seed", 0))
        out["corrupt"] = {
            f"{name}:{sev}": loop.split_metrics(plain, eval_fn, state, split, batch_fn=_chain(
                drop_fn, corruptions.batch_corruption(name, sev, tokenizer=run.tokenizer,
                                                      seed=seed)))
            for name, sev in specs}
    if attack:
        bs = int(run.config.get("eval_batch_size") or run.config.batch_size)
        out["attack"] = _attacks(run, split, bs, method=attack, eps=eps, steps=steps,
                                 step_size=step_size, quantize=quantize, dropped=dropped,
                                 batch_fn=drop_fn)
    return out
