"""A trained run read back from its workdir: config, checkpoint step, params, tokenizer, labels.

Everything here only reads the workdir (no lock, no new file), so it is safe while a run is
training in it. Params are read as host numpy from the checkpoint's own metadata, never with the
saved shardings, so a run written under any device count or parallel mode loads on this host.
The heads that answer new inputs, and the function that computes each one's answer, are here
too, so ``predict`` and ``export`` compute the same thing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import checkpoint, lora, parallel, weighting
from mmjax.data import pipeline
from mmjax.data.device import normalize_images
from mmjax.data.folder import LABELS_FILE
from mmjax.data.records import TOKENIZER_FILE
from mmjax.errors import ExplainedError
from mmjax.inference import quantize as quantize_lib
from mmjax.models.heads import CONTRASTIVE_KINDS
from mmjax.models.multimodal import MultimodalModel, build_model
from mmjax.trainer.state import primary_metric, tasks_from_config

log = logging.getLogger(__name__)

# head kind -> the name of what the model answers with (predict's field, export's output)
OUTPUTS = {"classification": "probs", "regression": "values", "caption": "tokens"}


class RunError(ValueError, ExplainedError):
    """The workdir, step or head asked for does not exist; the message names it."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One checkpoint of a training run and what its inputs and outputs need."""

    workdir: Path
    config: ml_collections.ConfigDict
    step: int
    params: dict[str, Any]  # as saved: may hold loss_weights/ and lora/ subtrees
    model_state: dict[str, Any]  # e.g. {"batch_stats": ...}
    tokenizer: Any
    label_names: list[str]

    def build_model(self, bn_axis_name: str | None = None) -> MultimodalModel:
        return build_model(self.config.model, bn_axis_name=bn_axis_name)

    def model_params(self, quantize: str = "") -> dict[str, Any]:
        """Plain model params (LoRA merged, loss weights dropped); ``quantize="int8"`` gives
        the int8 tree of ``mmjax.inference.quantize`` instead."""
        params = lora.merge(self.params) if lora.KEY in self.params else self.params
        params = {k: v for k, v in params.items() if k != weighting.PARAMS_KEY}
        return quantize_lib.quantize(params, quantize) if quantize else params

    def variables(self, quantize: str = "") -> dict[str, Any]:
        """``{"params", **model_state}`` for ``model.apply`` (int8 leaves when quantized)."""
        return {"params": self.model_params(quantize), **self.model_state}


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's ``config.json``: the config as trained, sizes filled in."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise RunError(f"{Path(workdir).absolute()} is not a training workdir: no config.json")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _logged_val_metrics(workdir: Path) -> dict[int, dict[str, Any]]:
    """Val lines of ``metrics.jsonl`` by step (the last line of a step wins: a resumed run logs
    its steps again); for checkpoints written before they kept their val metrics."""
    path = workdir / "metrics.jsonl"
    out: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("split") == "val":
                out[int(record["step"])] = record
    return out


def resolve_step(workdir: str | Path, step: str | int | None,
                 config: ml_collections.ConfigDict) -> int:
    """``None``/``"latest"``: the newest checkpoint; an int: that one; ``"best"``: the best by
    the run's validation metric (accuracy if a task classifies, else loss; ties: newest)."""
    workdir = Path(workdir)
    steps = checkpoint.saved_steps(workdir)
    if not steps:
        raise RunError(f"{workdir.absolute()}: no checkpoint under checkpoints/")
    if step in (None, "", "latest"):
        return max(steps)
    if str(step) != "best":
        if not str(step).isdigit() or int(step) not in steps:
            raise RunError(f"{workdir.absolute()}: no checkpoint step {step}; saved steps: "
                           f"{sorted(steps)} (or 'best')")
        return int(step)
    metric, mode = primary_metric(tasks_from_config(config))
    logged = _logged_val_metrics(workdir)
    scored = []
    for s, saved in steps.items():
        metrics = saved if saved is not None else logged.get(s)
        value = None if metrics is None else metrics.get(metric)
        if isinstance(value, int | float):
            scored.append((value if mode == "max" else -value, s))
    if not scored:
        raise RunError(f"{workdir.absolute()}: no checkpoint step has validation {metric}; "
                       f"saved steps: {sorted(steps)}")
    return max(scored)[1]


def _tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> Any:
    data = config.data
    if data.name not in pipeline.EMBEDDED and not data.get("tokenizer") \
            and not (workdir / TOKENIZER_FILE).is_file():
        raise RunError(f"{workdir.absolute()}: no {TOKENIZER_FILE} (the run's word-piece "
                       "tokenizer); it is written when training starts")
    return pipeline.build_tokenizer(data, workdir=workdir)


