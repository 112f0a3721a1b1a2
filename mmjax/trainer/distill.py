"""Distillation from a trained run (big_vision's "patient and consistent teacher").

``config.distill = {teacher: WORKDIR, weight, temperature, step, task}``: the teacher run's
model and params are loaded once and stay frozen; inside the jitted train step it runs on the
very batch the student sees (same augmentation: "consistent"), and the student's loss gets

    weight · T² · KL(softmax(teacher_logits / T) ‖ softmax(student_logits / T))

on one classification head (Hinton et al. 2015; the T² keeps the gradient scale independent of
T). The term is logged as ``<task>_distill_loss`` (T²·KL, before ``weight``); the weighted
``loss`` includes ``weight`` times it. The teacher params enter the step as an argument (a
device-resident tree), never as a compiled-in constant, and are not part of the checkpoint: a
resumed run reloads them from the teacher's workdir.

The teacher may have another architecture than the student, but it must read the same inputs
(data kind, image size, text length, eval preprocessing, tokenizer) and answer over the same
label vocabulary; :func:`load` checks that and names the first mismatch. A student that trains
its own word-piece tokenizer starts from the teacher's (:func:`adopt_tokenizer`), and val/test
lines get an ``agreement`` evaluator (:func:`with_agreement`). docs/training.md has the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mmjax import files
from mmjax.data.records import TOKENIZER_FILE
from mmjax.errors import ExplainedError
from mmjax.models.multimodal import MultimodalModel
from mmjax.trainer import runs
from mmjax.trainer.state import Task

log = logging.getLogger(__name__)

# data keys that decide what a model's inputs look like; they must agree between the runs
INPUT_KEYS = ("name", "image_size", "max_len", "pp_eval", "text")


class DistillError(ValueError, ExplainedError):
    """``config.distill`` names a teacher that cannot teach this student; says why."""


def kl_term(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float,
            valid: jax.Array | None = None) -> jax.Array:
    """T² · mean over (valid) examples of KL(softmax(teacher/T) ‖ softmax(student/T))."""
    t = jnp.asarray(temperature, jnp.float32)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    per_example = optax.losses.kl_divergence_with_log_targets(log_p_s, log_p_t)
    w = jnp.ones(per_example.shape, jnp.float32) if valid is None else \
        jnp.asarray(valid, jnp.float32).reshape(per_example.shape)
    return t * t * jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1e-12)


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the step needs besides the teacher's variables (static under jit)."""

    model: MultimodalModel  # the teacher's model
    teacher_task: str  # the teacher's classification head
    task: str  # the student's classification head
    weight: float
    temperature: float

    def teacher_logits(self, variables: Mapping[str, Any], batch: Mapping[str, Any]
                       ) -> jax.Array:
        """The frozen teacher's logits on ``batch`` (eval mode, no gradient)."""
        out: Any = self.model.apply(variables, batch, train=False)
        return jax.lax.stop_gradient(out[self.teacher_task]["logits"])

    def add_term(self, total: jax.Array, metrics: dict[str, jax.Array],
                 outputs: Mapping[str, Any], batch: Mapping[str, Any],
                 teacher: Mapping[str, Any]) -> jax.Array:
        """``total + weight·T²·KL``; writes ``<task>_distill_loss`` and the new ``loss``."""
        term = kl_term(outputs[self.task]["logits"], self.teacher_logits(teacher, batch),
                       self.temperature, batch.get("valid"))
        metrics[f"{self.task}_distill_loss"] = term
        metrics["loss"] = total = total + self.weight * term
        return total


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A loaded teacher: the step's ``spec`` and its host ``variables`` ({"params", ...})."""

    spec: Spec
    variables: dict[str, Any]
    workdir: Path
    step: int


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.distill.teacher`` names a teacher (configs from before it: no)."""
    return bool((config.get("distill") or {}).get("teacher"))


def adopt_tokenizer(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """A student that trains its own word-piece tokenizer (``data.tokenizer`` empty) starts
    from the teacher's instead (copied into its workdir, where a resumed run finds it), so both
    read a text as the same ids even when the student trains on fewer texts."""
    if not enabled(config) or config.data.get("tokenizer") or config.data.name == "shapes":
        return
    theirs = Path(config.distill.teacher) / TOKENIZER_FILE
    mine = Path(workdir) / TOKENIZER_FILE
    if theirs.is_file() and not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_path(mine) as tmp:  # processes of one run may copy at once
            shutil.copyfile(theirs, tmp)
        log.info("distill: the student reads text with the teacher's %s", theirs)


def with_agreement(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.evals``, plus ``distill: {kind: agreement}`` when a teacher is set and no
    evaluator reports agreement yet (a locked config cannot gain an ``evals`` key from flags)."""
    evals = {k: v.to_dict() if hasattr(v, "to_dict") else dict(v)
             for k, v in (config.get("evals") or {}).items()}
    if enabled(config) and not any(v.get("kind") == "agreement" for v in evals.values()):
        evals.setdefault("distill", {"kind": "agreement"})
    return evals


