"""L∞ adversarial attacks on a classification head: FGSM and PGD, on pixels and token embeddings.

FGSM (Goodfellow et al. 2015) takes one step of size ``eps`` along the sign of the loss
gradient; PGD (Madry et al. 2018) takes ``steps`` steps of ``step_size`` (default
``2.5 * eps / steps``), each projected back onto the ``eps`` ball around the clean input, from
the clean input (no random start, so ``eps = 0`` changes nothing). Images are attacked on the
``[0, 1]`` pixel scale (``eps = 8/255`` is eight grey levels) and clipped to it; text on the
tower's input token embeddings (``TextEncoder``'s ``token_embeds``), only at real tokens, in
embedding units. Robust accuracy counts an example as correct if the model is right on every
input the attack evaluated (the clean one and each iterate), so more iterates never raise it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax.data.device import normalize_images
from mmjax.errors import ExplainedError

METHODS = ("fgsm", "pgd")
IMAGE_KINDS = ("vit", "resnet")  # towers whose input is an image: attacked as pixels
TEXT_KINDS = ("text",)  # towers whose input is token ids: attacked as embeddings


class AttackError(ValueError, ExplainedError):
    """A bad attack option or a model the attack cannot act on; the message says."""


def targets(encoders: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``{modality: "pixels" | "embeddings"}`` for the towers an attack can perturb."""
    out = {}
    for m, cfg in encoders.items():
        kind = cfg.get("kind")
        if kind in IMAGE_KINDS:
            out[m] = "pixels"
        elif kind in TEXT_KINDS:
            out[m] = "embeddings"
    return out


def pixels01(images: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(images on the [0, 1] scale, the map back to the batch's representation): the
    ``normalize`` op's ``[-1, 1]`` floats, or uint8 pixels (given back as the [-1, 1] floats
    the steps would have made of them: ``data.device.normalize_images`` leaves floats as they
    are)."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0, lambda x: x * 2.0 - 1.0
    return (images.astype(jnp.float32) + 1.0) * 0.5, lambda x: (x * 2.0 - 1.0).astype(
        images.dtype)


def _inputs(variables: Mapping[str, Any], batch: Mapping[str, Any], kinds: Mapping[str, str]
            ) -> tuple[dict, dict, dict, dict]:
    """(clean attacked inputs, L∞ step masks, lower bounds, upper bounds) per modality."""
    x0, masks, lo, hi = {}, {}, {}, {}
    for m, kind in kinds.items():
        if kind == "pixels":
            x0[m], _ = pixels01(batch[m])
            masks[m] = jnp.ones((), jnp.float32)
            lo[m], hi[m] = 0.0, 1.0
        else:
            table = variables["params"][m]["token_embedding"]["embedding"]
            x0[m] = jnp.take(table, batch[m]["ids"], axis=0).astype(jnp.float32)
            masks[m] = batch[m]["mask"].astype(jnp.float32)[..., None]
            lo[m], hi[m] = -jnp.inf, jnp.inf
    return x0, masks, lo, hi


def _with(batch: Mapping[str, Any], x: Mapping[str, jax.Array], kinds: Mapping[str, str]
          ) -> dict[str, Any]:
    out = dict(batch)
    for m, kind in kinds.items():
        if kind == "pixels":
            out[m] = pixels01(batch[m])[1](x[m])
        else:
            out[m] = {**batch[m], "token_embeds": x[m]}
    return out


def attack_batch(model: Any, variables: Mapping[str, Any], batch: Mapping[str, Any], *,
                 task: str, kinds: Mapping[str, str], method: str, eps: jax.Array,
                 steps: int = 10, step_size: jax.Array | None = None
                 ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    """(adversarial inputs per modality, clean correct [B], robust correct [B]) of one batch;
    traceable (``eps`` and ``step_size`` may be traced, ``steps`` and ``kinds`` are static)."""
    if method not in METHODS:
        raise AttackError(f"--attack={method!r}; expected one of {METHODS}")
    labels = batch["label"]
    x0, masks, lo, hi = _inputs(variables, batch, kinds)

    def loss_and_correct(x: dict) -> tuple[jax.Array, jax.Array]:
        # normalize_images: an image that is not attacked may still be uint8
        logits = model.apply(variables, normalize_images(_with(batch, x, kinds)))[task]["logits"]
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
                    task: str, kinds: Mapping[str, str], method: str, eps: float,
                    steps: int = 10, step_size: float | None = None) -> dict[str, float]:
    """``{"accuracy", "clean_accuracy", "eps", "steps", "step_size", "count"}`` of the attack
    over the valid rows of ``batches`` (one device, ``jax.jit``)."""
    if method not in METHODS:
        raise AttackError(f"--attack={method!r}; expected one of {METHODS}")
    if not eps >= 0:
        raise AttackError(f"--eps={eps!r} must be >= 0")
    if method == "pgd" and int(steps) < 1:
        raise AttackError(f"--steps={steps!r} must be >= 1")
    if not kinds:
        raise AttackError("the model has no tower an attack can perturb (image towers "
                          f"{IMAGE_KINDS} or text towers {TEXT_KINDS})")
    fn = jax.jit(functools.partial(attack_batch, model, task=task, kinds=dict(kinds),
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