def load(workdir: str | Path, step: str | int | None = None) -> Run:
    """Reads checkpoint ``step`` (see :func:`resolve_step`) of the run in ``workdir``."""
    workdir = Path(workdir)
    config = read_config(workdir)
    step = resolve_step(workdir, step, config)
    state = checkpoint.read_state(workdir / "checkpoints" / str(step) / "state",
                                  ("params", "model_state"))
    if config.data.name == "folder" and not (workdir / LABELS_FILE).is_file():
        raise RunError(f"{workdir.absolute()}: no {LABELS_FILE} (the run's classes)")
    tokenizer = _tokenizer(config, workdir)
    log.info("%s: checkpoint step %d", workdir, step)
    return Run(workdir=workdir, config=config, step=step, params=state["params"],
               model_state=dict(state.get("model_state") or {}), tokenizer=tokenizer,
               label_names=pipeline.label_names(config.data, workdir=workdir))


def parallel_for(config: ml_collections.ConfigDict) -> Any:
    """The run's parallel mode on this host's devices; an FSDP size that does not divide the
    devices here becomes 1 (it only decides where params live, not what is computed)."""
    mode = config.parallel.mode
    fsdp = int(config.parallel.get("fsdp", 1) or 1)
    if mode == "mesh" and jax.device_count() % fsdp:
        log.info("parallel.fsdp=%d does not divide the %d devices here: using 1", fsdp,
                 jax.device_count())
        fsdp = 1
    return parallel.make_parallel(ml_collections.ConfigDict({"mode": mode, "fsdp": fsdp}))


def _kind(config: ml_collections.ConfigDict, task: str) -> str:
    heads = config.model.heads
    if task not in heads:
        raise RunError(f"no head named {task!r}; heads: {sorted(heads)}")
    return heads[task].kind


def output_task(config: ml_collections.ConfigDict, task: str = "", *,
                embed: bool = False) -> tuple[str, str]:
    """(task, kind) that answers new inputs: ``task`` if given, else the first task of
    ``config.losses`` that classifies, else one that regresses, else a caption head. With
    ``embed``, a contrastive head (``contrastive`` or ``siglip``)."""
    kinds = CONTRASTIVE_KINDS if embed else tuple(OUTPUTS)
    if task:
        kind = _kind(config, task)
        if kind not in kinds:
            hint = "" if embed or kind not in CONTRASTIVE_KINDS else \
                " (mmjax.predict --embed writes its embeddings)"
            raise RunError(f"head {task!r} is a {kind} head; this needs one of {list(kinds)}"
                           + hint)
        return task, kind
    order = list(config.losses) + [t for t in config.model.heads if t not in config.losses]
    for wanted in kinds:
        for t in order:
            if _kind(config, t) == wanted:
                return t, wanted
    heads = {t: config.model.heads[t].kind for t in config.model.heads}
    raise RunError(f"no head of kind {list(kinds)} to answer with; heads: {heads}"
                   + ("" if embed else "; a contrastive model answers mmjax.predict --embed"))


def input_names(model: MultimodalModel, task: str, kind: str) -> list[str]:
    """The batch entries (modalities) the answer of ``task`` reads: a caption head reads its
    image alone, every other head all the towers."""
    if kind == "caption":
        return [model.head(task).modality]
    if kind in CONTRASTIVE_KINDS:
        return [m for m in model.head(task).modalities if m in model.encoders]
    return list(model.encoders)


def output_fn(model: MultimodalModel, task: str, kind: str
              ) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, jax.Array]]:
    """``fn(variables, inputs) -> {name: array}``, traceable: class probabilities
    ``{"probs"}`` [B, C] (float32 softmax), regression ``{"values"}``, generated caption ids
    ``{"tokens"}`` [B, L], or the contrastive embeddings ``{"<modality>_embeds"}``. uint8
    images are scaled to [-1, 1] inside, as the train and eval steps do."""

    def fn(variables: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        variables = quantize_lib.dequantize(variables)
        inputs = normalize_images(inputs)
        if kind in CONTRASTIVE_KINDS:
            return model.apply(variables, inputs, task=task, method="embed")
        if kind == "caption":
            return {"tokens": model.apply(variables, inputs, task=task, method="generate")}
        out = model.apply(variables, inputs)[task]
        if kind == "classification":
            return {"probs": jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)}
        return {"values": out["predictions"].astype(jnp.float32)}

    return fn


def model_inputs(batch: Mapping[str, Any], names: list[str], *,
                 present: bool = True) -> dict[str, Any]:
    """The entries of a pipeline batch that the model reads (labels and ``valid`` dropped),
    with ``batch["present"]`` for those of them that some examples lack (``present=False``
    leaves it out: an exported function takes the arrays alone)."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise RunError(f"the inputs have no {missing[0]!r} (they hold {sorted(batch)})")
    out = {n: batch[n] for n in names}
    given = {m: v for m, v in (batch.get("present") or {}).items() if m in names}
    if present and given:
        out["present"] = given
    return out


def first_rows(run: Run, split: str, n: int) -> dict[str, Any]:
    """The first ``n`` examples of ``split`` (fewer if it is smaller), preprocessed as
    evaluation does, without padding rows."""
    batch = next(iter(pipeline.eval_batches(run.config.data, split, batch_size=n,
                                            tokenizer=run.tokenizer)))
    keep = np.asarray(batch.pop("valid")) > 0
    return jax.tree.map(lambda x: np.asarray(x)[keep], batch)
