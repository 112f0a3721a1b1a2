"""Train state, the pure train/eval steps, and the train-and-evaluate loop.

The steps are module-level pure functions whose dependencies (model, optimizer, tasks) are bound
with ``functools.partial`` and which are then ``jax.pmap``-ed over all local devices with
``axis_name="data"``: gradients and metrics are averaged with ``lax.pmean``, the state is donated,
and the per-step rng is ``fold_in(rng, step)`` (then the device index, so dropout differs per
replica). Metrics stay on device until a log step.

Resume order: the newest restorable checkpoint under ``WORKDIR/checkpoints`` gives the state and
the data-iterator position; ``metrics.jsonl`` is never read, only appended to.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from mmjax import losses as losses_lib
from mmjax import optim, parallel
from mmjax.checkpoint import Checkpointer
from mmjax.data import pipeline
from mmjax.models.multimodal import build_model, loss_spec
from mmjax.writers import MetricWriter

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The weighted loss became NaN or infinite; the message names the step."""


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes. ``rng`` holds raw uint32 key data so Orbax saves it."""

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections, e.g. {"batch_stats": ...}
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class Task:
    """One weighted term of the loss: head ``name``, loss function name, λ, head config."""

    name: str
    loss: str
    weight: float
    cfg: Mapping[str, Any]


def tasks_from_config(config: ml_collections.ConfigDict) -> tuple[Task, ...]:
    """``config.losses`` (task → λ) joined with ``config.model.heads`` (task → head)."""
    heads = config.model.heads
    tasks = []
    for name, weight in config.losses.items():
        if name not in heads:
            raise ValueError(f"losses.{name} has no head: add model.heads.{name}")
        cfg = heads[name].to_dict()
        loss = loss_spec(cfg)
        losses_lib.get_loss(loss)  # fail now, naming the loss, rather than inside jit
        tasks.append(Task(name, loss, float(weight), cfg))
    if not tasks:
        raise ValueError("config.losses is empty: nothing to train")
    return tuple(tasks)


def compute_losses(
    params: Any,
    model_state: Any,
    batch: Mapping[str, Any],
    rng: jax.Array | None,
    *,
    model: Any,
    tasks: tuple[Task, ...],
    train: bool,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """Weighted total L = Σ λ·L_task, with each task's loss and metrics, and the new model state."""
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if rng is not None else {}
    if train and model_state:
        outputs, new_state = model.apply(
            variables, batch, train=True, rngs=rngs, mutable=list(model_state)
        )
    else:
        outputs, new_state = model.apply(variables, batch, train=train, rngs=rngs), model_state
    metrics: dict[str, jax.Array] = {}
    per_task = {}
    for t in tasks:
        value, task_metrics = losses_lib.get_loss(t.loss)(outputs[t.name], batch, t.cfg)
        per_task[t.name] = value
        metrics[f"{t.name}_loss"] = value
        metrics.update({f"{t.name}_{k}": v for k, v in task_metrics.items()})
    total = losses_lib.weighted_total(per_task, {t.name: t.weight for t in tasks})
    metrics["loss"] = total
    return total, (metrics, new_state)


def train_step(
    state: TrainState,
    batch: Mapping[str, Any],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    tasks: tuple[Task, ...],
    axis_name: str | None = parallel.AXIS,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on this device's share of the batch; pure, so it can be pmapped."""
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
    (_, (metrics, model_state)), grads = grad_fn(
        state.params, state.model_state, batch, rng, model=model, tasks=tasks, train=True
    )
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    if axis_name is not None:
        metrics = lax.pmean(metrics, axis_name)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state
    )
    return new_state, metrics


def eval_step(
    state: TrainState,
    batch: Mapping[str, Any],
    *,
    model: Any,
    tasks: tuple[Task, ...],
    axis_name: str | None = parallel.AXIS,
) -> dict[str, jax.Array]:
    """Sums of per-example metrics over the valid examples of the batch, and their count."""
    _, (metrics, _) = compute_losses(
        state.params, state.model_state, batch, None, model=model, tasks=tasks, train=False
    )
    n = batch["valid"].sum()
    sums = {k: jnp.where(n > 0, v * n, 0.0) for k, v in metrics.items()}
    sums["count"] = n
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums


