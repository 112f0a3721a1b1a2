"""The tree the optimizer updates: the model's params and, under keys of their own beside the
towers, the LoRA adapters (``lora/...``) and the learned loss weights (``loss_weights/...``).

The train state keeps the three apart (``TrainState.params``, ``.adapters``,
``.loss_weights``: params are the model's own, nothing else); the step joins them for the
optimizer, whose freeze and LoRA rules are regexes over this tree's paths, and splits the
update again. A checkpoint written before the state had those fields holds the adapters and
loss weights inside its params; :func:`from_saved` reads either layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ADAPTERS = "lora"  # the LoRA adapters' key in the joined tree
LOSS_WEIGHTS = "loss_weights"  # the learned loss weights' key
SAVED = ("params", "adapters", "loss_weights")  # the train state's fields that hold them


def join(params: Mapping[str, Any], adapters: Any = None, loss_weights: Any = None
         ) -> dict[str, Any]:
    """One tree of the three (the ones that are None left out)."""
    out = dict(params)
    if adapters is not None:
        out[ADAPTERS] = adapters
    if loss_weights is not None:
        out[LOSS_WEIGHTS] = loss_weights
    return out


def split(tree: Mapping[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """(params, adapters or None, loss weights or None) of a joined tree."""
    params = {k: v for k, v in tree.items() if k not in (ADAPTERS, LOSS_WEIGHTS)}
    return params, tree.get(ADAPTERS), tree.get(LOSS_WEIGHTS)


def from_saved(state: Mapping[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """(params, adapters, loss weights) of a saved train state read back as a dict."""
    params, adapters, loss_weights = split(state["params"])
    return (params, state.get("adapters") if adapters is None else adapters,
            state.get("loss_weights") if loss_weights is None else loss_weights)
