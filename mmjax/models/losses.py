"""Named per-task losses, looked up from config, and their weighted sum.

Each task in a config names its loss (``"softmax_xent"``, ``"infonce"``, ...) and carries a
weight λ under ``config.losses``; the trainer asks :func:`get_loss` for the function and combines
the per-task scalars with :func:`weighted_total`, L = Σ λ·L_task. Keeping losses in a registry means
a new head needs one decorated function here and a line of config, not trainer code.

Every loss has the signature ``fn(outputs, batch, cfg) -> (loss, metrics)``:

* ``outputs``: the task head's output dict;
* ``batch``: the input batch dict; it may hold ``"valid"`` (float32[B], 1 for a real example and 0
  for padding that fills the last eval batch). When present, the loss and every metric are means
  over valid examples only, so padding changes nothing; when absent every example counts;
* ``cfg``: the task's head config (any mapping; optional keys are read with ``.get``).

Losses and metrics are float32 scalars computed in float32 whatever the compute dtype, and are
means rather than sums, so λ does not depend on batch size or number of classes. All are pure and
jit-compatible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

LossFn = Callable[[Any, Any, Mapping], tuple[jax.Array, dict[str, jax.Array]]]

LOSSES: dict[str, LossFn] = {}

# Losses whose value couples the examples of a batch (in-batch negatives): gradient accumulation
# must see the whole accumulated batch at once for them (see trainer.accumulated_grads).
BATCH_COUPLED: set[str] = {"infonce", "siglip"}

# CLIP clamps the multiplier exp(logit_scale) at 100 so that the temperature cannot run away.
MAX_LOGIT_SCALE = 100.0
# Stands in for -inf on masked logits: finite, so rows that are all padding stay NaN-free.
_MASK_VALUE = -1e9


class UnknownLossError(KeyError, ValueError):
    """An unknown loss name; a KeyError for lookups and a ValueError for config validation."""

    def __str__(self) -> str:
        # KeyError would otherwise print the message quoted, which reads badly as a CLI's last line.
        return str(self.args[0]) if self.args else ""


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator adding a loss to :data:`LOSSES` under ``name``.

    Registering a name twice is an error, so that two modules cannot silently shadow each other.
    """

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {LOSSES[name]!r})")
        LOSSES[name] = fn
        return fn

    return wrap


def get_loss(name: str) -> LossFn:
    """Returns the loss registered as ``name``; an unknown name lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise UnknownLossError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None


def weighted_total(task_losses: Mapping[str, jax.Array], weights: Mapping[str, Any]) -> jax.Array:
    """Σ λ·L over tasks: the scalar the optimizer minimises.

    ``task_losses`` and ``weights`` must name the same tasks: a task without a weight, or a weight
    without a task, is almost always a config typo, so it raises instead of defaulting. A task
    whose weight is exactly 0 is left out of the sum (it can still be logged), so that a NaN in a
    monitored-only task cannot poison the total.
    """
    loss_names, weight_names = set(task_losses.keys()), set(weights.keys())
    if loss_names != weight_names:
        raise ValueError(
            "losses and weights name different tasks: "
            f"without a weight in `losses`: {sorted(loss_names - weight_names)}, "
            f"with a weight but no loss: {sorted(weight_names - loss_names)}"
        )
    if not loss_names:
        raise ValueError("weighted_total needs at least one task loss")
    total = jnp.zeros((), jnp.float32)
    for name in sorted(loss_names):  # A fixed order keeps the float sum reproducible.
        weight = weights[name]
        if isinstance(weight, int | float) and weight == 0:
            continue
        total = total + weight * jnp.asarray(task_losses[name], jnp.float32)
    return total


# ---------------------------------------------------------------------------------------------
# Helpers.


def _target_key(cfg: Mapping) -> str:
    return cfg.get("target", "label")


def _valid(batch: Mapping, n: int) -> jax.Array:
    """Per-example weights: ``batch["valid"]`` if present, else all ones."""
    if "valid" in batch:
        return jnp.asarray(batch["valid"], jnp.float32).reshape(n)
    return jnp.ones((n,), jnp.float32)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean of ``values`` [B] over the examples with non-zero weight.

    The denominator is floored at a tiny positive number rather than guarded with ``where``: a
    batch of only padding then gives 0 with finite (zero) gradients instead of 0/0.
    """
    values = values.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


