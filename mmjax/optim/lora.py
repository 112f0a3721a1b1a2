"""LoRA (low-rank adapters) for any mmjax model, as pure functions of the optimizer's tree.

``config.lora = {rank, alpha, targets, train}`` (absent, or ``rank`` 0, turns it off):

* ``rank`` (int): r, the inner size of every adapter;
* ``alpha`` (float, default ``rank``): the adapter output is scaled by ``alpha / rank``, so
  changing r does not change the size of the initial updates (Hu et al., 2021);
* ``targets`` (regex, default :data:`DEFAULT_TARGETS`): searched in each leaf's path
  (``mmjax.models.paths.path_str``); matching kernels get an adapter. The default is the attention
  query/key/value/out and MLP fc1/fc2 kernels of every tower and of the fusion module;
* ``train`` (regex, default ``"^heads/"``): base params that stay trainable next to the adapters
  (a new task head must learn); ``""`` trains the adapters alone.

Nothing in the model code changes. :func:`add_adapters` puts a ``lora`` subtree next to the model's
params in the tree the optimizer updates (``mmjax.optim.trainable``; the train state keeps it as
``TrainState.adapters``), mirroring the targeted kernels' paths: ``lora/<kernel path>/a`` [n_in, r]
(random, std 1/sqrt(n_in)) and ``lora/<kernel path>/b`` [r, n_out] (zeros, so the model starts
exactly as the base), and ``lora/scale`` = alpha/rank. The trainer's ``forward`` calls
:func:`effective_params`, which returns the plain tree the model expects with every targeted kernel
replaced by ``W + scale · (a @ b)`` reshaped to W's shape;
``mmjax.optim.optimizers.make_optimizer`` gives every base param not matched by ``train`` a zero
update (``optax.set_to_zero``), so only the adapters (and the heads) move and only they carry
optimizer state.

The scale lives with the adapters (a frozen scalar leaf) rather than only in the config, so a
checkpoint merges on its own, with no config at hand (:func:`merge`,
:func:`merged_params_from_workdir`).

Kernels are flattened to matrices the way ``nn.DenseGeneral`` contracts them: a Dense kernel
[n_in, n_out] as is; the attention query/key/value kernels [D, H, hd] as [D, H·hd]; the attention
output kernel ``…/out/kernel`` [H, hd, D] as [H·hd, D]; a convolution kernel [kh, kw, c_in,
c_out] as [kh·kw·c_in, c_out]. A kernel stacked by ``model.scan_layers=True`` ([depth, ...],
``…/layers/…``) gets stacked adapters, ``a`` [depth, n_in, r] and ``b`` [depth, r, n_out], layer
i's pair at i: what the unrolled model's ``layer_<i>`` pairs are, stacked (``scan.match_layers``
converts one into the other like any params). ``targets``, ``train`` and ``optimizer.freeze``
regexes may name ``layer_<i>`` in either layout; an adapter covers all layers of its stacked
kernel, so ``targets`` must match all of them or none.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax.io import checkpoint
from mmjax.models import scan
from mmjax.models.paths import leaves as path_leaves
from mmjax.models.paths import match_per_layer, searcher
from mmjax.optim import trainable

log = logging.getLogger(__name__)

KEY = trainable.ADAPTERS  # the subtree of the optimizer's tree that holds the adapters
SCALE = "scale"  # params["lora"]["scale"] = alpha / rank
_TOWER_PREFIX = r"^(?!heads/|lora/)(?:.*/)?"
DEFAULT_TARGETS = (
    _TOWER_PREFIX + r"(?:attn|cross_attn)/(?:query|key|value|out)/kernel$|"
    + _TOWER_PREFIX + r"mlp/fc[12]/kernel$"
)
DEFAULT_TRAIN = r"^heads/"
_ADAPTABLE = ("kernel", "embedding")  # leaf names of Dense/DenseGeneral/Conv and nn.Embed


@dataclass(frozen=True)
class LoraConfig:
    """``config.lora`` read with its defaults; see the module docstring for the meaning."""

    rank: int
    alpha: float
    targets: str
    train: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_config(lora_cfg: Mapping[str, Any] | None) -> LoraConfig | None:
    """``config.lora`` (a ConfigDict, a dict, or None) → LoraConfig, or None when LoRA is off.

    Every key is optional; a bad value raises ``ValueError`` naming ``lora.<key>``, since a wrong
    regex here would silently fine-tune the wrong weights.
    """
    if not lora_cfg:
        return None
    rank = lora_cfg.get("rank", 0) or 0
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 0:
        raise ValueError(f"lora.rank={rank!r} must be an integer >= 0 (0 turns LoRA off)")
    if rank == 0:
        return None
    alpha = lora_cfg.get("alpha", None)
    alpha = float(rank if alpha in (None, 0) else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora.alpha={alpha!r} must be a positive number (default: rank)")
    targets = lora_cfg.get("targets", None) or DEFAULT_TARGETS
    train = lora_cfg.get("train", None)
    train = DEFAULT_TRAIN if train is None else train
    for key, pattern in (("targets", targets), ("train", train)):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"lora.{key}={pattern!r} is not a valid regex: {e}") from None
    return LoraConfig(int(rank), alpha, targets, train)


def enabled(lora_cfg: Mapping[str, Any] | None) -> bool:
    """True when ``config.lora`` asks for adapters (``rank`` > 0)."""
    return parse_config(lora_cfg) is not None


def n_in_axes(path: str, shape: tuple[int, ...]) -> int:
    """How many leading axes of a kernel are inputs (the rest are outputs); see module doc."""
    ndim = len(shape)
    if ndim == 2:
        return 1
    if ndim == 3:  # DenseGeneral: attention out [H, hd, D] contracts two axes, q/k/v one
        return 2 if path.endswith("/out/kernel") or path == "out/kernel" else 1
    return ndim - 1  # convolution [..., c_in, c_out]


def matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(n_in, n_out) of a kernel flattened as its module contracts it (per layer for a kernel
    stacked by ``model.scan_layers``, whose leading axis is the layer)."""
    if scan.is_stacked(path):
        shape = shape[1:]
    k = n_in_axes(path, shape)
    return math.prod(shape[:k]), math.prod(shape[k:])


