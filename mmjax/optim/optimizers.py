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
* ``freeze`` (default ``""``): a regex searched in each leaf's path (``models.paths.path_str``);
  matching leaves get exactly zero updates and carry no optimizer state, so a frozen pretrained
  tower stays bit-identical and costs no Adam moments. In a scanned model (``model.scan_layers``)
  the regex is also searched in each layer's unrolled name, so ``"image/encoder/layer_[0-5]/"``
  freezes those six layers in either layout; a stacked leaf that is only partly frozen keeps (zero)
  Adam moments for its frozen layers (:func:`keep_layers`);
* ``layer_decay`` (default 0 = off; 1 is off too): layer-wise learning-rate decay (BEiT, ELECTRA).
  In each tower (a top-level subtree other than ``fusion``, ``heads`` and ``lora``) of depth N (its
  number of ``encoder/layer_<i>``), the update of ``encoder/layer_<i>/...`` is multiplied by
  ``layer_decay**(N - i)``, the tower's embeddings (everything not in a layer and not after the
  encoder: patch/token/position/segment embeddings, class token, ``embed_norm``) by
  ``layer_decay**(N + 1)``, and ``encoder/final_norm``, ``pooler``, ``pool_norm``, the fusion module
  and the heads by 1; see :func:`layer_scales`.

``make_optimizer(..., lora_cfg=config.lora)`` with LoRA on (``mmjax.optim.lora``) trains only the
adapters under ``lora/`` and the base params matched by ``lora.train``; everything else gets a zero
update, exactly as ``freeze`` does (and ``freeze`` still applies on top).

Mistakes raise ``ValueError`` naming the config key, since a typo here would otherwise train the
wrong thing without complaint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.models import scan
from mmjax.models.paths import match_per_layer, path_str, searcher
from mmjax.optim import lora

NAMES = ("adamw", "adam", "sgd")
DECAYS = ("cosine", "linear", "constant")
_NOT_TOWERS = ("fusion", "heads", "lora")  # top-level subtrees that layer_decay leaves at 1
_AFTER_ENCODER = ("pooler", "pool_norm")  # tower params applied after the encoder (scale 1)
_LAYER = re.compile(r"layer_(\d+)")
_NEVER_DECAYED = ("bias", "scale")  # leaf names weight decay leaves alone (see decay_mask)


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
    after = {
        "cosine": optax.cosine_decay_schedule(lr, decay_steps, alpha=end_lr / lr if lr else 0.0),
        "linear": optax.linear_schedule(lr, end_lr, decay_steps),
        "constant": optax.constant_schedule(lr),
    }[decay]
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def trainable_mask(params: Any, freeze: str) -> Any:
    """Pytree of bools: False where ``re.search(freeze, path_str(path))`` matches.

    An empty ``freeze`` trains everything. A regex that matches nothing raises instead: a typo such
    as ``"imgae/"`` would otherwise silently train the tower it meant to freeze. In a scanned
    model the regex is also searched in each layer's unrolled name (:func:`match_per_layer`): a
    stacked leaf of which only some layers match gets a numpy bool array [depth] (True = trained)
    instead of a bool, and ``make_optimizer`` zeroes those layers' gradients and updates.
    """
    if not freeze:
        return jax.tree.map(lambda _: True, params)
    try:
        pattern = re.compile(freeze)
    except re.error as e:
        raise ValueError(f"optimizer.freeze={freeze!r} is not a valid regex: {e}") from None
    frozen = searcher(pattern)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, x: match_per_layer(path_str(path), x, lambda n: not frozen(n)), params
    )
    if all(np.all(m) for m in jax.tree.leaves(mask)):
        raise ValueError(f"optimizer.freeze={freeze!r} matches no parameter")
    return mask


def decay_mask(params: Any) -> Any:
    """True for kernels and embeddings (ndim >= 2), False for biases and norm scales.

    Decaying biases or LayerNorm/BatchNorm scales towards 0 only fights the normalisation, so
    weight decay is restricted to matrices, as in AdamW's usual recipe. A leaf named ``bias`` or
    ``scale`` is never decayed, whatever its shape (the attention projections' biases are
    [heads, head_dim]); the leading layer axis of a scanned encoder's stacked params
    (``encoder/layers/...``) is not counted, so a stacked [depth, D] vector is still a vector.
    """

    def decayed(path: tuple, x: Any) -> bool:
        name = path_str(path)
        if name.rsplit("/", 1)[-1] in _NEVER_DECAYED:
            return False
        return np.ndim(x) - scan.is_stacked(name) >= 2

    return jax.tree_util.tree_map_with_path(decayed, params)