# ---------------------------------------------------------------------------------------------
# Losses.


@register("softmax_xent")
def softmax_xent(
    outputs: Mapping, batch: Mapping, cfg: Mapping
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Softmax cross-entropy of ``outputs["logits"]`` [B,C] against integer labels [B].

    cfg: ``target`` (batch key of the labels, default ``"label"``) and ``label_smoothing`` (ε,
    default 0): the target puts 1-ε on the label plus ε/C on every class. Accuracy is the argmax
    accuracy over valid examples.
    """
    logits = jnp.asarray(outputs["logits"], jnp.float32)
    labels = jnp.asarray(batch[_target_key(cfg)]).astype(jnp.int32)
    num_classes = logits.shape[-1]
    weights = _valid(batch, logits.shape[0])
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    smoothing = cfg.get("label_smoothing", 0.0)
    if smoothing:
        targets = targets * (1.0 - smoothing) + smoothing / num_classes
    per_example = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _weighted_mean(per_example, weights), {"accuracy": _weighted_mean(correct, weights)}


@register("sigmoid_xent")
def sigmoid_xent(
    outputs: Mapping, batch: Mapping, cfg: Mapping
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-label sigmoid cross-entropy of ``outputs["logits"]`` [B,C].

    Targets are float or bool [B,C] (independent per class), or integer labels [B] which become
    one-hot. The loss is the mean over classes, then over valid examples, so λ does not grow with C.
    """
    logits = jnp.asarray(outputs["logits"], jnp.float32)
    targets = jnp.asarray(batch[_target_key(cfg)])
    if targets.ndim == logits.ndim - 1 and jnp.issubdtype(targets.dtype, jnp.integer):
        targets = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
    targets = targets.astype(jnp.float32)
    if targets.shape != logits.shape:
        raise ValueError(
            f"sigmoid_xent: targets of shape {targets.shape} do not match logits {logits.shape}"
        )
    # log(1 - sigmoid(x)) = log_sigmoid(-x): both terms stay stable for large |x|.
    per_class = -(
        targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits)
    )
    per_example = jnp.mean(per_class.reshape(logits.shape[0], -1), axis=-1)
    return _weighted_mean(per_example, _valid(batch, logits.shape[0])), {}


