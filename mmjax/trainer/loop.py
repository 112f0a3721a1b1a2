"""Train and evaluate: ``setup`` builds what a run needs from its config, ``train_and_evaluate``
runs the loop (functions rather than a trainer class, as the flax examples do).

Resume order: the newest restorable checkpoint under ``WORKDIR/checkpoints`` gives the state and
the data-iterator position; ``metrics.jsonl`` is never read, only appended to. SIGTERM saves a
checkpoint at the current step and exits 0.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from mmjax import config as config_lib
from mmjax import evaluators as evaluators_lib
from mmjax import files
from mmjax.data import pipeline
from mmjax.errors import ExplainedError
from mmjax.io.checkpoint import Checkpointer
from mmjax.io.writers import MetricWriter, Progress
from mmjax.models.multimodal import MultimodalModel, build_model
from mmjax.optim import optimizers, weighting
from mmjax.runtime import parallel
from mmjax.trainer import distill as distill_lib
from mmjax.trainer import fit, transfer
from mmjax.trainer import step as step_lib
from mmjax.trainer import workdir as workdir_lib
from mmjax.trainer.state import (
    Task,
    TrainState,
    create_state,
    model_params,
    primary_metric,
    tasks_from_config,
)

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The weighted loss became NaN or infinite; the message names the step."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run is made of, built once from the config (which ``setup`` fills in)."""

    config: ml_collections.ConfigDict
    workdir: Path
    par: Any  # parallel.PmapParallel | parallel.MeshParallel
    model: MultimodalModel
    tasks: tuple[Task, ...]
    weights: weighting.Weighting
    tokenizer: Any
    data_info: Mapping[str, int]
    evaluators: Mapping[str, evaluators_lib.Evaluator]
    accum_steps: int
    schedule: optax.Schedule
    teacher: distill_lib.Teacher | None = None  # config.distill's, loaded once