def primary_metric(tasks: tuple[Task, ...]) -> tuple[str, str]:
    """(name, "max"|"min") used for the best checkpoint: accuracy if any task classifies."""
    for t in tasks:
        if t.loss == "softmax_xent":
            return "accuracy", "max"
    return "loss", "min"


def _summarise_eval(sums: dict[str, float], tasks: tuple[Task, ...]) -> dict[str, float]:
    count = max(sums.pop("count"), 1.0)
    out = {k: v / count for k, v in sums.items()}
    for t in tasks:  # contract: val/test lines of a classification task carry "accuracy"
        if t.loss == "softmax_xent":
            out.setdefault("accuracy", out[f"{t.name}_accuracy"])
    return out


def _fill_from_data(config: ml_collections.ConfigDict, info: Mapping[str, int]) -> None:
    """Sizes left at 0 in the config (vocabulary, classes) are taken from the data."""
    model = config.model
    for key in model:
        enc = model[key]
        is_text = isinstance(enc, ml_collections.ConfigDict) and enc.get("kind") == "text"
        if is_text and not enc.get("vocab_size"):
            enc.vocab_size = info["vocab_size"]
    for head in model.heads.values():
        if head.get("kind") == "classification" and not head.get("num_classes"):
            head.num_classes = info["num_classes"]


def _host_mean(window: list[dict[str, Any]]) -> dict[str, float]:
    stacked = jax.device_get(window)
    return {k: float(np.mean([np.asarray(m[k])[0] for m in stacked])) for k in stacked[0]}


def _check_finite(window: list[tuple[int, dict[str, Any]]]) -> None:
    for step, m in window:
        value = float(np.asarray(jax.device_get(m["loss"]))[0])
        if not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss ({value}) at step {step}")