@register("mse")
def mse(outputs: Mapping, batch: Mapping, cfg: Mapping) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean squared error of ``outputs["predictions"]`` [B] or [B,D] against ``batch[target]``.

    Averages over the D dims of each example, then over valid examples; ``mae`` likewise. A [B,1]
    prediction against a [B] target is accepted, since a one-output regression head emits [B,1].
    """
    preds = jnp.asarray(outputs["predictions"], jnp.float32)
    targets = jnp.asarray(batch[_target_key(cfg)], jnp.float32)
    n = preds.shape[0]
    preds, targets = preds.reshape(n, -1), targets.reshape(targets.shape[0], -1)
    if preds.shape != targets.shape:
        raise ValueError(f"mse: predictions {preds.shape} and targets {targets.shape} differ")
    err = preds - targets
    weights = _valid(batch, n)
    loss = _weighted_mean(jnp.mean(jnp.square(err), axis=-1), weights)
    return loss, {"mae": _weighted_mean(jnp.mean(jnp.abs(err), axis=-1), weights)}


def _pair_embeds(outputs: Mapping, cfg: Mapping) -> tuple[jax.Array, jax.Array]:
    """The head's two embeddings, in its ``modalities`` order (image and text by default, e.g.
    audio and text for a CLAP-style head); metric names keep i2t = first → second."""
    a, b = cfg.get("modalities", ("image", "text"))
    return (jnp.asarray(outputs[f"{a}_embeds"], jnp.float32),
            jnp.asarray(outputs[f"{b}_embeds"], jnp.float32))


@register("infonce")
def infonce(
    outputs: Mapping, batch: Mapping, cfg: Mapping
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric CLIP contrastive loss between the head's two embeddings [B,D] (``image_embeds``
    and ``text_embeds`` unless the head's ``modalities`` say otherwise).

    The embeddings arrive L2-normalised from the head. ``outputs["logit_scale"]`` is the learnt
    *log* of the logit multiplier, so the multiplier stays positive; logits are
    min(exp(logit_scale), 100)·img·txtᵀ, clamped at 100 as CLIP does. Pair i is the positive for
    row i and for column i; the loss is the mean of the image→text (rows) and text→image (columns)
    cross-entropies. Padding examples (valid=0) are removed both as anchors and as negatives by
    masking their logits with a large negative value, which keeps shapes static under jit.

    Under data-parallel pmap every device sees only its local batch, so the negatives are the
    local batch's other examples, not the global batch's; gathering embeddings across devices for
    more negatives is a separate step.

    Metrics: ``i2t_accuracy`` and ``t2i_accuracy`` (retrieval top-1 within the batch) and
    ``temperature``, the clamped multiplier exp(logit_scale) applied to the logits.
    """
    img, txt = _pair_embeds(outputs, cfg)
    scale = jnp.minimum(
        jnp.exp(jnp.asarray(outputs["logit_scale"], jnp.float32)), MAX_LOGIT_SCALE
    ).reshape(())
    n = img.shape[0]
    weights = _valid(batch, n)
    logits = scale * (img @ txt.T)
    # Rows are images, columns texts. A padded column must not act as a negative for any image,
    # a padded row must not for any text; masking both keeps i2t and t2i symmetric.
    i2t = jnp.where(weights[None, :] > 0, logits, _MASK_VALUE)
    t2i = jnp.where(weights[:, None] > 0, logits, _MASK_VALUE).T
    diag = jnp.arange(n)
    i2t_xent = -jax.nn.log_softmax(i2t, axis=-1)[diag, diag]
    t2i_xent = -jax.nn.log_softmax(t2i, axis=-1)[diag, diag]
    loss = 0.5 * (_weighted_mean(i2t_xent, weights) + _weighted_mean(t2i_xent, weights))
    metrics = {
        "i2t_accuracy": _weighted_mean((jnp.argmax(i2t, axis=-1) == diag), weights),
        "t2i_accuracy": _weighted_mean((jnp.argmax(t2i, axis=-1) == diag), weights),
        "temperature": scale,
    }
    return loss, metrics


@register("siglip")
def siglip(
    outputs: Mapping, batch: Mapping, cfg: Mapping
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) over all B x B image-text pairs.

    logits_ij = exp(logit_scale)·<img_i, txt_j> + logit_bias, label +1 on the diagonal and -1
    elsewhere, loss = -Σ_ij log sigmoid(label_ij·logits_ij) / B. Every pair is an independent binary
    problem, so no softmax normalises over the batch; the learnable bias (the head's
    ``init_bias``, -10 for kind ``siglip``) offsets the B² - B negatives. The scale is not
    clamped (the paper does not clamp it). Pairs with a padding example (valid=0) count for
    nothing and B is the number of valid examples. The negatives are the local batch, as for
    ``infonce``; the loss is in ``BATCH_COUPLED``, so gradient accumulation caches the head
    outputs, ``logit_bias`` included like ``logit_scale``, and evaluates it on the whole batch.

    Metrics: ``i2t_accuracy``/``t2i_accuracy`` (in-batch top-1 retrieval), ``temperature``
    (exp(logit_scale)) and ``bias``.
    """
    if "logit_bias" not in outputs:
        raise ValueError("the siglip loss needs a learnable bias: use head kind 'siglip' or set "
                         "init_bias on the contrastive head")
    img, txt = _pair_embeds(outputs, cfg)
    scale = jnp.exp(jnp.asarray(outputs["logit_scale"], jnp.float32)).reshape(())
    bias = jnp.asarray(outputs["logit_bias"], jnp.float32).reshape(())
    n = img.shape[0]
    weights = _valid(batch, n)
    logits = scale * (img @ txt.T) + bias
    labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
    pair_weights = weights[:, None] * weights[None, :]
    total = -jnp.sum(pair_weights * jax.nn.log_sigmoid(labels * logits))
    loss = total / jnp.maximum(jnp.sum(weights), 1e-12)
    diag = jnp.arange(n)
    i2t = jnp.where(weights[None, :] > 0, logits, _MASK_VALUE)
    t2i = jnp.where(weights[:, None] > 0, logits, _MASK_VALUE).T
    metrics = {
        "i2t_accuracy": _weighted_mean((jnp.argmax(i2t, axis=-1) == diag), weights),
        "t2i_accuracy": _weighted_mean((jnp.argmax(t2i, axis=-1) == diag), weights),
        "temperature": scale,
        "bias": bias,
    }
    return loss, metrics


def _token_xent(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross-entropy, correctness and weights, all float32 [..., L]."""
    logits = jnp.asarray(logits, jnp.float32)
    targets = jnp.asarray(targets).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    xent = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return xent, correct, jnp.asarray(weights, jnp.float32)


