"""Stacked layers (``model.scan_layers``) and rematerialisation, and the conversions between the
stacked and the unrolled parameter layouts.

Unrolled, an encoder's blocks are ``layer_<i>/<param>``; scanned, they are one ``nn.scan`` whose
params sit under ``layers/<param>`` with a leading depth axis (the co-attention fusion's
``<stream>_layer_<i>`` become ``co_layers/<stream>/...``), as big_vision's and MaxText's scan
options do. :func:`match_layers` converts a tree to another's layout, so Hugging Face towers,
``init_from`` checkpoints and exports work with either.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

SCANNED = "layers"  # the subtree of a scanned Encoder: every Block param stacked on axis 0
SCANNED_PAIRS = "co_layers"  # the scanned co-attention fusion: co_layers/<stream>/<param>
_LAYER_KEY = re.compile(r"layer_(\d+)")
_STREAM_LAYER_KEY = re.compile(r"(.+)_layer_(\d+)")


def remat(block: type[nn.Module], policy: str | None, *, scanned: bool = False,
          looped: bool = False) -> type[nn.Module]:
    """``block`` rematerialised under a named ``jax.checkpoint_policies`` policy (or as is).

    ``scanned``: the block is a scan body, whose ``train`` is a field; otherwise ``train`` is
    call argument 5 (counting self) and must stay a Python bool. ``looped``: one layer per loop
    iteration, where the loop already keeps XLA from merging the recomputation back into the
    forward pass, so remat's own barrier is not needed.
    """
    if not policy:
        return block
    if not hasattr(jax.checkpoint_policies, policy):
        raise ValueError(f"unknown remat policy {policy!r} (model.remat)")
    policy_fn = getattr(jax.checkpoint_policies, policy)
    if scanned:
        return nn.remat(block, policy=policy_fn, prevent_cse=not looped)
    return nn.remat(block, policy=policy_fn, static_argnums=(5,))


def scan_over_layers(layer_cls: type[nn.Module], depth: int, unroll: int = 0) -> type[nn.Module]:
    """``layer_cls`` run ``depth`` times as one ``nn.scan``: params stacked on axis 0, a fresh
    init and dropout draw per layer, every call argument after the carry broadcast to all.

    ``unroll`` layers run per loop iteration (0 = all of them: the step has no loop, only the
    stacked params; 1 = a loop, which compiles fastest). The math is the same for every value.
    """
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=depth,
        unroll=unroll if unroll > 0 else depth,
    )


def _stack_blocks(blocks: dict[int, Any], what: str) -> Any:
    """``{0: tree, ..., n-1: tree}`` → one tree whose leaves are stacked on a new axis 0."""
    if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{what}: layers {sorted(blocks)} are not 0 .. n-1, so they cannot be "
                         "stacked")
    return jax.tree.map(lambda *xs: np.stack(xs), *(blocks[i] for i in range(len(blocks))))


def stacked_depth(stacked: Any, what: str = SCANNED) -> int:
    """The layer count of a stacked subtree: the leading axis all its leaves share."""
    depth = {np.shape(x)[0] for x in jax.tree.leaves(stacked)}
    if len(depth) != 1:
        raise ValueError(f"{what}: the stacked leaves disagree on the depth: {sorted(depth)}")
    return depth.pop()


def _slices(stacked: Any, prefix: str, what: str) -> dict[str, Any]:
    """A stacked subtree → ``{<prefix>layer_<i>: layer i's tree}``."""
    return {f"{prefix}layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
            for i in range(stacked_depth(stacked, what))}


def _collect(tree: Mapping[str, Any], pattern: re.Pattern) -> tuple[dict, dict[str, Any]]:
    """Splits ``tree`` into ``{stream: {i: layer tree}}`` (keys matching ``pattern``; stream ""
    for plain ``layer_<i>``) and the other entries."""
    groups: dict[str, dict[int, Any]] = {}
    rest = {}
    for k, v in tree.items():
        if m := pattern.fullmatch(str(k)):
            *stream, i = m.groups()
            groups.setdefault(stream[0] if stream else "", {})[int(i)] = v
        else:
            rest[k] = v
    return groups, rest


def _stack(tree: Mapping[str, Any]) -> dict[str, Any]:
    groups, rest = _collect(tree, _LAYER_KEY)
    return {**rest, SCANNED: _stack_blocks(groups[""], "layer_<i>")}


def _unstack(tree: Mapping[str, Any]) -> dict[str, Any]:
    rest = {k: v for k, v in tree.items() if k != SCANNED}
    return {**rest, **_slices(tree[SCANNED], "", SCANNED)}


def _stack_pairs(tree: Mapping[str, Any]) -> dict[str, Any]:
    groups, rest = _collect(tree, _STREAM_LAYER_KEY)
    return {**rest, SCANNED_PAIRS: {s: _stack_blocks(b, f"{s}_layer_<i>")
                                    for s, b in groups.items()}}


def _unstack_pairs(tree: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in tree.items() if k != SCANNED_PAIRS}
    for s, stacked in tree[SCANNED_PAIRS].items():
        out.update(_slices(stacked, f"{s}_", f"{SCANNED_PAIRS}/{s}"))
    return out


def _has_stream_layers(tree: Mapping[str, Any]) -> bool:
    return any(_STREAM_LAYER_KEY.fullmatch(str(k)) for k in tree)


def match_layers(source: Any, target: Any) -> Any:
    """``source`` params with every encoder's layers in ``target``'s layout (scanned or not).

    Walks both trees together, stacking ``layer_<i>`` where ``target`` has ``layers`` and
    splitting the other way round (likewise ``<stream>_layer_<i>`` and ``co_layers``). Names that
    differ otherwise are left for the caller's own check; converted values are numpy arrays.
    """
    if not isinstance(source, Mapping) or not isinstance(target, Mapping):
        return source
    src = dict(source)
    if SCANNED in target and SCANNED not in src and "layer_0" in src:
        src = _stack(src)
    elif "layer_0" in target and SCANNED in src and "layer_0" not in src:
        src = _unstack(src)
    if SCANNED_PAIRS in target and SCANNED_PAIRS not in src and _has_stream_layers(src):
        src = _stack_pairs(src)
    elif SCANNED_PAIRS in src and SCANNED_PAIRS not in target and _has_stream_layers(target):
        src = _unstack_pairs(src)
    return {k: match_layers(v, target[k]) if k in target else v for k, v in src.items()}


def unstack_all(tree: Any) -> Any:
    """``tree`` with every stacked subtree split into ``layer_<i>`` (the Hugging Face layout)."""
    if not isinstance(tree, Mapping):
        return tree
    tree = _unstack(tree) if SCANNED in tree else tree
    tree = _unstack_pairs(tree) if SCANNED_PAIRS in tree else tree
    return {k: unstack_all(v) for k, v in tree.items()}


def is_stacked(path: str) -> bool:
    """Whether a param path (``a/b/c``) lies in stacked layers (``layers/`` or ``co_layers/``)."""
    return f"/{SCANNED}/" in f"/{path}" or f"/{SCANNED_PAIRS}/" in f"/{path}"


def layer_paths(path: str, depth: int) -> list[str]:
    """The unrolled names of a stacked leaf's ``depth`` slices, layer 0 first.

    ``image/encoder/layers/mlp/fc1/kernel`` → ``image/encoder/layer_<i>/mlp/fc1/kernel`` and
    ``fusion/co_layers/<s>/...`` → ``fusion/<s>_layer_<i>/...``, so a regex written for the
    unrolled layout applies to each layer of a scanned model. Other paths come back alone.
    """
    parts = path.split("/")
    for j, part in enumerate(parts):
        if part == SCANNED:
            return ["/".join([*parts[:j], f"layer_{i}", *parts[j + 1:]]) for i in range(depth)]
        if part == SCANNED_PAIRS and j + 1 < len(parts):
            stream = parts[j + 1]
            return ["/".join([*parts[:j], f"{stream}_layer_{i}", *parts[j + 2:]])
                    for i in range(depth)]
    return [path]
