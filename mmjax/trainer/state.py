"""The train state, the tasks of a run, and a fresh state built from a config."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmjax.models import losses as losses_lib
from mmjax.models.multimodal import loss_spec
from mmjax.optim import lora, optimizers, weighting
from mmjax.optim import trainable as trainable_lib

log = logging.getLogger(__name__)


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes. ``rng`` holds raw uint32 key data so Orbax saves it.

    ``params`` are the model's own; LoRA adapters and learned loss weights, when a run has them,
    are fields of their own (None otherwise). The optimizer updates the three as one tree
    (:meth:`trainable`, ``mmjax.optim.trainable``).
    """

    step: Any  # int32 scalar
    params: Any
    opt_state: Any
    model_state: Any  # non-parameter collections, e.g. {"batch_stats": ...}
    rng: Any  # uint32 key data (None where nothing draws: evaluation of a saved run)
    adapters: Any = None  # config.lora's adapters
    loss_weights: Any = None  # loss_weighting.kind="uncertainty"'s log-variances

    def trainable(self) -> dict[str, Any]:
        """The tree the optimizer updates (and the steps differentiate)."""
        return trainable_lib.join(self.params, self.adapters, self.loss_weights)

    def with_trainable(self, tree: Mapping[str, Any]) -> TrainState:
        params, adapters, loss_weights = trainable_lib.split(tree)
        return self.replace(params=params, adapters=adapters, loss_weights=loss_weights)


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


def primary_metric(tasks: tuple[Task, ...]) -> tuple[str, str]:
    """(name, "max"|"min") that picks the best checkpoint: accuracy if any task classifies."""
    if any(t.loss == "softmax_xent" for t in tasks):
        return "accuracy", "max"
    return "loss", "min"


def model_params(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """The params the model applies, from the optimizer's tree (:meth:`TrainState.trainable`):
    without learned loss weights, LoRA adapters folded in (as ``W + scale·(a @ b)``, so
    gradients reach both W and the adapters). Traceable; on host arrays it is what inference
    applies."""
    params, adapters, _ = trainable_lib.split(tree)
    return lora.effective_params(trainable_lib.join(params, adapters))


def create_state(
    model: Any,
    config: ml_collections.ConfigDict,
    sample_batch: Mapping[str, Any],
    *,
    params_hook: Callable[[Any], Any] | None = None,
) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh TrainState (float32 params from ``config.seed``) and the optimizer built for it.

    ``params_hook`` edits the initial params before the optimizer sees them (pretrained towers
    load there), so optimizer state and freezing masks match the final tree. With
    ``config.lora`` on, adapters are added after the hook (they adapt the loaded weights).
    """
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    init = jax.jit(functools.partial(model.init, train=False))
    variables = dict(init({"params": init_rng, "dropout": init_rng}, sample_batch))
    params = variables.pop("params")
    if params_hook is not None:
        params = params_hook(params)
    # The optimizer's tree: the model's params, then Kendall et al.'s log-variances (trained with
    # the model) and the LoRA adapters beside them; the state keeps the three apart.
    params = trainable_lib.join(params, loss_weights=weighting.from_config(config).init_params())
    lora_cfg = config.get("lora", None)
    if lora.enabled(lora_cfg):
        params = lora.add_adapters(params, lora_cfg, jax.random.fold_in(init_rng, 1))
    tx = optimizers.make_optimizer(config.optimizer, params, config.total_steps, lora_cfg=lora_cfg)
    n_train, n_total = optimizers.trainable_count(config.optimizer, params, lora_cfg)
    log.info("trainable parameters: %s of %s", f"{n_train:,}", f"{n_total:,}")
    params, adapters, loss_weights = trainable_lib.split(params)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=None,
        model_state=variables,
        rng=train_rng,
        adapters=adapters,
        loss_weights=loss_weights,
    )
    return state.replace(opt_state=tx.init(state.trainable())), tx