def _tower_depths(params: Mapping[str, Any]) -> dict[str, int]:
    """``{tower: number of encoder/layer_<i>}`` for the top-level subtrees that are towers."""
    depths: dict[str, int] = {}
    if not isinstance(params, Mapping):
        return depths
    for name, sub in params.items():
        if name in _NOT_TOWERS or not isinstance(sub, Mapping):
            continue
        encoder = sub.get("encoder", {})
        if scan.SCANNED in encoder:  # scanned: the depth is the stacked leaves' leading axis
            depths[name] = scan.stacked_depth(encoder[scan.SCANNED])
            continue
        idx = [int(m.group(1)) for k in encoder if (m := _LAYER.fullmatch(str(k)))]
        depths[name] = max(idx) + 1 if idx else 0
    return depths


def _layer_scale(path: str, depths: Mapping[str, int], decay: float,
                 ndim: int) -> float | np.ndarray:
    path = lora.base_path(path) or path  # an adapter follows the kernel it adapts
    tower, _, rest = path.partition("/")
    if tower not in depths or not rest:
        return 1.0
    depth = depths[tower]
    first, _, inner = rest.partition("/")
    if first == "encoder":
        head = inner.partition("/")[0]
        if head == scan.SCANNED:  # stacked [depth, ...]: layer i's slice gets its own scale
            per_layer = decay ** (depth - np.arange(depth, dtype=np.float64))
            return per_layer.reshape((depth,) + (1,) * (ndim - 1))
        m = _LAYER.fullmatch(head)
        return decay ** (depth - int(m.group(1))) if m else 1.0  # final_norm: 1
    if first in _AFTER_ENCODER:
        return 1.0
    return decay ** (depth + 1)  # embeddings and everything else before the encoder


def layer_scales(params: Any, decay: float) -> Any:
    """Pytree of each leaf's learning-rate multiplier under ``layer_decay=decay``.

    Depth is counted per tower from the params themselves (``encoder/layer_<i>``, or the leading
    axis of a scanned ``encoder/layers``), so a config needs no depth list and a tower loaded from
    a checkpoint is scaled by its real depth. A leaf's multiplier is a float, or for a stacked
    leaf [depth, ...] a numpy array [depth, 1, ...] holding layer i's multiplier at i. An adapter
    ``lora/<kernel path>/a|b`` gets its kernel's multiplier; ``lora/scale`` gets 1.
    """
    depths = _tower_depths(params)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: _layer_scale(path_str(p), depths, decay, np.ndim(x)), params
    )


def scale_by_layer_decay(params: Any, decay: float) -> optax.GradientTransformation:
    """Multiplies each leaf's update by its :func:`layer_scales` multiplier (stateless).

    Placed after Adam/momentum and the decoupled weight decay and right before the learning
    rate, so the whole step of a leaf (adaptive update + decay) shrinks by its multiplier: the
    same as BEiT/big_vision, which give each layer's parameter group its own learning rate.
    Multipliers are looked up by path, so the transform also works on the masked subtree that
    ``optax.partition`` hands in.
    """
    scales = {path_str(p): s for p, s in
              jax.tree_util.tree_leaves_with_path(layer_scales(params, decay))}

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def scale(path: tuple, u: jax.Array) -> jax.Array:
            s = scales.get(path_str(path), 1.0)
            return u if np.all(s == 1.0) else u * jnp.asarray(s, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def _search_all(pattern: str, key: str, params: Any) -> re.Pattern:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{key}={pattern!r} is not a valid regex: {e}") from None
    matches = searcher(compiled)
    if not any(np.any(match_per_layer(path, x, matches))
               for p, x in jax.tree_util.tree_leaves_with_path(params)
               if not (path := path_str(p)).startswith("lora/")):
        raise ValueError(f"{key}={pattern!r} matches no parameter")
    return compiled


def _trainable_fn(opt_cfg: Mapping, params: Any, lora_cfg: Mapping | None) -> Any:
    """A function tree → mask (True = trained), or None when everything trains.

    A mask leaf is a bool, or for a stacked leaf of which only some layers train a numpy bool
    array [depth] (see :func:`trainable_mask`). Validates the regexes against ``params`` once (a
    typo raises, naming the config key); the returned function works on any tree with the same
    paths and shapes (params, or partition's subtrees).
    """
    freeze = _get(opt_cfg, "freeze", "")
    if freeze:
        trainable_mask(params, freeze)  # Raises early if the regex is bad or matches nothing.
    frozen = searcher(re.compile(freeze)) if freeze else None
    cfg = lora.parse_config(lora_cfg)
    if cfg is None:
        if frozen is None:
            return None
        return lambda tree: trainable_mask(tree, freeze)
    if not isinstance(params, Mapping) or lora.KEY not in params:
        raise ValueError(f"lora.rank={cfg.rank} but the params have no '{lora.KEY}' subtree; "
                         "add the adapters (lora.add_adapters) before building the optimizer")
    extra = searcher(_search_all(cfg.train, "lora.train", params)) if cfg.train else None
    scale_path = f"{lora.KEY}/{lora.SCALE}"

    def trainable(names: tuple[str, ...]) -> bool:
        if frozen is not None and frozen(names):
            return False
        if names[0].startswith(f"{lora.KEY}/"):
            return names[0] != scale_path
        return extra is not None and extra(names)

    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda p, x: match_per_layer(path_str(p), x, trainable), tree
    )


