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
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from mmjax import evaluators as evaluators_lib
from mmjax import lora, optim, parallel, transfer, weighting
from mmjax import losses as losses_lib
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


def model_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The params the model applies: without the loss weights, LoRA adapters folded in.

    The train state's params may carry two subtrees that are not the model's: learned loss
    weights (``weighting.PARAMS_KEY``) and LoRA adapters (``lora.KEY``, applied as
    ``W + scale·(a @ b)``, so gradients reach both W and the adapters).
    """
    params = {k: v for k, v in params.items() if k != weighting.PARAMS_KEY}
    return lora.effective_params(params)


def forward(
    params: Any,
    model_state: Any,
    batch: Mapping[str, Any],
    rng: jax.Array | None,
    *,
    model: Any,
    train: bool,
) -> tuple[dict[str, Any], Any]:
    """Model outputs per task, and the updated non-parameter state (BatchNorm statistics)."""
    variables = {"params": model_params(params), **model_state}
    # "masking" drives the objectives' random choices (MLM/MIM masks, ITM negatives); without it
    # (evaluation) the model falls back to a fixed key so val metrics are deterministic.
    rngs = {"dropout": rng, "masking": jax.random.fold_in(rng, 1)} if rng is not None else {}
    if train and model_state:
        return model.apply(variables, batch, train=True, rngs=rngs, mutable=list(model_state))
    return model.apply(variables, batch, train=train, rngs=rngs), model_state


def per_task_losses(
    outputs: Mapping[str, Any], batch: Mapping[str, Any], tasks: tuple[Task, ...]
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """({task: L_task}, metrics with each task's ``<task>_loss`` and its own metrics)."""
    metrics: dict[str, jax.Array] = {}
    per_task = {}
    for t in tasks:
        value, task_metrics = losses_lib.get_loss(t.loss)(outputs[t.name], batch, t.cfg)
        per_task[t.name] = value
        metrics[f"{t.name}_loss"] = value
        metrics.update({f"{t.name}_{k}": v for k, v in task_metrics.items()})
    return per_task, metrics


def task_losses(
    outputs: Mapping[str, Any],
    batch: Mapping[str, Any],
    tasks: tuple[Task, ...],
    weights: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = Σ wᵢ·L_task over ``tasks`` (wᵢ = ``weights`` or each task's λ), with the metrics."""
    per_task, metrics = per_task_losses(outputs, batch, tasks)
    w = {t.name: t.weight for t in tasks} if weights is None else weights
    total = losses_lib.weighted_total(per_task, {t.name: w[t.name] for t in tasks})
    return total, metrics


def compute_losses(
    params: Any,
    model_state: Any,
    batch: Mapping[str, Any],
    rng: jax.Array | None,
    *,
    model: Any,
    tasks: tuple[Task, ...],
    train: bool,
    weights: weighting.Weighting | None = None,
    step: jax.typing.ArrayLike = 0,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    """Weighted total L = Σ wᵢ·L_task, with each task's loss, weight and metrics, and the new
    model state. ``weights`` (default: fixed λ from ``tasks``) may depend on ``step`` and on
    learned params (``weighting`` module)."""
    outputs, new_state = forward(params, model_state, batch, rng, model=model, train=train)
    per_task, metrics = per_task_losses(outputs, batch, tasks)
    if weights is None:
        weights = weighting.Weighting(tuple((t.name, t.weight) for t in tasks))
    total, effective = weights.combine(per_task, step, params)
    metrics.update({f"{name}_weight": w for name, w in effective.items()})
    metrics["loss"] = total
    return total, (metrics, new_state)


def _split_micro(batch: Any, k: int) -> Any:
    """[B, ...] → [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ...

    Strided rather than contiguous so that, under the mesh path, every device's rows split into
    its own micro-batches without moving data between devices.
    """

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(
                f"per-device batch of {x.shape[0]} is not divisible by grad_accum_steps={k}"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _merge_micro(x: jax.Array) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])


def accumulated_grads(
    params: Any,
    model_state: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    *,
    model: Any,
    tasks: tuple[Task, ...],
    accum_steps: int,
    weights: Mapping[str, jax.Array] | None = None,
) -> tuple[Any, dict[str, jax.Array], Any]:
    """Gradients of the batch's loss computed in ``accum_steps`` micro-batches.

    Per-example losses: the mean of micro-batch gradients, identical to the full batch.
    Batch-coupled losses (``losses.BATCH_COUPLED``, e.g. InfoNCE): GradCache. Pass 1 runs every
    micro-batch forward without gradients and keeps those tasks' outputs (embeddings); the loss
    is evaluated once on the concatenated outputs, so negatives span the whole accumulated batch,
    and its gradient w.r.t. the outputs is taken. Pass 2 re-runs each micro-batch (same dropout
    rng) and back-propagates ``<stop_gradient(dL/d outputs), outputs>`` plus its per-example
    losses. Memory is that of one micro-batch plus the cached outputs; compute is one extra
    forward pass. ``weights`` are the tasks' weights of this step (fixed or scheduled; learned
    uncertainty weights are refused with accumulation by the Trainer).
    """
    k = accum_steps
    if weights is None:
        weights = {t.name: jnp.float32(t.weight) for t in tasks}
    micro = _split_micro(batch, k)
    coupled = tuple(t for t in tasks if t.loss in losses_lib.BATCH_COUPLED)
    local = tuple(t for t in tasks if t.loss not in losses_lib.BATCH_COUPLED)
    names = [t.name for t in coupled]
    micro_rng = lambda i: jax.random.fold_in(rng, i)

    metrics: dict[str, jax.Array] = {}
    cached_grads = None
    if coupled:

        def outputs_of(i: jax.Array, mb: Any) -> dict[str, Any]:
            out, _ = forward(params, model_state, mb, micro_rng(i), model=model, train=True)
            return {n: out[n] for n in names}

        cached = jax.lax.stop_gradient(
            jax.lax.map(lambda a: outputs_of(*a), (jnp.arange(k), micro))
        )

        def coupled_loss(outs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            # Per-example leaves [k, b, ...] merge to [k*b, ...]; scalars (a temperature) are
            # the same in every micro-batch, so micro-batch 0's copy carries the gradient.
            merged = jax.tree.map(lambda x: _merge_micro(x) if x.ndim >= 2 else x[0], outs)
            full = jax.tree.map(_merge_micro, micro)
            return task_losses(merged, full, coupled, weights)

        (_, coupled_metrics), cached_grads = jax.value_and_grad(
            coupled_loss, has_aux=True
        )(cached)
        metrics.update(coupled_metrics)

    def surrogate(p: Any, state: Any, i: jax.Array, mb: Any) -> tuple[jax.Array, Any]:
        out, new_state = forward(p, state, mb, micro_rng(i), model=model, train=True)
        value = jnp.zeros((), jnp.float32)
        aux: dict[str, jax.Array] = {}
        if local:
            local_total, aux = task_losses(out, mb, local, weights)
            value = value + local_total / k
        if coupled:
            g_i = jax.tree.map(lambda g: g[i], cached_grads)
            value = value + sum(
                jnp.vdot(g.astype(jnp.float32), o.astype(jnp.float32))
                for g, o in zip(
                    jax.tree.leaves(g_i), jax.tree.leaves({n: out[n] for n in names}), strict=True
                )
            )
        return value, (aux, new_state)

    def body(carry: Any, xs: Any) -> tuple[Any, None]:
        grads_acc, aux_acc, state = carry
        i, mb = xs
        (_, (aux, state)), g = jax.value_and_grad(surrogate, has_aux=True)(params, state, i, mb)
        grads_acc = jax.tree.map(jnp.add, grads_acc, g)
        aux_acc = jax.tree.map(lambda a, b: a + b / k, aux_acc, aux)
        return (grads_acc, aux_acc, state), None

    aux0 = jax.eval_shape(
        lambda: surrogate(params, model_state, jnp.zeros((), jnp.int32),
                          jax.tree.map(lambda x: x[0], micro))[1][0]
    )
    init = (
        jax.tree.map(jnp.zeros_like, params),
        jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0),
        model_state,
    )
    (grads, local_metrics, model_state), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
    metrics.update(local_metrics)
    per_task = {t.name: metrics[f"{t.name}_loss"] for t in tasks}
    metrics["loss"] = losses_lib.weighted_total(per_task, {t.name: weights[t.name] for t in tasks})
    metrics.update({f"{t.name}_weight": jnp.asarray(weights[t.name]) for t in tasks})
    return grads, metrics, model_state


def train_step(
    state: TrainState,
    batch: Mapping[str, Any],
    *,
    model: Any,
    tx: optax.GradientTransformation,
    tasks: tuple[Task, ...],
    axis_name: str | None = parallel.AXIS,
    accum_steps: int = 1,
    weights: weighting.Weighting | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step; pure, so it can be pmapped (``axis_name``) or jitted over a mesh.

    Under pmap each device computes gradients of its share and ``lax.pmean`` averages them;
    under the mesh path (``axis_name=None``) the batch is one global array and the mean is global.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    if accum_steps > 1:
        if weights is not None and weights.learned:
            raise ValueError(
                "loss_weighting.kind='uncertainty' does not support grad_accum_steps > 1 "
                f"(got {accum_steps}): use 'fixed' weights or no accumulation"
            )
        grads, metrics, model_state = accumulated_grads(
            state.params, state.model_state, batch, rng, model=model, tasks=tasks,
            accum_steps=accum_steps,
            weights=None if weights is None else weights.scheduled(state.step),
        )
    else:
        grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
        (_, (metrics, model_state)), grads = grad_fn(
            state.params, state.model_state, batch, rng, model=model, tasks=tasks, train=True,
            weights=weights, step=state.step,
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
    weights: weighting.Weighting | None = None,
) -> dict[str, jax.Array]:
    """Sums of per-example metrics over the valid examples of the batch, and their count."""
    _, (metrics, _) = compute_losses(
        state.params, state.model_state, batch, None, model=model, tasks=tasks, train=False,
        weights=weights, step=state.step,
    )
    n = batch["valid"].sum()
    sums = {k: jnp.where(n > 0, v * n, 0.0) for k, v in metrics.items()}
    sums["count"] = n
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums


def create_state(
    model: Any,
    config: ml_collections.ConfigDict,
    sample_batch: Mapping[str, Any],
    *,
    params_hook: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh TrainState (float32 params from ``config.seed``) and the optimizer built for it.

    ``params_hook`` edits the initial params before the optimizer sees them (the trainer loads
    pretrained towers there), so optimizer state and freezing masks match the final tree. With
    ``config.lora`` on, LoRA adapters are added after the hook (so they adapt the loaded
    weights) and the optimizer trains only them and ``lora.train``.
    """
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    init = jax.jit(functools.partial(model.init, train=False))
    variables = dict(init({"params": init_rng, "dropout": init_rng}, sample_batch))
    params = variables.pop("params")
    if params_hook is not None:
        params = params_hook(params)
    learned_weights = weighting.from_config(config).init_params()
    if learned_weights is not None:  # Kendall et al.'s log-variances, trained with the model
        params = {**params, weighting.PARAMS_KEY: learned_weights}
    lora_cfg = config.get("lora", None)
    if lora.enabled(lora_cfg):
        params = lora.add_adapters(params, lora_cfg, jax.random.fold_in(init_rng, 1))
    tx = optim.make_optimizer(config.optimizer, params, config.total_steps, lora_cfg=lora_cfg)
    n_train, n_total = optim.trainable_count(config.optimizer, params, lora_cfg)
    log.info("trainable parameters: %s of %s", f"{n_train:,}", f"{n_total:,}")
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        model_state=variables,
        rng=train_rng,
    )
    return state, tx


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
        if "vocab_size" in head and not head.get("vocab_size"):  # MLM, captioning heads
            head.vocab_size = info["vocab_size"]


def _check_finite(window: list[tuple[int, dict[str, Any]]]) -> None:
    for step, m in window:
        value = float(m["loss"])
        if not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss ({value}) at step {step}")


class _Preemption:
    """SIGTERM (what schedulers send before killing a job) → save at the current step, exit 0.

    A lone process gets no preemption notice from Orbax, so the signal is caught here; with
    several processes Orbax's ``reached_preemption`` (jax.distributed's sync point) is also asked,
    so that every process stops at the same step.
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


class Trainer:
    """Builds data, model, optimizer and state from a config; runs and evaluates."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)
        self.process_index = jax.process_index()
        self.process_count = jax.process_count()
        self.par = parallel.make_parallel(config.parallel)
        n_dev = jax.device_count()
        if config.batch_size % n_dev:
            raise ValueError(
                f"batch_size={config.batch_size} is not a multiple of the {n_dev} devices"
            )
        self.accum_steps = int(config.get("grad_accum_steps", 1) or 1)
        if (config.batch_size // n_dev) % self.accum_steps:
            raise ValueError(
                f"grad_accum_steps={self.accum_steps} does not divide the per-device batch of "
                f"{config.batch_size // n_dev}"
            )
        # The workdir keeps the tokenizer and label vocabulary built from train data, so that a
        # resumed run reads exactly the ids it trained with.
        transfer.apply_encoder_overrides(config, log)  # towers' shapes from their init_from
        self.tokenizer = pipeline.build_tokenizer(config.data, workdir=workdir)
        self.data_info = pipeline.dataset_info(config.data, self.tokenizer, workdir=workdir)
        _fill_from_data(config, self.data_info)
        self.tasks = tasks_from_config(config)
        self.weighting = weighting.from_config(config, [t.name for t in self.tasks])
        self.model = build_model(config.model, bn_axis_name=self.par.axis_name)
        self.evaluators = evaluators_lib.build(config.get("evals"), evaluators_lib.Env(
            model=self.model,
            model_cfg=config.model.to_dict(),
            data_config=config.data,
            tokenizer=self.tokenizer,
            label_names=pipeline.label_names(config.data, workdir=workdir),
            batch_size=int(config.get("eval_batch_size") or config.batch_size),
        ))
        if self.evaluators and self.process_count > 1:
            raise ValueError(
                "config.evals runs on one process only (evaluators copy the params to one "
                f"device); this run has {self.process_count} processes: clear config.evals"
            )
        self.schedule = optim.make_schedule(config.optimizer, config.total_steps)
        self.tx = None

    def sample_batch(self) -> dict[str, Any]:
        batch = next(iter(pipeline.eval_batches(self.config.data, "val", batch_size=2)))
        return {k: v for k, v in batch.items() if k != "valid"}

    def init_state(self) -> TrainState:
        """Fresh state with pretrained towers (``model.<tower>.init_from``) loaded in place.

        Then ``config.init_from`` (a whole earlier run, ``config.init_subtrees`` of it) is
        loaded over them. A resumed run restores its own checkpoint over this state afterwards.
        """
        state, self.tx = create_state(
            self.model, self.config, self.sample_batch(),
            params_hook=lambda p: transfer.apply_config_init_from(
                self.config, transfer.apply_init_from(self.config, p, log), log
            ),
        )
        return state

    def _local_rows(self, batch: dict[str, Any]) -> dict[str, Any]:
        """This process's share of a global eval batch."""
        if self.process_count == 1:
            return batch
        n = len(batch["valid"]) // self.process_count
        lo = self.process_index * n
        return jax.tree.map(lambda x: x[lo : lo + n], batch)

    def evaluate(self, eval_fn: Any, state: Any, split: str) -> dict[str, float]:
        bs = self.config.get("eval_batch_size") or self.config.batch_size
        n_dev = jax.device_count()
        bs = max(n_dev, bs // n_dev * n_dev)
        total: dict[str, float] = {}
        for batch in pipeline.eval_batches(self.config.data, split, batch_size=bs):
            sums = self.par.fetch(eval_fn(state, self.par.put_batch(self._local_rows(batch))))
            for k, v in sums.items():
                total[k] = total.get(k, 0.0) + float(v)
        out = _summarise_eval(total, self.tasks)
        if self.evaluators:
            out.update(evaluators_lib.run_all(self.evaluators, self._eval_variables(state), split))
        return out

    def _eval_variables(self, dstate: Any) -> dict[str, Any]:
        """The variables evaluators apply the model with: host copies, LoRA merged."""
        state = jax.device_get(self.par.state_for_checkpoint(dstate))
        return {"params": model_params(state.params), **state.model_state}

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
        log.info(
            "parallel: %s over %d devices (%d processes)%s", self.par.mode, jax.device_count(),
            self.process_count, f", fsdp={self.par.fsdp}" if self.par.mode == "mesh" else "",
        )

        metric_name, mode = primary_metric(self.tasks)
        ckpt = Checkpointer(self.workdir, best_metric=metric_name, best_mode=mode)
        writer = MetricWriter(self.workdir, enabled=is_main)
        skipped = {k: v for k, v in self.data_info.items() if k.startswith("skipped_")}
        if any(skipped.values()):
            log.warning("skipped bad records (data.skip_bad=True): %s", skipped)
        data_iter = pipeline.train_iterator(
            cfg.data,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        try:
            restored = ckpt.restore_latest(self.par.checkpoint_target(state))
            if restored is not None:
                step0, state, data_state = restored
                data_iter.set_state(data_state)
                log.info("resumed from checkpoint step %d", step0)
            with _Preemption() as preemption:
                return self._loop(state, data_iter, ckpt, writer, t_start, metric_name,
                                  preemption)
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
        preemption: _Preemption,
    ) -> dict[str, Any]:
        cfg = self.config
        par = self.par
        total_steps = cfg.total_steps
        first_step = int(jax.device_get(state.step)) + 1
        dstate = par.put_state(state)
        del state
        train_fn = par.compile_train(functools.partial(
            train_step, model=self.model, tx=self.tx, tasks=self.tasks,
            axis_name=par.axis_name, accum_steps=self.accum_steps, weights=self.weighting,
        ))
        eval_fn = par.compile_eval(functools.partial(
            eval_step, model=self.model, tasks=self.tasks, axis_name=par.axis_name,
            weights=self.weighting,
        ))
        window: list[tuple[int, Any]] = []
        val: dict[str, float] = {}
        last_saved = first_step - 1
        bar = _progress(first_step - 1, total_steps, enabled=self.process_index == 0)
        t_log, steps_since = time.time(), 0
        next_batch = par.put_batch(next(data_iter)) if first_step <= total_steps else None
        step = first_step - 1
        for step in range(first_step, total_steps + 1):
            dstate, metrics = train_fn(dstate, next_batch)
            window.append((step, metrics))
            steps_since += 1
            data_state = data_iter.get_state()
            if step < total_steps:  # host prepares the next batch while the device computes
                next_batch = par.put_batch(next(data_iter))
            stop = preemption.requested or (
                self.process_count > 1 and ckpt.manager.reached_preemption(step)
            )
            if step % cfg.log_every == 0 or step == total_steps or stop:
                fetched = [(s, par.fetch(m)) for s, m in window]
                _check_finite(fetched)
                record = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]}
                now = time.time()
                record["steps_per_s"] = steps_since / max(now - t_log, 1e-9)
                record["lr"] = float(self.schedule(step - 1))
                writer.write(step, "train", record)
                bar.update(step, record["loss"], record["steps_per_s"])
                window, t_log, steps_since = [], now, 0
            if stop:
                ckpt.save(step, par.state_for_checkpoint(dstate), data_state)
                ckpt.wait()
                bar.close()
                log.warning("preempted: checkpoint saved at step %d; rerun to resume", step)
                return {"step": step, "preempted": True, "last_checkpoint": step}
            eval_now = step % cfg.eval_every == 0 or step == total_steps
            if eval_now:
                val = self.evaluate(eval_fn, dstate, "val")
                writer.write(step, "val", val)
                bar.note(f"step {step} val " + " ".join(
                    f"{k}={v:.4f}" for k, v in val.items() if k.endswith(("accuracy", "loss"))
                ))
            if step % cfg.checkpoint_every == 0 or step == total_steps:
                if window:
                    _check_finite([(s, par.fetch(m)) for s, m in window])
                ckpt.save(
                    step, par.state_for_checkpoint(dstate), data_state,
                    val if eval_now else None,
                )
                last_saved = step
        bar.close()
        final_step = max(total_steps, first_step - 1)
        if not val:  # nothing trained in this call (already at total_steps): still report
            val = self.evaluate(eval_fn, dstate, "val")
            writer.write(final_step, "val", val)
        test = self.evaluate(eval_fn, dstate, "test")
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