def _sum_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


@register("itm")
def itm(outputs: Mapping, batch: Mapping, cfg: Mapping) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Image-text matching: softmax cross-entropy of ``logits`` [3B, 2].

    Rows are the B positive pairs, then B (image, negative text) and B (negative image, text)
    pairs (the itm head's order), so labels are [1]*B + [0]*2B. The mean is over all 3B rows of
    valid examples (a padding example's three rows count for nothing). Metric: ``accuracy``.
    """
    del cfg
    logits = jnp.asarray(outputs["logits"], jnp.float32)
    if logits.shape[0] % 3:
        raise ValueError(f"itm logits have {logits.shape[0]} rows, not 3B")
    n = logits.shape[0] // 3
    labels = jnp.concatenate([jnp.ones((n,), jnp.int32), jnp.zeros((2 * n,), jnp.int32)])
    weights = jnp.tile(_valid(batch, n), 3)
    xent = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _sum_mean(xent, weights), {"accuracy": _sum_mean(correct, weights)}


@register("mlm")
def mlm(outputs: Mapping, batch: Mapping, cfg: Mapping) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked language modelling: mean cross-entropy over the selected positions.

    ``outputs``: ``logits`` [B, L, V], ``targets`` (the uncorrupted ids) and ``weights`` [B, L]
    (1 where the head's masking selected the position). Unselected positions and padding
    examples contribute nothing. Metric: ``accuracy`` over the selected positions.
    """
    del cfg
    xent, correct, weights = _token_xent(outputs["logits"], outputs["targets"], outputs["weights"])
    weights = weights * _valid(batch, xent.shape[0])[:, None]
    return _sum_mean(xent, weights), {"accuracy": _sum_mean(correct, weights)}


@register("mim")
def mim(outputs: Mapping, batch: Mapping, cfg: Mapping) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MAE reconstruction loss: mean over hidden patches of the per-patch mean squared error.

    ``outputs``: ``predictions`` and ``targets`` [B, N, P] (targets already per-patch normalised
    by the head when ``norm_pix``) and ``mask`` [B, N], 1 for the patches the encoder did not
    see. Visible patches and padding examples contribute nothing.
    """
    del cfg
    preds = jnp.asarray(outputs["predictions"], jnp.float32)
    targets = jnp.asarray(outputs["targets"], jnp.float32)
    if preds.shape != targets.shape:
        raise ValueError(f"mim: predictions {preds.shape} and targets {targets.shape} differ")
    per_patch = jnp.mean(jnp.square(preds - targets), axis=-1)
    weights = jnp.asarray(outputs["mask"], jnp.float32) * _valid(batch, preds.shape[0])[:, None]
    return _sum_mean(per_patch, weights), {}


@register("caption")
def caption(
    outputs: Mapping, batch: Mapping, cfg: Mapping
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Captioning under teacher forcing: mean token cross-entropy over valid target tokens.

    ``outputs``: ``logits`` [B, S, V], ``targets`` [B, S] (the caption shifted left) and
    ``weights`` [B, S] (its mask shifted likewise, so padding is not predicted). Metrics:
    ``accuracy`` (per valid token) and ``exact_match`` (fraction of valid examples whose every
    valid token is the argmax, still under teacher forcing).
    """
    del cfg
    xent, correct, weights = _token_xent(outputs["logits"], outputs["targets"], outputs["weights"])
    valid = _valid(batch, xent.shape[0])
    token_weights = weights * valid[:, None]
    exact = jnp.all((correct > 0) | (weights <= 0), axis=-1)
    return _sum_mean(xent, token_weights), {
        "accuracy": _sum_mean(correct, token_weights),
        "exact_match": _weighted_mean(exact, valid),
    }