def setup(config: ml_collections.ConfigDict, workdir: str | Path) -> Setup:
    """Validates the config against the devices and data, and builds the run's parts.

    The modules of ``config.imports`` are imported first (parts of your own register there).
    Towers of modalities the train records lack are removed (``fit.fit_to_data``), sizes left
    at 0 in ``config.model`` (vocabulary, classes) are filled in from the data, and towers with
    ``init_from`` take their architecture from it: ``config.json`` records the result.
    """
    config_lib.import_modules(config)
    par = parallel.make_parallel(config.parallel)
    n_dev = jax.device_count()
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size={config.batch_size} is not a multiple of the {n_dev} devices")
    accum_steps = int(config.get("grad_accum_steps", 1) or 1)
    if (config.batch_size // n_dev) % accum_steps:
        raise ValueError(f"grad_accum_steps={accum_steps} does not divide the per-device batch "
                         f"of {config.batch_size // n_dev}")
    transfer.apply_encoder_overrides(config, log)
    # The workdir keeps the tokenizer and label vocabulary built from train data, so that a
    # resumed run reads exactly the ids it trained with.
    distill_lib.adopt_tokenizer(config, workdir)
    tokenizer = pipeline.build_tokenizer(config.data, workdir=workdir)
    data_info = pipeline.dataset_info(config.data, tokenizer, workdir=workdir)
    fit.fit_to_data(config, pipeline.modalities(config.data))
    _fill_from_data(config, data_info)
    _fill_special_ids(config, tokenizer)
    return assemble(config, workdir, par=par, tokenizer=tokenizer, data_info=data_info,
                    label_names=pipeline.label_names(config.data, workdir=workdir),
                    accum_steps=accum_steps)


def assemble(config: ml_collections.ConfigDict, workdir: str | Path, *, par: Any,
             tokenizer: Any, data_info: Mapping[str, int], label_names: list[str],
             accum_steps: int = 1) -> Setup:
    """The run's parts from a config whose sizes are filled in (``setup``'s, or a workdir's
    ``config.json``): what training and ``mmjax.evaluate`` share."""
    tasks = tasks_from_config(config)
    model = build_model(config.model, bn_axis_name=par.axis_name)
    teacher = distill_lib.load(config, workdir, tasks=tasks, tokenizer=tokenizer,
                               label_names=label_names, accum_steps=accum_steps)
    evaluators = evaluators_lib.build(distill_lib.with_agreement(config), evaluators_lib.Env(
        model=model,
        model_cfg=config.model.to_dict(),
        data_config=config.data,
        tokenizer=tokenizer,
        label_names=label_names,
        batch_size=int(config.get("eval_batch_size") or config.batch_size),
        teacher=teacher,
    ))
    if evaluators and jax.process_count() > 1:
        log.warning("config.evals %s skipped: evaluators run on one process only (they copy "
                    "the params to one device), and this run has %d", sorted(evaluators),
                    jax.process_count())
        evaluators = {}
    return Setup(
        config=config, workdir=Path(workdir), par=par, model=model, tasks=tasks,
        weights=weighting.from_config(config, [t.name for t in tasks]), tokenizer=tokenizer,
        data_info=data_info, evaluators=evaluators, accum_steps=accum_steps,
        schedule=optimizers.make_schedule(config.optimizer, config.total_steps),
        teacher=teacher,
    )


def _fill_from_data(config: ml_collections.ConfigDict, info: Mapping[str, int]) -> None:
    """Sizes left at 0 in the config (vocabulary, classes) are taken from the data."""
    model = config.model
    for enc in model.encoders.values():  # a tower over token ids: the tokenizer's vocabulary
        if "vocab_size" in enc and not enc.get("vocab_size"):
            enc.vocab_size = info["vocab_size"]
    for head in model.heads.values():
        if head.get("kind") == "classification" and not head.get("num_classes"):
            head.num_classes = info["num_classes"]
        if "vocab_size" in head and not head.get("vocab_size"):  # MLM, captioning heads
            head.vocab_size = info["vocab_size"]


def _fill_special_ids(config: ml_collections.ConfigDict, tokenizer: Any) -> None:
    """Token ids of MLM and caption heads that the config leaves unset come from the tokenizer
    (a Hugging Face vocabulary puts [CLS], [SEP] and [MASK] elsewhere than mmjax's own)."""
    ids = {"mask_token_id": "MASK", "bos_id": "CLS", "eos_id": "SEP", "pad_id": "PAD"}
    wanted = {"mlm": ("mask_token_id",), "caption": ("bos_id", "eos_id", "pad_id")}
    with config.unlocked():
        for head in config.model.heads.values():
            for key in wanted.get(head.get("kind"), ()):
                value = getattr(tokenizer, ids[key], None)
                if key not in head and value is not None:
                    head[key] = int(value)
            if head.get("kind") == "mlm" and "special_ids" not in head:
                specials = [getattr(tokenizer, n, None) for n in ("PAD", "UNK", "CLS", "SEP")]
                head.special_ids = tuple(int(v) for v in specials if v is not None)


def initial_state(s: Setup) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh state with pretrained towers (``model.encoders.<modality>.init_from``) and then
    ``config.init_from`` (``init_subtrees`` of an earlier run) loaded over it."""
    batch = next(iter(pipeline.eval_batches(s.config.data, "val", batch_size=2)))
    batch = {k: v for k, v in batch.items() if k != "valid"}
    return create_state(s.model, s.config, batch, params_hook=lambda p: (
        transfer.apply_config_init_from(s.config, transfer.apply_init_from(s.config, p, log), log)
    ))


def compile_eval(s: Setup) -> Any:
    """The compiled eval step of the run (under the mesh path, after ``par.put_state``)."""
    return s.par.compile_eval(functools.partial(
        step_lib.eval_step, model=s.model, tasks=s.tasks, weights=s.weights,
        axis_name=s.par.axis_name))


def split_metrics(s: Setup, eval_fn: Any, state: Any, split: str, *,
             batch_fn: Callable[[dict], dict] | None = None) -> dict[str, float]:
    """Metrics of ``split``: means over its examples, plus every evaluator's metrics.

    The one implementation of val/test lines: ``mmjax.evaluate`` calls it too, with a state
    read from a checkpoint. ``batch_fn`` edits each host batch before the step sees it (an
    evaluation of changed inputs, e.g. a modality removed).
    """
    n_dev = jax.device_count()
    bs = max(n_dev, (s.config.get("eval_batch_size") or s.config.batch_size) // n_dev * n_dev)
    n_proc, index = jax.process_count(), jax.process_index()
    total: dict[str, float] = {}
    for batch in pipeline.eval_batches(s.config.data, split, batch_size=bs,
                                       tokenizer=s.tokenizer):
        if n_proc > 1:  # this process's share of the global batch
            n = len(batch["valid"]) // n_proc
            batch = jax.tree.map(lambda x, n=n: x[index * n: (index + 1) * n], batch)
        if batch_fn is not None:
            batch = batch_fn(batch)
        sums = s.par.fetch(eval_fn(state, s.par.put_batch(batch)))
        for k, v in sums.items():
            total[k] = total.get(k, 0.0) + float(v)
    count = max(total.pop("count"), 1.0)
    out = {k: v / count for k, v in total.items()}
    for t in s.tasks:  # contract: val/test lines of a classification task carry "accuracy"
        if t.loss == "softmax_xent":
            out.setdefault("accuracy", out[f"{t.name}_accuracy"])
    if s.evaluators:
        host = jax.device_get(s.par.state_for_checkpoint(state))
        variables = {"params": model_params(host.trainable()), **host.model_state}
        out.update(evaluators_lib.run_all(s.evaluators, variables, split))
    return out


class _Preemption:
    """SIGTERM (what schedulers send before killing a job) → save at the current step, exit 0.

    A lone process gets no preemption notice from Orbax, so the signal is caught here; with
    several processes Orbax's ``reached_preemption`` is also asked, so all stop at one step.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM received: saving a checkpoint and stopping")
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _source_losses(s: Setup, eval_fn: Any, state: Any, batch: Any, step: int
                   ) -> dict[str, float]:
    """``{"data/<source>_loss": l}`` for a ``data.mixture``: the loss of this step's rows from
    each source (eval mode, before the step's update); ``{}`` without a mixture."""
    masks = pipeline.source_masks(s.config.data, batch_size=s.config.batch_size,
                                  seed=s.config.seed, element=step - 1,
                                  process_index=jax.process_index(),
                                  process_count=jax.process_count())
    out = {}
    for name, valid in masks.items():
        sums = s.par.fetch(eval_fn(state, s.par.put_batch({**batch, "valid": valid})))
        out[f"data/{name}_loss"] = float(sums["loss"]) / max(float(sums["count"]), 1.0)
    return out


def _dropped_from(cfg: ml_collections.ConfigDict) -> int:
    """The first step (0-based) whose loss includes modality-dropped views."""
    if not cfg.model.get("modality_dropout", 0.0):
        return 0
    return round(cfg.model.get("modality_dropout_start", 0.0) * cfg.total_steps)


def _check_finite(window: list[tuple[int, dict[str, Any]]]) -> None:
    for step, m in window:
        value = float(m["loss"])
        if not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss ({value}) at step {step}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Trains to ``total_steps`` (resuming from the workdir's newest checkpoint), evaluates on
    val and test, and returns ``{"step", "val", "test", "wall_s", "last_checkpoint"}``.

    The workdir is locked for the whole run (``workdir.lock``): a second run on it stops before
    writing anything.
    """
    t_start = time.time()
    is_main = jax.process_index() == 0
    with workdir_lib.lock(workdir, enabled=is_main):
        try:
            summary = _run(config, Path(workdir), is_main)
        except OSError as e:
            if isinstance(e, ExplainedError):
                raise
            raise workdir_lib.WorkdirWriteError(
                f"cannot write to workdir {Path(workdir).absolute()}: {type(e).__name__}: {e}"
            ) from e
    summary["wall_s"] = time.time() - t_start
    if is_main and not summary.get("preempted"):
        name, val, test, nan = summary["metric"], summary["val"], summary["test"], float("nan")
        print(f"done: step {summary['step']}, val {name} {val.get(name, nan):.4f}, "
              f"test {name} {test.get(name, nan):.4f}, "
              f"wall {summary['wall_s']:.1f} s, workdir {workdir}", flush=True)
    return summary


def _run(config: ml_collections.ConfigDict, workdir: Path, is_main: bool) -> dict[str, Any]:
    s = setup(config, workdir)
    if is_main:
        # atomically: predict and evaluate may read it while this run trains
        files.write_atomic(s.workdir / "config.json", config.to_json_best_effort(indent=2))
    state, tx = initial_state(s)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log.info("model: %s parameters under %s", f"{n_params:,}", sorted(state.params))
    log.info("parallel: %s over %d devices (%d processes)%s", s.par.mode, jax.device_count(),
             jax.process_count(), f", mesh data={jax.device_count() // s.par.fsdp} x "
             f"fsdp={s.par.fsdp}" if s.par.mode == "mesh" else "")
    skipped = {k: v for k, v in s.data_info.items() if k.startswith("skipped_")}
    if any(skipped.values()):
        log.warning("skipped bad records (data.skip_bad=True): %s", skipped)

    metric_name, mode = primary_metric(s.tasks)
    ckpt = Checkpointer(s.workdir, best_metric=metric_name, best_mode=mode)
    writer = MetricWriter(s.workdir, enabled=is_main)
    bar = Progress(0, config.total_steps, enabled=is_main)
    data_iter = pipeline.train_iterator(
        config.data, batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    try:
        restored = ckpt.restore_latest(s.par.checkpoint_target(state))
        if restored is not None:
            step0, state, data_state = restored
            data_iter.set_state(data_state)
            log.info("resumed from checkpoint step %d", step0)
        with _Preemption() as preemption:
            summary = _loop(s, state, tx, data_iter, ckpt, writer, bar, preemption)
    finally:
        bar.close()  # before any error is printed: the error must be the last line
        try:
            ckpt.close()
        finally:
            writer.close()
    return {**summary, "metric": metric_name}


def _loop(s: Setup, state: TrainState, tx: optax.GradientTransformation,
          data_iter: Any, ckpt: Checkpointer, writer: MetricWriter, bar: Progress,
          preemption: _Preemption) -> dict[str, Any]:
    cfg, par = s.config, s.par
    total_steps = cfg.total_steps
    first_step = int(jax.device_get(state.step)) + 1
    dstate = par.put_state(state)
    del state
    common = dict(model=s.model, tasks=s.tasks, weights=s.weights, axis_name=par.axis_name)
    # A teacher's variables are a step argument (on device once), not a compiled-in constant.
    teacher = () if s.teacher is None else (par.put_frozen(s.teacher.variables),)
    train_fn = par.compile_train(functools.partial(
        step_lib.train_step, tx=tx, accum_steps=s.accum_steps,
        distill=s.teacher.spec if s.teacher else None,
        dropped_from=_dropped_from(cfg), **common), *teacher)
    eval_fn = compile_eval(s)
    window: list[tuple[int, Any]] = []
    val: dict[str, float] = {}
    last_saved = first_step - 1
    bar.update(first_step - 1)
    t_log, steps_since = time.time(), 0
    host_batch = next(data_iter) if first_step <= total_steps else None
    next_batch = par.put_batch(host_batch) if host_batch is not None else None
    for step in range(first_step, total_steps + 1):
        log_now = step % cfg.log_every == 0 or step == total_steps
        by_source = _source_losses(s, eval_fn, dstate, host_batch, step) if log_now else {}
        dstate, metrics = train_fn(dstate, next_batch, *teacher)
        window.append((step, metrics))
        steps_since += 1
        data_state = data_iter.get_state()
        if step < total_steps:  # the host prepares the next batch while the device computes
            host_batch = next(data_iter)
            next_batch = par.put_batch(host_batch)
        stop = preemption.requested or (
            jax.process_count() > 1 and ckpt.manager.reached_preemption(step))
        if log_now or stop:
            fetched = [(i, par.fetch(m)) for i, m in window]
            _check_finite(fetched)
            record = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]}
            now = time.time()
            record["steps_per_s"] = steps_since / max(now - t_log, 1e-9)
            record["lr"] = float(s.schedule(step - 1))
            record.update(pipeline.source_fractions(  # data.mixture: the window's rows
                cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, start=fetched[0][0] - 1,
                stop=step))
            record.update(by_source)
            writer.write(step, "train", record)
            bar.update(step, record["loss"], record["steps_per_s"])
            window, t_log, steps_since = [], now, 0
        if stop:
            ckpt.save(step, par.state_for_checkpoint(dstate), data_state)
            ckpt.wait()
            log.warning("preempted: checkpoint saved at step %d; rerun to resume", step)
            return {"step": step, "preempted": True, "last_checkpoint": step}
        eval_now = step % cfg.eval_every == 0 or step == total_steps
        if eval_now:
            val = split_metrics(s, eval_fn, dstate, "val")
            writer.write(step, "val", val)
            bar.note(f"step {step} val " + " ".join(
                f"{k}={v:.4f}" for k, v in val.items() if k.endswith(("accuracy", "loss"))))
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            if window:
                _check_finite([(i, par.fetch(m)) for i, m in window])
            ckpt.save(step, par.state_for_checkpoint(dstate), data_state,
                      val if eval_now else None)
            last_saved = step
    final_step = max(total_steps, first_step - 1)
    if not val:  # nothing trained in this call (already at total_steps): still report
        val = split_metrics(s, eval_fn, dstate, "val")
        writer.write(final_step, "val", val)
    test = split_metrics(s, eval_fn, dstate, "test")
    writer.write(final_step, "test", test)
    return {"step": final_step, "val": val, "test": test, "last_checkpoint": last_saved}