class Trainer:
    """Builds data, model, optimizer and state from a config; runs and evaluates."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        n_dev = jax.local_device_count() * self.process_count
        if config.batch_size % n_dev:
            raise ValueError(
                f"batch_size={config.batch_size} is not a multiple of the {n_dev} devices"
            )
        if config.parallel.mode != "pmap":
            raise ValueError(f"parallel.mode={config.parallel.mode!r}: only 'pmap' exists yet")
        self.tokenizer = pipeline.build_tokenizer(config.data)
        _fill_from_data(config, pipeline.dataset_info(config.data, self.tokenizer))
        self.tasks = tasks_from_config(config)
        self.model = build_model(config.model, bn_axis_name=parallel.AXIS)
        self.schedule = optim.make_schedule(config.optimizer, config.total_steps)

    def sample_batch(self) -> dict[str, Any]:
        batch = next(iter(pipeline.eval_batches(self.config.data, "val", batch_size=2)))
        return {k: v for k, v in batch.items() if k != "valid"}

    def init_state(self) -> TrainState:
        root = jax.random.PRNGKey(self.config.seed)
        init_rng, train_rng = jax.random.split(root)
        init = jax.jit(functools.partial(self.model.init, train=False))
        variables = init({"params": init_rng, "dropout": init_rng}, self.sample_batch())
        params = variables.pop("params")
        self.tx = optim.make_optimizer(self.config.optimizer, params, self.config.total_steps)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            model_state=dict(variables),
            rng=train_rng,
        )

    def evaluate(self, p_eval: Any, state: Any, split: str) -> dict[str, float]:
        bs = self.config.get("eval_batch_size") or self.config.batch_size
        bs = bs // self.process_count
        total: dict[str, float] = {}
        for batch in pipeline.eval_batches(self.config.data, split, batch_size=bs):
            sums = jax.device_get(p_eval(state, parallel.shard_batch(batch)))
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + float(np.asarray(v)[0])
        return _summarise_eval(total, self.tasks)

    def run(self) -> dict[str, Any]:
        """Trains to ``total_steps`` (resuming if a checkpoint exists); returns final metrics."""
        t_start = time.time()
        cfg = self.config
        is_main = self.process_index == 0
        self.workdir.mkdir(parents=True, exist_ok=True)
        if is_main:
            (self.workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
        state = self.init_state()
        n_params = sum(x.size for x in jax.tree.leaves(state.params))
        log.info("model: %s parameters under %s", f"{n_params:,}", sorted(state.params))

        metric_name, mode = primary_metric(self.tasks)
        ckpt = Checkpointer(self.workdir, best_metric=metric_name, best_mode=mode)
        writer = MetricWriter(self.workdir, enabled=is_main)
        data_iter = pipeline.train_iterator(
            cfg.data,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        try:
            restored = ckpt.restore_latest(state)
            if restored is not None:
                step0, state, data_state = restored
                data_iter.set_state(data_state)
                log.info("resumed from checkpoint step %d", step0)
            return self._loop(state, data_iter, ckpt, writer, t_start, metric_name)
        finally:
            ckpt.close()
            writer.close()

    def _loop(
        self,
        state: TrainState,
        data_iter: Iterator[Any],
        ckpt: Checkpointer,
        writer: MetricWriter,
        t_start: float,
        metric_name: str,
    ) -> dict[str, Any]:
        cfg = self.config
        total_steps = cfg.total_steps
        first_step = int(state.step) + 1
        p_train = jax.pmap(
            functools.partial(train_step, model=self.model, tx=self.tx, tasks=self.tasks),
            axis_name=parallel.AXIS,
            donate_argnums=(0,),
        )
        p_eval = jax.pmap(
            functools.partial(eval_step, model=self.model, tasks=self.tasks),
            axis_name=parallel.AXIS,
        )
        rstate = parallel.replicate(state)
        del state
        window: list[tuple[int, Any]] = []
        val: dict[str, float] = {}
        last_saved = first_step - 1
        bar = _progress(first_step - 1, total_steps, enabled=self.process_index == 0)
        t_log, steps_since = time.time(), 0
        next_batch = parallel.shard_batch(next(data_iter)) if first_step <= total_steps else None
        for step in range(first_step, total_steps + 1):
            rstate, metrics = p_train(rstate, next_batch)
            window.append((step, metrics))
            steps_since += 1
            data_state = data_iter.get_state()
            if step < total_steps:  # host prepares the next batch while the device computes
                next_batch = parallel.shard_batch(next(data_iter))
            if step % cfg.log_every == 0 or step == total_steps:
                _check_finite(window)
                record = _host_mean([m for _, m in window])
                now = time.time()
                record["steps_per_s"] = steps_since / max(now - t_log, 1e-9)
                record["lr"] = float(self.schedule(step - 1))
                writer.write(step, "train", record)
                bar.update(step, record["loss"], record["steps_per_s"])
                window, t_log, steps_since = [], now, 0
            eval_now = step % cfg.eval_every == 0 or step == total_steps
            if eval_now:
                val = self.evaluate(p_eval, rstate, "val")
                writer.write(step, "val", val)
                bar.note(f"step {step} val " + " ".join(
                    f"{k}={v:.4f}" for k, v in val.items() if k.endswith(("accuracy", "loss"))
                ))
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                _check_finite(window)
                ckpt.save(
                    step, parallel.unreplicate(rstate), data_state, val if eval_now else None
                )
                last_saved = step
        bar.close()
        final_step = max(total_steps, first_step - 1)
        if not val:  # nothing trained in this call (already at total_steps): still report
            val = self.evaluate(p_eval, rstate, "val")
            writer.write(final_step, "val", val)
        test = self.evaluate(p_eval, rstate, "test")
        writer.write(final_step, "test", test)
        wall = time.time() - t_start
        summary = {
            "step": final_step,
            "val": val,
            "test": test,
            "wall_s": wall,
            "last_checkpoint": last_saved,
        }
        if self.process_index == 0:
            nan = float("nan")
            print(
                f"done: step {final_step}, val {metric_name} {val.get(metric_name, nan):.4f}, "
                f"test {metric_name} {test.get(metric_name, nan):.4f}, "
                f"wall {wall:.1f} s, workdir {self.workdir}",
                flush=True,
            )
        return summary


class _progress:  # noqa: N801 - a tiny tqdm wrapper, used like a function
    """tqdm bar with loss and steps/s; silent on non-zero processes."""

    def __init__(self, start: int, total: int, *, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self.pos = start

    def update(self, step: int, loss: float, steps_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.pos)
            self.bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{steps_per_s:.1f}")
        self.pos = step

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Library entry point of ``python -m mmjax.train``."""
    return Trainer(config, workdir).run()


def load_config_json(workdir: str | Path) -> dict[str, Any]:
    """The config a workdir was trained with (for tools that inspect a finished run)."""
    return json.loads((Path(workdir) / "config.json").read_text())
