"""The optimizer, built entirely from ``config.optimizer``.

Everything a run tunes about optimisation (algorithm, schedule, weight decay, clipping, which
towers are frozen) is a config value, so sweeps and fine-tuning recipes need no code. The keys:

* ``name``: ``"adamw"`` | ``"adam"`` | ``"sgd"``; ``lr``: the peak learning rate;
* ``warmup_steps`` (default 0): linear warmup from 0 to ``lr``;
* ``decay`` (default ``"cosine"``): ``"cosine"`` | ``"linear"`` | ``"constant"``, from ``lr`` after
  warmup to ``end_lr_fraction``·lr (default 0) at ``total_steps``;
* ``weight_decay`` (default 0): decoupled (AdamW-style, multiplied by the current learning rate)
  and applied only where :func:`decay_mask` is True, never to biases or norm scales;
* ``b1``, ``b2``, ``eps`` (adam/adamw); ``momentum`` (default 0) and ``nesterov`` (sgd);
* ``mu_dtype`` (default ``""`` = the params' float32): ``"bfloat16"`` stores Adam's first moment
  in bf16, halving that buffer on accelerators (the second moment stays float32 for stability);
* ``clip_norm`` (default 0 = off): clip the global gradient norm of trainable leaves first;
* ``freeze`` (default ``""``): a regex searched in each leaf's path (:func:`path_str`); matching
  leaves get exactly zero updates and carry no optimizer state, so a frozen pretrained tower stays
  bit-identical and costs no Adam moments.

Mistakes raise ``ValueError`` naming the config key, since a typo here would otherwise train the
wrong thing without complaint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

NAMES = ("adamw", "adam", "sgd")
DECAYS = ("cosine", "linear", "constant")


def _get(opt_cfg: Mapping, key: str, default: Any = None) -> Any:
    """Reads an optional key (works for ConfigDicts and plain dicts alike)."""
    value = opt_cfg.get(key, default)
    return default if value is None else value


def _require(opt_cfg: Mapping, key: str) -> Any:
    value = opt_cfg.get(key, None)
    if value is None:
        raise ValueError(f"optimizer.{key} is required")
    return value


def _moment_dtype(opt_cfg: Mapping) -> Any:
    name = _get(opt_cfg, "mu_dtype", "")
    if name in ("", "float32"):
        return None
    if name != "bfloat16":
        raise ValueError(f"optimizer.mu_dtype={name!r} is not one of '', 'float32', 'bfloat16'")
    return jnp.bfloat16


def make_schedule(opt_cfg: Mapping, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step (the count of updates already applied).

    Linear warmup from 0 reaches ``lr`` at ``warmup_steps``; the decay then runs from ``lr`` to
    ``end_lr_fraction``·lr at ``total_steps`` and stays there if training runs past it.
    """
    lr = float(_require(opt_cfg, "lr"))
    warmup = int(_get(opt_cfg, "warmup_steps", 0))
    decay = _get(opt_cfg, "decay", "cosine")
    end_lr = lr * float(_get(opt_cfg, "end_lr_fraction", 0.0))
    if decay not in DECAYS:
        raise ValueError(f"optimizer.decay={decay!r} is not one of {list(DECAYS)}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be at least 1")
    if not 0 <= warmup <= total_steps:
        raise ValueError(
            f"optimizer.warmup_steps={warmup} must lie between 0 and total_steps={total_steps}"
        )
    decay_steps = max(total_steps - warmup, 1)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / warmup if warmup else jnp.asarray(lr, jnp.float32)
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if decay == "cosine":
            after = end_lr + (lr - end_lr) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        elif decay == "linear":
            after = lr + (end_lr - lr) * frac
        else:
            after = jnp.full_like(frac, lr)
        return jnp.where(step < warmup, warm, after).astype(jnp.float32)

    return schedule