def _student_task(cfg: Mapping[str, Any], tasks: tuple[Task, ...]) -> str:
    classifying = [t.name for t in tasks if t.cfg.get("kind") == "classification"]
    task = cfg.get("task") or (classifying[0] if classifying else "")
    if not task or task not in classifying:
        raise DistillError(f"distill.task={task!r}: distillation needs a classification task of "
                           f"config.losses; this run's are {classifying}")
    return task


def _vocab(tokenizer: Any) -> list[str]:
    """Every token id's text: two tokenizers with equal lists give equal ids."""
    return tokenizer.decode(np.arange(tokenizer.vocab_size)[:, None])


def check_compatible(teacher: runs.Run, teacher_model: MultimodalModel, *,
                     data: ml_collections.ConfigDict, tokenizer: Any,
                     label_names: list[str], num_classes: int, teacher_task: str) -> None:
    """Raises :class:`DistillError` naming the first way ``teacher`` reads other inputs or
    answers over other labels than the student."""
    where = f"distill.teacher={teacher.workdir}"
    tdata = teacher.config.data
    for key in INPUT_KEYS:
        mine, theirs = data.get(key), tdata.get(key)
        if (mine is not None or theirs is not None) and mine != theirs:
            raise DistillError(f"{where}: the teacher was trained with data.{key}={theirs!r}, "
                               f"this run has {mine!r}; it must see the same inputs")
    if "text" in teacher_model.encoders and _vocab(teacher.tokenizer) != _vocab(tokenizer):
        raise DistillError(f"{where}: the teacher's tokenizer ({teacher.tokenizer.vocab_size} "
                           f"ids) differs from this run's ({tokenizer.vocab_size}); give the "
                           "same data.tokenizer or train texts")
    if list(teacher.label_names) != list(label_names):
        diff = sorted(set(teacher.label_names) ^ set(label_names))
        raise DistillError(
            f"{where}: the teacher's label vocabulary differs from this run's "
            f"({len(teacher.label_names)} vs {len(label_names)} labels"
            + (f"; only in one: {diff[:5]}" if diff else "; same labels in another order")
            + "): teacher and student must answer over the same classes")
    theirs = int(teacher.config.model.heads[teacher_task].get("num_classes") or 0)
    if theirs != num_classes:
        raise DistillError(f"{where}: the teacher's head {teacher_task!r} has {theirs} classes, "
                           f"this run's {num_classes}")


def load(config: ml_collections.ConfigDict, workdir: str | Path, *, tasks: tuple[Task, ...],
         tokenizer: Any, label_names: list[str], accum_steps: int = 1) -> Teacher | None:
    """The teacher of ``config.distill`` (``None`` when ``distill.teacher`` is empty), checked
    against the student's data, tokenizer, labels and classification head."""
    if not enabled(config):
        return None
    cfg = config.distill
    path = Path(cfg.teacher)
    if path.resolve() == Path(workdir).resolve():
        raise DistillError(f"distill.teacher={cfg.teacher} is this run's own workdir")
    weight, temperature = float(cfg.get("weight", 1.0)), float(cfg.get("temperature", 1.0))
    if weight < 0 or temperature <= 0:
        raise DistillError(f"distill.weight={weight} must be >= 0 and distill.temperature="
                           f"{temperature} > 0")
    if accum_steps > 1:
        raise DistillError(f"distill.teacher does not support grad_accum_steps={accum_steps} "
                           "yet: use 1")
    task = _student_task(cfg, tasks)
    try:
        run = runs.load(path, cfg.get("step") or None)
        teacher_task, kind = runs.output_task(run.config)
    except runs.RunError as e:
        raise DistillError(f"distill.teacher={cfg.teacher}: {e}") from e
    if kind != "classification":
        raise DistillError(f"distill.teacher={cfg.teacher} has no classification head "
                           f"(its answer is a {kind} head {teacher_task!r})")
    model = run.build_model()
    student_head = next(t.cfg for t in tasks if t.name == task)
    check_compatible(run, model, data=config.data, tokenizer=tokenizer,
                     label_names=label_names, num_classes=int(student_head["num_classes"]),
                     teacher_task=teacher_task)
    log.info("distill: teacher %s step %d (head %r) → %r, weight %g, temperature %g",
             path, run.step, teacher_task, task, weight, temperature)
    spec = Spec(model=model, teacher_task=teacher_task, task=task, weight=weight,
                temperature=temperature)
    return Teacher(spec=spec, variables=run.variables(), workdir=path, step=run.step)