def target_paths(params: Any, targets: str) -> list[str]:
    """Paths of the base params matched by ``targets``; each must be a ``kernel`` or an
    ``embedding`` of 2 or more dimensions (a bias or norm scale has no low-rank update).

    A kernel stacked by ``model.scan_layers`` gets one adapter for all its layers (stacked the
    same way), so a regex must match all of its layers or none (``layer_<i>`` names count).
    """
    matches = searcher(re.compile(targets))
    found = []
    for path, x in path_leaves({k: v for k, v in params.items() if k != KEY}).items():
        matched = np.atleast_1d(match_per_layer(path, x, matches))
        if not matched.any():
            continue
        stacked = scan.is_stacked(path)
        if path.rsplit("/", 1)[-1] not in _ADAPTABLE or np.ndim(x) - stacked < 2:
            raise ValueError(f"lora.targets={targets!r} matches {path} of shape {np.shape(x)}; "
                             "only kernels (…/kernel) and embedding tables (…/embedding) of 2 "
                             "or more dimensions can take an adapter")
        if not matched.all():
            raise ValueError(f"lora.targets={targets!r} matches layers "
                             f"{np.flatnonzero(matched).tolist()} of {np.shape(x)[0]} of {path}, "
                             "a kernel stacked by model.scan_layers=True; its adapter covers "
                             "every layer, so match all of them or none (or set "
                             "model.scan_layers=False)")
        found.append(path)
    if not found:
        raise ValueError(f"lora.targets={targets!r} matches no parameter")
    return found


def _numpy_rng(rng: jax.Array | int) -> np.random.Generator:
    """A numpy Generator seeded by a jax PRNG key (or an int).

    Drawing the adapters on the host costs no XLA compilation per kernel shape, which eagerly
    drawn ``jax.random.normal`` would (seconds on a small CPU), and is as reproducible.
    """
    if isinstance(rng, int | np.integer):
        return np.random.default_rng(int(rng))
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.random.default_rng(np.asarray(rng, np.uint32).ravel().tolist())


def add_adapters(params: Mapping[str, Any], lora_cfg: Mapping[str, Any] | None,
                 rng: jax.Array | int) -> dict[str, Any]:
    """``params`` plus ``params["lora"]``: an (a, b) pair per targeted kernel, and the scale.

    ``a`` [n_in, r] is drawn N(0, 1/n_in) (so ``x @ a`` keeps the input's scale) and ``b``
    [r, n_out] is zero, so the effective model equals the base model at step 0. ``rng`` (a jax
    key or an int) seeds the draw. Returns ``params`` unchanged when LoRA is off.
    """
    cfg = parse_config(lora_cfg)
    if cfg is None:
        return dict(params)
    if KEY in params:
        raise ValueError(f"params already hold a '{KEY}' subtree; adapters are added once")
    leaves = path_leaves(params)
    paths = target_paths(params, cfg.targets)
    gen = _numpy_rng(rng)
    adapters: dict[str, Any] = {SCALE: jnp.asarray(np.float32(cfg.scale))}
    for path in paths:
        kernel = leaves[path]
        n_in, n_out = matrix_shape(path, np.shape(kernel))
        lead = np.shape(kernel)[:1] if scan.is_stacked(path) else ()  # one pair per layer
        dtype = np.dtype(kernel.dtype)
        a = gen.standard_normal((*lead, n_in, cfg.rank)) / math.sqrt(n_in)
        node = adapters
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node["a"] = jnp.asarray(a.astype(dtype))
        node["b"] = jnp.asarray(np.zeros((*lead, cfg.rank, n_out), dtype))
    return {**params, KEY: adapters}


