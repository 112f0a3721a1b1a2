"""The pure train and eval steps.

Module-level functions whose dependencies (model, optimizer, tasks, loss weighting) are bound with
``functools.partial``; ``parallel`` then compiles them with ``jax.pmap(axis_name="data")`` (the
step averages gradients and metrics with ``lax.pmean``) or ``jax.jit`` over a mesh (global arrays,
no explicit collective). The per-step rng is ``fold_in(rng, step)``, then the device index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from mmjax.models import losses as losses_lib
from mmjax.optim import weighting
from mmjax.trainer.state import Task, TrainState, model_params

Metrics = dict[str, jax.Array]


def forward(params: Any, model_state: Any, batch: Mapping[str, Any], rng: jax.Array | None, *,
            model: Any, train: bool) -> tuple[dict[str, Any], Any]:
    """Model outputs per task, and the updated non-parameter state (BatchNorm statistics).

    ``params`` here and below is the optimizer's tree (``TrainState.trainable``): the model's
    params with the adapters and loss weights beside them."""
    variables = {"params": model_params(params), **model_state}
    # "masking" drives the objectives' random choices; without it (evaluation) they use a fixed
    # key, so val metrics are deterministic.
    rngs = {"dropout": rng, "masking": jax.random.fold_in(rng, 1)} if rng is not None else {}
    if train and model_state:
        return model.apply(variables, batch, train=True, rngs=rngs, mutable=list(model_state))
    return model.apply(variables, batch, train=train, rngs=rngs), model_state


def task_losses(outputs: Mapping[str, Any], batch: Mapping[str, Any],
                tasks: tuple[Task, ...]) -> tuple[dict[str, jax.Array], Metrics]:
    """({task: L_task}, metrics: ``<task>_loss`` and each task's own ``<task>_<metric>``)."""
    per_task, metrics = {}, {}
    for t in tasks:
        value, task_metrics = losses_lib.get_loss(t.loss)(outputs[t.name], batch, t.cfg)
        per_task[t.name] = metrics[f"{t.name}_loss"] = value
        metrics.update({f"{t.name}_{k}": v for k, v in task_metrics.items()})
    return per_task, metrics


def _combine(per_task: Mapping[str, jax.Array], metrics: Metrics, weights: weighting.Weighting,
             step: jax.Array, params: Any) -> jax.Array:
    """L = Σ wᵢ·Lᵢ; writes ``loss`` and each ``<task>_weight`` into ``metrics``."""
    total, effective = weights.combine(per_task, step, params)
    metrics.update({f"{name}_weight": jnp.asarray(w) for name, w in effective.items()})
    metrics["loss"] = total
    return total


def complete_input_term(params: Any, model_state: Any, batch: Mapping[str, Any],
                        rng: jax.Array, step: jax.Array, *, model: Any,
                        tasks: tuple[Task, ...], weights: weighting.Weighting,
                        dropped_from: int = 0) -> tuple[jax.Array, jax.Array, Any] | None:
    """With modality dropout in training, ``(g, c · L_complete, model state)``: the weighted
    task loss of the same batch with no modality dropped (only what the records lack is
    absent). ``g`` (0 or 1) gates the dropped view's loss: 0 before step ``dropped_from``,
    where the step trains on complete inputs alone (c = 1); from it on g = 1 and
    c = ``model.complete_input_weight``. None without modality dropout, or when the term
    would always be 0 (weight 0, no delayed start).

    Modality dropout from the first step trains on fewer complete inputs than the model will
    mostly see and can settle on ignoring a modality; starting it once the model uses every
    modality (ModDrop's schedule) and keeping the complete input in each step avoids both.
    """
    w = getattr(model, "complete_input_weight", 0.0)
    if not (getattr(model, "modality_dropout", 0.0) > 0 and (w > 0 or dropped_from > 0)):
        return None
    full = model.clone(modality_dropout=0.0)
    outputs, new_state = forward(params, model_state, batch, jax.random.fold_in(rng, 2),
                                 model=full, train=True)
    per_task, _ = task_losses(outputs, batch, tasks)
    g = (step >= dropped_from).astype(jnp.float32)
    c = g * w + (1.0 - g)
    return g, c * weights.combine(per_task, step, None)[0], new_state


def loss_fn(params: Any, model_state: Any, batch: Mapping[str, Any], rng: jax.Array | None,
            step: jax.Array, *, model: Any, tasks: tuple[Task, ...],
            weights: weighting.Weighting, train: bool, teacher: Any = None,
            distill: Any = None, dropped_from: int = 0) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """The weighted total loss, with the metrics and the new model state. With ``distill`` (a
    ``trainer.distill.Spec``), plus its term from the ``teacher`` variables on this batch; in
    training with modality dropout, gated and added to ``complete_input_term`` (metric
    ``complete_loss``)."""
    outputs, new_state = forward(params, model_state, batch, rng, model=model, train=train)
    per_task, metrics = task_losses(outputs, batch, tasks)
    total = _combine(per_task, metrics, weights, step, params)
    if distill is not None:
        total = distill.add_term(total, metrics, outputs, batch, teacher)
    complete = None
    if train and rng is not None:
        complete = complete_input_term(params, new_state, batch, rng, step, model=model,
                                       tasks=tasks, weights=weights, dropped_from=dropped_from)
    if complete is not None:
        gate, metrics["complete_loss"], new_state = complete
        total = metrics["loss"] = gate * total + metrics["complete_loss"]
    return total, (metrics, new_state)


def _split_micro(batch: Any, k: int) -> Any:
    """[B, ...] → [k, B/k, ...] with micro-batch i = rows i, i+k, ... (strided, so under the
    mesh path every device's rows split into its own micro-batches without moving data)."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % k:
            raise ValueError(
                f"per-device batch of {x.shape[0]} is not divisible by grad_accum_steps={k}"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _merge_micro(x: jax.Array) -> jax.Array:
    return x.reshape(-1, *x.shape[2:])


def accumulated_grads(params: Any, model_state: Any, batch: Mapping[str, Any], rng: jax.Array,
                      step: jax.Array, *, model: Any, tasks: tuple[Task, ...],
                      weights: weighting.Weighting, accum_steps: int,
                      dropped_from: int = 0) -> tuple[Any, Metrics, Any]:
    """Gradients of the batch's loss computed in ``accum_steps`` micro-batches.

    Per-example losses: the mean of micro-batch gradients, identical to the full batch.
    Batch-coupled losses (``losses.BATCH_COUPLED``, e.g. InfoNCE) use GradCache: every
    micro-batch runs forward without gradients and keeps those tasks' outputs; the loss is taken
    once on all of them (negatives span the whole accumulated batch) with its gradient w.r.t. the
    outputs; then each micro-batch is re-run (same dropout rng) and back-propagates
    ``<stop_gradient(dL/d outputs), outputs>`` plus its per-example losses.
    """
    k = accum_steps
    micro = _split_micro(batch, k)
    coupled = tuple(t for t in tasks if t.loss in losses_lib.BATCH_COUPLED)
    local = tuple(t for t in tasks if t.loss not in losses_lib.BATCH_COUPLED)
    names = [t.name for t in coupled]
    micro_rng = lambda i: jax.random.fold_in(rng, i)
    if coupled and getattr(model, "modality_dropout", 0.0) > 0 and (getattr(
            model, "complete_input_weight", 0.0) > 0 or dropped_from > 0):
        raise ValueError(f"grad_accum_steps={k} with batch-coupled losses ({names}) does not "
                         "support model.complete_input_weight > 0 or a delayed "
                         "model.modality_dropout_start under modality dropout: set both to 0 "
                         "or use no accumulation")

    metrics: Metrics = {}
    cached_grads = None
    if coupled:

        def outputs_of(i: jax.Array, mb: Any) -> dict[str, Any]:
            out, _ = forward(params, model_state, mb, micro_rng(i), model=model, train=True)
            return {n: out[n] for n in names}

        cached = lax.stop_gradient(lax.map(lambda a: outputs_of(*a), (jnp.arange(k), micro)))

        def coupled_loss(outs: Any) -> tuple[jax.Array, Metrics]:
            # Per-example leaves [k, b, ...] merge to [k*b, ...]; scalars (a temperature) are the
            # same in every micro-batch, so micro-batch 0's copy carries the gradient.
            merged = jax.tree.map(lambda x: _merge_micro(x) if x.ndim >= 2 else x[0], outs)
            per_task, m = task_losses(merged, jax.tree.map(_merge_micro, micro), coupled)
            return weights.combine(per_task, step, None)[0], m

        (_, coupled_metrics), cached_grads = jax.value_and_grad(coupled_loss, has_aux=True)(cached)
        metrics.update(coupled_metrics)

    def surrogate(p: Any, state: Any, i: jax.Array, mb: Any) -> tuple[jax.Array, Any]:
        out, new_state = forward(p, state, mb, micro_rng(i), model=model, train=True)
        value = jnp.zeros((), jnp.float32)
        aux: Metrics = {}
        if local:
            per_task, aux = task_losses(out, mb, local)
            value = value + weights.combine(per_task, step, None)[0] / k
            complete = complete_input_term(p, new_state, mb, micro_rng(i), step, model=model,
                                           tasks=local, weights=weights,
                                           dropped_from=dropped_from)
            if complete is not None:
                gate, aux["complete_loss"], new_state = complete
                value = gate * value + aux["complete_loss"] / k
        if coupled:
            g_i = jax.tree.map(lambda g: g[i], cached_grads)
            value = value + sum(
                jnp.vdot(g.astype(jnp.float32), o.astype(jnp.float32))
                for g, o in zip(jax.tree.leaves(g_i),
                                jax.tree.leaves({n: out[n] for n in names}), strict=True)
            )
        return value, (aux, new_state)

    def body(carry: Any, xs: Any) -> tuple[Any, None]:
        grads_acc, aux_acc, state = carry
        i, mb = xs
        (_, (aux, state)), g = jax.value_and_grad(surrogate, has_aux=True)(params, state, i, mb)
        grads_acc = jax.tree.map(jnp.add, grads_acc, g)
        aux_acc = jax.tree.map(lambda a, b: a + b / k, aux_acc, aux)
        return (grads_acc, aux_acc, state), None

    aux0 = jax.eval_shape(lambda: surrogate(params, model_state, jnp.zeros((), jnp.int32),
                                            jax.tree.map(lambda x: x[0], micro))[1][0])
    init = (jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux0), model_state)
    (grads, local_metrics, model_state), _ = lax.scan(body, init, (jnp.arange(k), micro))
    metrics.update(local_metrics)
    per_task = {t.name: metrics[f"{t.name}_loss"] for t in tasks}
    _combine(per_task, metrics, weights, step, None)
    if "complete_loss" in metrics:
        gate = (step >= dropped_from).astype(jnp.float32)
        metrics["loss"] = gate * metrics["loss"] + metrics["complete_loss"]
    return grads, metrics, model_state


def train_step(state: TrainState, batch: Mapping[str, Any], teacher: Any = None, *,
               model: Any, tx: optax.GradientTransformation, tasks: tuple[Task, ...],
               weights: weighting.Weighting, axis_name: str | None = None,
               accum_steps: int = 1, distill: Any = None,
               dropped_from: int = 0) -> tuple[TrainState, Metrics]:
    """One optimizer step. Under pmap (``axis_name``) each device computes gradients of its
    share and ``lax.pmean`` averages them; under the mesh path the batch is one global array.
    ``teacher``: the frozen teacher's variables, read when ``distill`` is given
    (``trainer.distill``). ``dropped_from``: the first step whose loss includes the
    modality-dropped view (``complete_input_term``)."""
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, lax.axis_index(axis_name))
    trainable = state.trainable()
    if accum_steps > 1:
        if weights.learned:
            raise ValueError("loss_weighting.kind='uncertainty' does not support "
                             f"grad_accum_steps > 1 (got {accum_steps}): use 'fixed' weights "
                             "or no accumulation")
        grads, metrics, model_state = accumulated_grads(
            trainable, state.model_state, batch, rng, state.step, model=model, tasks=tasks,
            weights=weights, accum_steps=accum_steps, dropped_from=dropped_from)
    else:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (metrics, model_state)), grads = grad_fn(
            trainable, state.model_state, batch, rng, state.step, model=model, tasks=tasks,
            weights=weights, train=True, teacher=teacher, distill=distill,
            dropped_from=dropped_from)
    if axis_name is not None:
        grads = lax.pmean(grads, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    if axis_name is not None:
        metrics = lax.pmean(metrics, axis_name)
    new_state = state.with_trainable(trainable).replace(
        step=state.step + 1, opt_state=opt_state, model_state=model_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: Mapping[str, Any], *, model: Any,
              tasks: tuple[Task, ...], weights: weighting.Weighting,
              axis_name: str | None = None) -> Metrics:
    """Sums of per-example metrics over the valid examples of the batch, and their count."""
    _, (metrics, _) = loss_fn(state.trainable(), state.model_state, batch, None, state.step,
                              model=model, tasks=tasks, weights=weights, train=False)
    n = batch["valid"].sum()
    sums = {k: jnp.where(n > 0, v * n, 0.0) for k, v in metrics.items()}
    sums["count"] = n
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    return sums
