"""L∞ adversarial attacks on a classification head: FGSM and PGD, on pixels and token embeddings.

FGSM (Goodfellow et al. 2015) takes one step of size ``eps`` along the sign of the loss gradient;
PGD (Madry et al. 2018) takes ``steps`` steps of ``step_size`` (default ``2.5 * eps / steps``), each
projected back onto the ``eps`` ball around the clean input, from the clean input (no random start,
so ``eps = 0`` changes nothing). Each modality says where it is attacked (``mmjax.modalities``'
``Attack``): images on the ``[0, 1]`` pixel scale (``eps = 8/255`` is eight grey levels), clipped to
it; text on the tower's input token embeddings, only at real tokens, in embedding units. Robust
accuracy counts an example as correct if the model is right on every input the attack evaluated (the
clean one and each iterate), so more iterates never raise it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import modalities
from mmjax.errors import ExplainedError

METHODS = ("fgsm", "pgd")


class AttackError(ValueError, ExplainedError):
    """A bad attack option or a model the attack cannot act on; the message says."""


def targets(encoders: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The towers' modalities an attack can perturb (those that declare an ``attack``)."""
    return [m for m in encoders if modalities.get(m).attack is not None]


def _attack(modality: str) -> modalities.Attack:
    attack = modalities.get(modality).attack
    if attack is None:
        raise AttackError(f"modality {modality!r} declares no attack")
    return attack


def _inputs(variables: Mapping[str, Any], batch: Mapping[str, Any], names: Sequence[str]
            ) -> tuple[dict, dict, dict, dict]:
    """(clean attacked inputs, L∞ step masks, lower bounds, upper bounds) per modality."""
    x0, masks, lo, hi = {}, {}, {}, {}
    for m in names:
        x0[m], masks[m], lo[m], hi[m] = _attack(m).start(batch[m], variables["params"][m])
    return x0, masks, lo, hi


def _with(batch: Mapping[str, Any], x: Mapping[str, jax.Array]) -> dict[str, Any]:
    return {**batch, **{m: _attack(m).put(batch[m], v) for m, v in x.items()}}


def attack_batch(model: Any, variables: Mapping[str, Any], batch: Mapping[str, Any], *,
                 task: str, names: Sequence[str], method: str, eps: jax.Array,
                 steps: int = 10, step_size: jax.Array | None = None
                 ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """(adversarial inputs per modality, clean correct [B], robust correct [B]) of one batch;
    traceable (``eps`` and ``step_size`` may be traced, ``steps`` and ``names`` are static)."""
    if method not in METHODS:
        raise AttackError(f"--attack={method!r}; expected one of {METHODS}")
    labels = batch["label"]
    x0, masks, lo, hi = _inputs(variables, batch, names)

    def loss_and_correct(x: dict) -> tuple[jax.Array, jax.Array]:
        logits = model.apply(variables, _with(batch, x))[task]["logits"]
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return loss, jnp.argmax(logits, axis=-1) == labels

    grad_fn = jax.grad(loss_and_correct, has_aux=True)
    if method == "fgsm":
        n, alpha = 1, eps
    else:
        n = int(steps)
        alpha = 2.5 * eps / n if step_size is None else step_size

    def step(_: int, carry: tuple[dict, jax.Array]) -> tuple[dict, jax.Array]:
        x, robust = carry
        g, correct = grad_fn(x)
        new = {}
        for m in x:
            moved = x[m] + alpha * jnp.sign(g[m]) * masks[m]
            new[m] = jnp.clip(jnp.clip(moved, x0[m] - eps, x0[m] + eps), lo[m], hi[m])
        return new, robust & correct

    _, clean = loss_and_correct(x0)
    x, robust = jax.lax.fori_loop(0, n, step, (x0, jnp.ones_like(clean)))
    _, last = loss_and_correct(x)
    return x, clean, robust & last


def robust_accuracy(model: Any, variables: Mapping[str, Any], batches: Iterable[dict], *,
                    task: str, names: Sequence[str], method: str, eps: float,
                    steps: int = 10, step_size: float | None = None) -> dict[str, float]:
    """``{"accuracy", "clean_accuracy", "eps", "steps", "step_size", "count"}`` of the attack
    over the valid rows of ``batches`` (one device, ``jax.jit``)."""
    if method not in METHODS:
        raise AttackError(f"--attack={method!r}; expected one of {METHODS}")
    if not eps >= 0:
        raise AttackError(f"--eps={eps!r} must be >= 0")
    if method == "pgd" and int(steps) < 1:
        raise AttackError(f"--steps={steps!r} must be >= 1")
    if not names:
        raise AttackError("the model has no tower an attack can perturb (modalities with an "
                          f"attack: {[m for m in modalities.names() if modalities.get(m).attack]})")
    fn = jax.jit(functools.partial(attack_batch, model, task=task, names=tuple(names),
                                   method=method, steps=int(steps)))
    variables = jax.device_put(variables)
    clean_sum = robust_sum = count = 0.0
    for batch in batches:
        valid = np.asarray(batch["valid"]) > 0
        inputs = {k: v for k, v in batch.items() if k != "valid"}
        _, clean, robust = fn(variables, inputs, eps=jnp.float32(eps),
                              step_size=None if step_size is None else jnp.float32(step_size))
        clean_sum += float(np.asarray(clean)[valid].sum())
        robust_sum += float(np.asarray(robust)[valid].sum())
        count += float(valid.sum())
    n = max(count, 1.0)
    used = eps if method == "fgsm" else (2.5 * eps / int(steps) if step_size is None
                                         else step_size)
    return {"accuracy": robust_sum / n, "clean_accuracy": clean_sum / n, "eps": float(eps),
            "steps": 1 if method == "fgsm" else int(steps), "step_size": float(used),
            "count": int(count)}
