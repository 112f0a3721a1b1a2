"""Parameter paths: one spelling (``"image/encoder/layer_0/mlp/fc1/kernel"``) for every tree.

Freeze, LoRA and sharding rules are regexes over these paths. A leaf of a scanned encoder
(``.../layers/...``, stacked ``[depth, ...]``) is also known by its layers' unrolled names, so a
rule written for ``layer_<i>`` selects layers in either layout (:func:`match_per_layer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from mmjax.models import scan


def path_str(path: tuple) -> str:
    """A leaf's key path as ``"a/b/0/c"``, whatever containers (dicts, dataclasses, lists)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaves(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` of a tree, in tree order."""
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def match_per_layer(path: str, x: Any,
                    keep: Callable[[tuple[str, ...]], bool]) -> bool | np.ndarray:
    """``keep(names)`` for one leaf: a bool, or one bool per layer for a stacked leaf.

    ``names`` is the leaf's path alone, or for a stacked leaf its path and layer i's unrolled
    path. Returns a bool when every layer agrees, else a numpy bool array [depth].
    """
    if not scan.is_stacked(path) or np.ndim(x) == 0:
        return bool(keep((path,)))
    per_layer = np.array([bool(keep((path, name)))
                          for name in scan.layer_paths(path, np.shape(x)[0])])
    return bool(per_layer[0]) if per_layer.all() or not per_layer.any() else per_layer


def searcher(pattern: re.Pattern) -> Callable[[Iterable[str]], bool]:
    """``names → bool``: does ``pattern`` occur in any of them?"""
    return lambda names: any(pattern.search(n) for n in names)