def trainable_leaves(opt_cfg: Mapping, params: Any, lora_cfg: Mapping | None = None) -> Any:
    """Pytree of which leaves ``make_optimizer`` will update (``freeze`` and LoRA): a bool per
    leaf, or a bool array [depth] for a stacked leaf of which only some layers train."""
    fn = _trainable_fn(opt_cfg, params, lora_cfg)
    return jax.tree.map(lambda _: True, params) if fn is None else fn(params)


def trainable_count(opt_cfg: Mapping, params: Any,
                    lora_cfg: Mapping | None = None) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, as ``make_optimizer`` will mask them."""
    mask = jax.tree.leaves(trainable_leaves(opt_cfg, params, lora_cfg))
    sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
    return (sum(s * int(np.sum(m)) // np.size(m) for s, m in zip(sizes, mask, strict=True)),
            sum(sizes))


def keep_layers(keep: Mapping[str, np.ndarray]) -> optax.GradientTransformation:
    """Zeroes the layers of stacked leaves that ``keep`` (path → bool [depth]) marks False.

    The part of ``freeze`` that ``optax.partition`` cannot do: a partly frozen stacked leaf is
    one array, so it stays in the trained partition and this transform, placed first (before
    clipping, so frozen layers add nothing to the global norm and their Adam moments stay 0)
    and last (after weight decay), gives its frozen layers exactly zero updates. Trained layers
    then see the same updates as the same layers unrolled with their frozen neighbours in the
    ``set_to_zero`` partition (tests/test_scan.py). Stateless; looks leaves up by path.
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def apply(path: tuple, u: jax.Array) -> jax.Array:
            k = keep.get(path_str(path))
            if k is None:
                return u
            return jnp.where(k.reshape((-1,) + (1,) * (u.ndim - 1)), u, jnp.zeros_like(u))

        return jax.tree_util.tree_map_with_path(apply, updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(opt_cfg: Mapping, params: Any, total_steps: int, *,
                   lora_cfg: Mapping | None = None) -> optax.GradientTransformation:
    """Builds the optax transformation described by ``opt_cfg`` for ``params``.

    The chain is: clip (global norm over trainable leaves) → algorithm → decoupled weight decay →
    layer-wise decay multipliers (``layer_decay``) → scale by the scheduled learning rate. With
    ``freeze`` or LoRA (``lora_cfg``, i.e. ``config.lora``), the chain runs only on trainable
    leaves (``optax.partition``) and frozen leaves get ``set_to_zero``.
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
    layer_decay = float(_get(opt_cfg, "layer_decay", 0.0))
    if not 0.0 <= layer_decay <= 1.0:
        raise ValueError(f"optimizer.layer_decay={layer_decay} must lie in (0, 1] "
                         "(0 or 1 turns it off)")
    if 0.0 < layer_decay < 1.0:
        parts.append(scale_by_layer_decay(params, layer_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)

    trainable = _trainable_fn(opt_cfg, params, lora_cfg)
    if trainable is None:
        return tx
    masks = trainable(params)
    if not any(np.any(m) for m in jax.tree.leaves(masks)):
        freeze = _get(opt_cfg, "freeze", "")
        lora_on = lora.enabled(lora_cfg)
        what = "every LoRA adapter and lora.train param" if lora_on else "every parameter"
        raise ValueError(f"optimizer.freeze={freeze!r} matches {what}; nothing would train")

    partial = {path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(masks)
               if isinstance(m, np.ndarray)}
    if partial:  # stacked leaves with some layers frozen: zero those layers in and out
        tx = optax.chain(keep_layers(partial), tx, keep_layers(partial))

    def labels(tree: Any) -> Any:
        return jax.tree.map(lambda t: "train" if np.any(t) else "freeze", trainable(tree))

    return optax.partition({"train": tx, "freeze": optax.set_to_zero()}, labels)