def adapter_pairs(adapters: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{kernel path: (a, b)}`` of a ``params["lora"]`` subtree."""
    flat = traverse_util.flatten_dict({k: v for k, v in adapters.items() if k != SCALE}, sep="/")
    return {path[:-2]: (flat[path], flat[path[:-2] + "/b"])
            for path in flat if path.endswith("/a") and path[:-2] + "/b" in flat}


def base_path(path: str) -> str | None:
    """The kernel a LoRA leaf adapts (``lora/X/a`` → ``X``); None for other paths."""
    if path.startswith(f"{KEY}/") and path.endswith(("/a", "/b")):
        return path[len(KEY) + 1 : -2]
    return None


def _fold(params: Mapping[str, Any], *, host: bool) -> dict[str, Any]:
    """``params`` without ``lora/``, each adapted kernel replaced by ``W + scale·(a @ b)``:
    traced jax arrays (``host=False``), or numpy computed in float64 (``host=True``)."""
    xp = np if host else jnp
    flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != KEY}, sep="/")
    if host:
        flat = {k: np.asarray(v) for k, v in flat.items()}
    scale = params[KEY][SCALE]
    for path, (a, b) in adapter_pairs(params[KEY]).items():
        if path not in flat:
            raise ValueError(f"LoRA adapter lora/{path} has no base parameter {path}")
        kernel = flat[path]
        delta: Any
        if host:
            delta = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        else:
            delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
        if delta.size != np.size(kernel):
            raise ValueError(f"LoRA adapter lora/{path}: a{tuple(np.shape(a))} @ "
                             f"b{tuple(np.shape(b))} does not fit the kernel's shape "
                             f"{tuple(np.shape(kernel))}")
        base = kernel.astype(np.float64) if host else kernel
        update = xp.asarray(scale, base.dtype if host else None) * delta.reshape(np.shape(kernel))
        flat[path] = (base + update).astype(kernel.dtype) if host else \
            kernel + update.astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def effective_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """The params the model runs with: targeted kernels become ``W + scale·(a @ b)``.

    Returns a tree without the ``lora`` subtree, so ``model.apply`` sees exactly its own
    structure; without a ``lora`` subtree it returns ``params`` itself. Traceable (the trainer
    calls it inside the jitted step), and differentiable w.r.t. both W and the adapters.
    """
    if KEY not in params:
        return params
    return _fold(params, host=False)


def merge(params: Mapping[str, Any]) -> dict[str, Any]:
    """The export step: plain numpy params with the adapters folded into their kernels.

    The values of :func:`effective_params` (computed on the host in float64, then cast to each
    kernel's dtype, so no XLA compilation is needed); the result loads into the model, or into
    ``transfer.write_checkpoint`` / ``mmjax.convert``, with no LoRA code involved.
    """
    if KEY not in params:
        return {k: jax.tree.map(np.asarray, v) for k, v in params.items()}
    return _fold(params, host=True)


def read_model_params(path: str | Path) -> dict[str, Any]:
    """The plain model params of an mmjax checkpoint (``io.checkpoint`` paths), as numpy, with
    a LoRA run's adapters folded into their kernels: what every consumer of a checkpoint's
    weights (tower ``init_from``, ``config.init_from``, ``convert``) wants."""
    params, adapters, _ = _read(path)
    if adapters is not None:
        log.info("%s: LoRA adapters merged into their kernels", path)
    return merge(trainable.join(params, adapters))


def _read(path: str | Path) -> tuple[dict[str, Any], Any, Any]:
    """(params, adapters, loss weights) of a checkpoint (``io.checkpoint`` paths), as numpy."""
    state = checkpoint.read_state(checkpoint.checkpoint_state_dir(path), trainable.SAVED)
    return trainable.from_saved(jax.tree.map(np.asarray, state))


def merged_params_from_workdir(workdir: str | Path) -> dict[str, Any]:
    """Plain (merged) params of the newest checkpoint of a LoRA training workdir, as numpy.

    ``workdir``'s ``config.json`` (written by the trainer) is checked against the adapters found:
    its ``lora.rank`` and ``alpha/rank`` must match the checkpoint, so a workdir whose config was
    edited after training fails instead of exporting a different model. A checkpoint without
    adapters (LoRA off) is returned as it is.
    """
    params, adapters, _ = _read(workdir)
    params = trainable.join(params, adapters)
    cfg_file = Path(workdir) / "config.json"
    cfg = parse_config(json.loads(cfg_file.read_text()).get("lora")) if cfg_file.is_file() \
        else None
    if KEY in params:
        pairs = adapter_pairs(params[KEY])
        ranks = {np.shape(a)[-1] for a, _ in pairs.values()}
        stored = float(np.asarray(params[KEY][SCALE]))
        if cfg is not None and (ranks != {cfg.rank} or not math.isclose(stored, cfg.scale)):
            raise ValueError(f"{workdir}: config.json has lora rank={cfg.rank}, "
                             f"alpha/rank={cfg.scale}, but the checkpoint's adapters have "
                             f"rank {sorted(ranks)} and scale {stored}")
        log.info("%s: merging %d LoRA adapters (rank %s, scale %g)", workdir, len(pairs),
                 sorted(ranks), stored)
    elif cfg is not None:
        raise ValueError(f"{workdir}: config.json has lora.rank={cfg.rank} but the checkpoint "
                         "holds no adapters")
    return merge(params)
