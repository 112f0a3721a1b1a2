"""The explained model: the trained model with ``Options.explain`` on, and one forward pass that
returns class probabilities, every attention map and its gradient, and every layer's tokens.

Fused kernels (cuDNN) never materialise attention weights, so the model is rebuilt on the XLA
path with explicit weights; scanned layers are unrolled and remat is dropped (inference only).
Parameters are the same arrays, so the explained model computes what the trained one does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp

from mmjax.models import scan
from mmjax.models.multimodal import MultimodalModel

Array = jax.Array
PERTURB = "perturbations"


def explained_model(model: MultimodalModel, variables: Mapping[str, Any]
                    ) -> tuple[MultimodalModel, dict[str, Any]]:
    """``model`` with explicit, captured attention (XLA path, unrolled layers, no remat) and its
    ``variables`` in the unrolled layout."""
    opts = dataclasses.replace(model.opts, explain=True, attn_implementation=None, remat=None,
                               scan_layers=False, scan_unroll=0)
    variables = dict(variables)
    if model.opts.scan_layers:
        variables["params"] = scan.unstack_all(variables["params"])
    return model.clone(opts=opts), variables


def paths(tree: Any, leaf_name: str) -> dict[str, Any]:
    """``{"a/b/c": value}`` for every sown/perturbed entry called ``leaf_name``."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")
    out = {}
    for path, value in flat.items():
        parent, _, name = path.rpartition("/")
        if name == leaf_name:
            out[parent] = value[0] if isinstance(value, tuple) else value
    return out


def zero_perturbations(model: MultimodalModel, variables: Mapping[str, Any],
                       batch: Mapping[str, Any]) -> dict[str, Any]:
    """The model's perturbation tree (attention maps, token embeddings), all zeros."""
    def init(b: Mapping[str, Any]) -> Any:
        _, state = model.apply(variables, b, mutable=[PERTURB])
        return state[PERTURB]
    shapes = jax.eval_shape(init, batch)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def with_perturbation(perturb: Mapping[str, Any], path: str, value: Array) -> dict[str, Any]:
    """``perturb`` with the entry at ``path`` (e.g. ``text/token_embeddings``) set."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(perturb)), sep="/")
    if path not in flat:
        raise ValueError(f"the model has no perturbation point {path!r}; it has {sorted(flat)}")
    flat[path] = value
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def probs_fn(model: MultimodalModel, task: str
             ) -> Callable[[Mapping[str, Any], Mapping[str, Any], Any], Array]:
    """``fn(variables, batch, perturbations) -> probs [B, C]`` of classification head ``task``."""
    def fn(variables: Mapping[str, Any], batch: Mapping[str, Any], perturb: Any) -> Array:
        out: Any = model.apply({**variables, PERTURB: perturb}, batch)
        return jax.nn.softmax(out[task]["logits"].astype(jnp.float32), axis=-1)
    return fn


def capture(model: MultimodalModel, task: str, variables: Mapping[str, Any],
            batch: Mapping[str, Any], perturb: Any, target: Array | None = None
            ) -> dict[str, Any]:
    """One forward pass and the gradient of the target class's logit (default: the predicted
    class) with respect to every attention map.

    Returns ``{"probs" [B, C], "target" [B], "attention": {path: [B, H, Tq, Tk]},
    "grads": {path: same}, "tokens": {block path: [B, T, D]}}`` (paths like
    ``fusion/encoder/layer_0/cross_attn``).
    """
    def logits_of(p: Any) -> tuple[Array, tuple[Array, Array, Any]]:
        out, state = model.apply({**variables, PERTURB: p}, batch, mutable=["intermediates"])
        logits = out[task]["logits"].astype(jnp.float32)
        chosen = jnp.argmax(logits, -1) if target is None else target
        picked = jnp.take_along_axis(logits, chosen[:, None], axis=1).sum()
        return picked, (jax.nn.softmax(logits, -1), chosen, state["intermediates"])

    grads, (probs, chosen, inter) = jax.grad(logits_of, has_aux=True)(perturb)
    return {
        "probs": probs, "target": chosen,
        "attention": paths(inter, "attention"),
        "grads": paths(grads, "attention"),
        "tokens": paths(inter, "tokens"),
    }
