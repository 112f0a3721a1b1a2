"""A trained run read back from its workdir: config, checkpoint step, params, tokenizer, labels,
and the head that answers new inputs.

Everything here only reads the workdir (no lock, no new file), so it is safe while a run is
training in it. Params are read as host numpy from the checkpoint's own metadata, never with the
saved shardings, so a run written under any device count or parallel mode loads on this host.
``mmjax.inference`` answers with what it reads here; distillation loads its teacher with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections

from mmjax import config as config_lib
from mmjax.data import pipeline
from mmjax.data.folder import LABELS_FILE
from mmjax.data.records import TOKENIZER_FILE
from mmjax.errors import ExplainedError
from mmjax.io import checkpoint
from mmjax.models.heads import CONTRASTIVE_KINDS
from mmjax.models.multimodal import MultimodalModel, build_model
from mmjax.optim import lora, trainable
from mmjax.runtime import parallel
from mmjax.trainer.state import primary_metric, tasks_from_config

log = logging.getLogger(__name__)

# head kind -> the name of what the model answers with (predict's field, export's output)
OUTPUTS = {"classification": "probs", "regression": "values", "caption": "tokens"}


class RunError(ValueError, ExplainedError):
    """The workdir, step or head asked for does not exist; the message names it."""


class RunFileError(RunError):
    """A file of the workdir (``config.json``, ``tokenizer.json``) is damaged or cut short; the
    message names it. (A damaged ``labels.json`` is named by ``mmjax.data.folder``.)"""


def _read_json(path: Path) -> dict[str, Any]:
    """``path``'s JSON object; :class:`RunFileError` naming the file otherwise."""
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, Python's int-str limit
        raise RunFileError(f"{path.absolute()} is damaged or cut short: not valid JSON "
                           f"({e})") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{path.absolute()} is damaged: expected a JSON object, got "
                           f"{type(value).__name__}")
    return value


@dataclasses.dataclass(frozen=True)
class Run:
    """One checkpoint of a training run and what its inputs and outputs need."""

    workdir: Path
    config: ml_collections.ConfigDict
    step: int
    params: dict[str, Any]  # the model's own, as saved
    model_state: dict[str, Any]  # e.g. {"batch_stats": ...}
    tokenizer: Any
    label_names: list[str]
    adapters: Any = None  # LoRA adapters, if the run has them
    loss_weights: Any = None  # learned loss weights, if the run has them

    def build_model(self, bn_axis_name: str | None = None) -> MultimodalModel:
        return build_model(self.config.model, bn_axis_name=bn_axis_name)

    def model_params(self) -> dict[str, Any]:
        """The params inference applies: LoRA adapters merged into their kernels."""
        return lora.merge(trainable.join(self.params, self.adapters))

    def variables(self) -> dict[str, Any]:
        """``{"params", **model_state}`` for ``model.apply``."""
        return {"params": self.model_params(), **self.model_state}


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's ``config.json``: the config as trained, sizes filled in."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise RunError(f"{Path(workdir).absolute()} is not a training workdir: no config.json")
    return ml_collections.ConfigDict(_read_json(path))


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
    saved = workdir / TOKENIZER_FILE
    if data.name not in pipeline.EMBEDDED and not data.get("tokenizer") and saved.is_file():
        _read_json(saved)  # a cut-short file named here, not deep in the tokenizers library
    return pipeline.build_tokenizer(data, workdir=workdir)


def load(workdir: str | Path, step: str | int | None = None) -> Run:
    """Reads checkpoint ``step`` (see :func:`resolve_step`) of the run in ``workdir``."""
    workdir = Path(workdir)
    config = read_config(workdir)
    config_lib.import_modules(config)  # parts of your own that the run was trained with
    step = resolve_step(workdir, step, config)
    state = checkpoint.read_state(workdir / "checkpoints" / str(step) / "state",
                                  (*trainable.SAVED, "model_state"))
    params, adapters, loss_weights = trainable.from_saved(state)
    if config.data.name == "folder" and not (workdir / LABELS_FILE).is_file():
        raise RunError(f"{workdir.absolute()}: no {LABELS_FILE} (the run's classes)")
    tokenizer = _tokenizer(config, workdir)
    log.info("%s: checkpoint step %d", workdir, step)
    return Run(workdir=workdir, config=config, step=step, params=params,
               model_state=dict(state.get("model_state") or {}), tokenizer=tokenizer,
               label_names=pipeline.label_names(config.data, workdir=workdir),
               adapters=adapters, loss_weights=loss_weights)


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
