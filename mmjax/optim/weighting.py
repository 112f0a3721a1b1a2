"""How the per-task losses combine: L = Σᵢ wᵢ(step, params)·Lᵢ (+ a regulariser).

Three choices, from ``config.loss_weighting`` (absent = fixed):

* ``kind="fixed"``: wᵢ = λᵢ, the task's value in ``config.losses``.
* per-task schedules, ``loss_weighting.schedules.<task> = {kind, start_value, end_value,
  start_step, end_step}``: wᵢ = λᵢ·sᵢ(step), where sᵢ holds ``start_value`` until ``start_step``,
  moves to ``end_value`` by ``end_step`` (``linear``, ``cosine``, or ``step``: a jump at
  ``start_step``) and holds it after. Typical use: ramp an auxiliary objective in or out, e.g.
  MIM from 1 to 0.1 over pretraining. Schedules combine with either kind.
* ``kind="uncertainty"``: learned homoscedastic-uncertainty weighting (Kendall, Gal &
  Cipolla, CVPR 2018) in the common log-variance form: L = Σᵢ λᵢ·(exp(-sᵢ)·Lᵢ + sᵢ), one
  learnable scalar sᵢ = log sigma_i^2 per task (initialised at ``init_log_var``, 0 = weight 1),
  kept in the train state's ``loss_weights`` (``loss_weights/<task>`` in the tree the
  optimizer updates, ``mmjax.optim.trainable``), so the optimizer trains it and checkpoints
  keep it. The effective weight λᵢ·exp(-sᵢ) shrinks for tasks whose loss stays high (noisy), and
  the +sᵢ term stops every sᵢ from growing without bound. (The paper writes 1/(2 sigma^2) for
  regression and 1/sigma^2 for classification; the single form here is the one most
  reimplementations use and treats all tasks alike, so λ still expresses any prior preference.)

The effective weight of every task is reported as ``<task>_weight`` next to ``<task>_loss`` in
the train and eval lines of ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.models import losses
from mmjax.optim import trainable

KINDS = ("fixed", "uncertainty")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")
PARAMS_KEY = trainable.LOSS_WEIGHTS  # the uncertainty weights' key in the optimizer's tree


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A task's weight multiplier as a function of the (0-based) optimizer step."""

    kind: str = "constant"
    start_value: float = 1.0
    end_value: float = 1.0
    start_step: int = 0
    end_step: int = 0

    def __call__(self, step: jax.typing.ArrayLike) -> jax.Array:
        return jnp.asarray(self.schedule()(step), jnp.float32)

    def schedule(self) -> optax.Schedule:
        """The optax schedule: ``start_value`` until ``start_step``, then to ``end_value``."""
        start, end = self.start_value, self.end_value
        if self.kind == "constant":
            return optax.constant_schedule(start)
        if self.kind == "step":
            return optax.join_schedules(
                [optax.constant_schedule(start), optax.constant_schedule(end)], [self.start_step])
        span = max(self.end_step - self.start_step, 1)
        if self.kind == "linear":
            return optax.linear_schedule(start, end, span, transition_begin=self.start_step)
        decay = optax.cosine_decay_schedule(1.0, span)  # 1 → 0 over the span
        return optax.join_schedules(
            [optax.constant_schedule(start), lambda s: end + (start - end) * decay(s)],
            [self.start_step])


@dataclasses.dataclass(frozen=True)
class Weighting:
    """Fixed λ per task, optional schedules, optional learned uncertainty weights."""

    lambdas: tuple[tuple[str, float], ...]
    kind: str = "fixed"
    schedules: tuple[tuple[str, Schedule], ...] = ()
    init_log_var: float = 0.0

    @property
    def learned(self) -> bool:
        return self.kind == "uncertainty"

    def scheduled(self, step: jax.typing.ArrayLike) -> dict[str, jax.Array]:
        """λᵢ·sᵢ(step) for every task (before any learned factor)."""
        sched = dict(self.schedules)
        out = {}
        for name, lam in self.lambdas:
            factor = sched[name](step) if name in sched else jnp.ones((), jnp.float32)
            out[name] = jnp.float32(lam) * factor
        return out

    def init_params(self) -> dict[str, jax.Array] | None:
        """The ``loss_weights`` params subtree (one scalar per task), or None when not learned."""
        if not self.learned:
            return None
        return {name: jnp.full((), self.init_log_var, jnp.float32) for name, _ in self.lambdas}

    def combine(
        self,
        per_task: Mapping[str, jax.Array],
        step: jax.typing.ArrayLike,
        params: Mapping[str, Any] | None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(total loss, {task: effective weight}) for the given per-task losses."""
        lam = self.scheduled(step)
        lam = {n: lam[n] for n in per_task}  # a subset of the tasks may be combined
        if not self.learned:
            return losses.weighted_total(per_task, lam), lam
        if params is None or PARAMS_KEY not in params:
            raise ValueError(
                f"loss_weighting.kind='uncertainty' needs params[{PARAMS_KEY!r}] "
                "(created by trainer.create_state)"
            )
        log_var = params[PARAMS_KEY]
        weights = {n: lam[n] * jnp.exp(-log_var[n]) for n in lam}
        regulariser = sum(lam[n] * log_var[n] for n in lam)
        return losses.weighted_total(per_task, weights) + regulariser, weights


def _schedule(task: str, spec: Mapping[str, Any]) -> Schedule:
    known = {f.name for f in dataclasses.fields(Schedule)}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(
            f"loss_weighting.schedules.{task} has unknown keys {sorted(unknown)}; "
            f"known: {sorted(known)}"
        )
    sched = Schedule(**dict(spec))
    if sched.kind not in SCHEDULE_KINDS:
        raise ValueError(
            f"loss_weighting.schedules.{task}.kind={sched.kind!r}; known: {SCHEDULE_KINDS}"
        )
    if sched.kind in ("linear", "cosine") and sched.end_step <= sched.start_step:
        raise ValueError(
            f"loss_weighting.schedules.{task}: end_step ({sched.end_step}) must be after "
            f"start_step ({sched.start_step})"
        )
    return sched


def from_config(config: Any, task_names: Sequence[str] | None = None) -> Weighting:
    """The weighting of a run: ``config.losses`` (λ) and ``config.loss_weighting`` (optional)."""
    lambdas = tuple((str(k), float(v)) for k, v in config.losses.items())
    names = [n for n, _ in lambdas] if task_names is None else list(task_names)
    cfg = config.get("loss_weighting") or {}
    kind = cfg.get("kind", "fixed") or "fixed"
    if kind not in KINDS:
        raise ValueError(f"loss_weighting.kind={kind!r}; known: {KINDS}")
    schedules = []
    for task, spec in (cfg.get("schedules") or {}).items():
        if task not in names:
            raise ValueError(
                f"loss_weighting.schedules.{task} names no task; tasks: {sorted(names)}"
            )
        spec = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
        schedules.append((str(task), _schedule(task, spec)))
    return Weighting(
        lambdas=lambdas,
        kind=kind,
        schedules=tuple(schedules),
        init_log_var=float(cfg.get("init_log_var", 0.0) or 0.0),
    )
