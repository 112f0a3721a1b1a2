"""Task heads. Each reads the model's feature dict and returns what its loss consumes.

Features: ``{"pooled", "tokens", "mask"}`` from fusion (absent for two-tower models) plus
``{"<modality>": pooled encoder feature}`` for every tower, so a contrastive head can project the
towers' own features (CLIP-style) while a classification head reads the fused ``pooled``.

The pretraining objectives' heads (``itm``, ``mlm``, ``mim``, ``caption``) live in
``objectives.py`` and read inputs the model builds for them; they are registered here too so that
every head kind is in one table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models import objectives

Array = jax.Array

# head kind -> the loss it uses unless the head config names one
DEFAULT_LOSS = {
    "classification": "softmax_xent",
    "regression": "mse",
    "contrastive": "infonce",
    "siglip": "siglip",
    "itm": "itm",
    "mlm": "mlm",
    "mim": "mim",
    "caption": "caption",
}


def _input(features: Mapping[str, Any], key: str) -> Array:
    if key not in features or features[key] is None:
        raise ValueError(f"head input {key!r} is not among the model features {sorted(features)}")
    return features[key]


class ClassificationHead(nn.Module):
    """Optional hidden layer, then logits; zero-initialised output as big_vision does."""

    num_classes: int
    hidden: int = 0
    input: str = "pooled"
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        x = _input(features, self.input)
        if self.hidden:
            x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        logits = nn.Dense(
            self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out"
        )(x)
        return {"logits": logits}


class RegressionHead(nn.Module):
    """Linear regression output; ``out_dim == 1`` returns predictions of shape [B]."""

    out_dim: int = 1
    hidden: int = 0
    input: str = "pooled"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Mapping[str, Any], *, train: bool = False) -> dict[str, Array]:
        x = _input(features, self.input)
        if self.hidden:
            x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
        y = nn.Dense(self.out_dim, dtype=self.dtype, name="out")(x)
        return {"predictions": y[:, 0] if self.out_dim == 1 else y}


class ContrastiveHead(nn.Module):
    """Projects two towers' pooled features into one L2-normalised space, CLIP-style.

    ``logit_scale`` is the learnable log inverse temperature, initialised at
    log(1/init_temperature). With ``init_bias`` set, a learnable scalar ``logit_bias`` (SigLIP's
    b, initialised there) is returned too; the sigmoid loss needs it to offset the B² - B
    negative pairs against the B positives. Without it the parameter tree is CLIP's.

    ``only`` (a call argument) restricts the projection to some modalities, so
    ``MultimodalModel.embed`` can embed texts without images and the reverse.
    """

    embed_dim: int = 64
    modalities: tuple[str, str] = ("image", "text")
    init_temperature: float = 0.07
    init_bias: float | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        features: Mapping[str, Any],
        *,
        train: bool = False,
        only: Sequence[str] | None = None,
    ) -> dict[str, Array]:
        out = {}
        for m in self.modalities:
            if only is not None and m not in only:
                continue
            z = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, name=f"{m}_proj")(
                _input(features, m)
            ).astype(jnp.float32)
            out[f"{m}_embeds"] = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)
        out["logit_scale"] = self.param(
            "logit_scale", nn.initializers.constant(math.log(1 / self.init_temperature)), ()
        )
        if self.init_bias is not None:
            out["logit_bias"] = self.param(
                "logit_bias", nn.initializers.constant(self.init_bias), ()
            )
        return out


class SigLIPHead(ContrastiveHead):
    """Kind ``siglip``: a contrastive head with SigLIP's initialisation (Zhai et al. 2023).

    exp(logit_scale) starts at 10 (``init_temperature`` 0.1) and ``logit_bias`` at -10, so the
    initial logits of all pairs are ≈ -10 and the sigmoid loss starts near the log-odds of the
    rare positives instead of being swamped by the B² - B negatives.
    """

    init_temperature: float = 0.1
    init_bias: float | None = -10.0


HEADS: dict[str, type[nn.Module]] = {
    "classification": ClassificationHead,
    "regression": RegressionHead,
    "contrastive": ContrastiveHead,
    "siglip": SigLIPHead,
    **objectives.OBJECTIVE_HEADS,
}

# Kinds whose outputs are image/text embeddings (``MultimodalModel.embed``, ITM negatives).
CONTRASTIVE_KINDS = ("contrastive", "siglip")