def path_str(path: tuple) -> str:
    """A leaf's key path as ``"image/encoder/layer_0/attn/query/kernel"``.

    Freeze regexes and log lines match against this one spelling, whatever pytree containers
    (dicts, dataclasses, lists) the path runs through.
    """
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return "/".join(parts)


def trainable_mask(params: Any, freeze: str) -> Any:
    """Pytree of bools: False where ``re.search(freeze, path_str(path))`` matches.

    An empty ``freeze`` trains everything. A regex that matches nothing raises instead: a typo such
    as ``"imgae/"`` would otherwise silently train the tower it meant to freeze.
    """
    if not freeze:
        return jax.tree.map(lambda _: True, params)
    try:
        pattern = re.compile(freeze)
    except re.error as e:
        raise ValueError(f"optimizer.freeze={freeze!r} is not a valid regex: {e}") from None
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: pattern.search(path_str(path)) is None, params
    )
    if all(jax.tree.leaves(mask)):
        raise ValueError(f"optimizer.freeze={freeze!r} matches no parameter")
    return mask


def decay_mask(params: Any) -> Any:
    """True for leaves with ndim >= 2 (kernels, embeddings), False for biases and norm scales.

    Decaying biases or LayerNorm/BatchNorm scales towards 0 only fights the normalisation, so
    weight decay is restricted to matrices, as in AdamW's usual recipe.
    """
    return jax.tree.map(lambda x: (x.ndim if hasattr(x, "ndim") else np.ndim(x)) >= 2, params)


def make_optimizer(opt_cfg: Mapping, params: Any, total_steps: int) -> optax.GradientTransformation:
    """Builds the optax transformation described by ``opt_cfg`` for ``params``.

    The chain is: clip (global norm over trainable leaves) → algorithm → decoupled weight decay →
    scale by the scheduled learning rate. With ``freeze``, the chain runs only on trainable leaves
    (``optax.partition``) and frozen leaves get ``set_to_zero``.
    """
    name = _require(opt_cfg, "name")
    if name not in NAMES:
        raise ValueError(f"optimizer.name={name!r} is not one of {list(NAMES)}")
    schedule = make_schedule(opt_cfg, total_steps)
    weight_decay = float(_get(opt_cfg, "weight_decay", 0.0))
    clip_norm = float(_get(opt_cfg, "clip_norm", 0.0))
    if clip_norm < 0:
        raise ValueError(f"optimizer.clip_norm={clip_norm} must be >= 0 (0 turns clipping off)")
    if weight_decay and name == "adam":
        # Plain Adam would drop it silently or couple it to the gradient; make the choice explicit.
        raise ValueError(
            f"optimizer.weight_decay={weight_decay} is set with optimizer.name='adam'; "
            "use name='adamw' for decoupled weight decay, or weight_decay=0"
        )

    parts = []
    if clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if name in ("adam", "adamw"):
        parts.append(
            optax.scale_by_adam(
                b1=float(_get(opt_cfg, "b1", 0.9)),
                b2=float(_get(opt_cfg, "b2", 0.999)),
                eps=float(_get(opt_cfg, "eps", 1e-8)),
                mu_dtype=_moment_dtype(opt_cfg),
            )
        )
    else:
        momentum = float(_get(opt_cfg, "momentum", 0.0))
        if momentum:
            parts.append(
                optax.trace(decay=momentum, nesterov=bool(_get(opt_cfg, "nesterov", False)))
            )
    if weight_decay:
        # After the adaptive/momentum step, so that decay is decoupled from the gradient statistics.
        # A callable mask adapts to the trainable subtree that optax.partition hands in.
        parts.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)

    freeze = _get(opt_cfg, "freeze", "")
    if not freeze:
        return tx
    mask = trainable_mask(params, freeze)  # Raises early if the regex matches nothing.
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"optimizer.freeze={freeze!r} matches every parameter; nothing would train"
        )

    def labels(tree: Any) -> Any:
        return jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask(tree, freeze))

    return optax.partition({"train": tx, "freeze": optax.set_to_zero()}, labels)
