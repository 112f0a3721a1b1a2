"""Where each tower's tokens sit in its input, and how towers and the fusion pool them.

A relevance vector over a tower's tokens becomes a map over the grid the tower's tokens form
(an image's patch grid, first row = top; AST's spectrogram patch grid, rows = mel bands, low
first; one row of time steps) or one score per token, as the tower and its modality say
(``mmjax.models.encoders``, ``mmjax.modalities``): nothing here depends on a kind's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.models import encoders
from mmjax.models import fusion as fusion_lib
from mmjax.models.multimodal import MultimodalModel


def tower(model: MultimodalModel, modality: str) -> Any:
    """An unbound instance of the tower (its options with defaults filled in)."""
    return encoders.tower(modality, model.encoders[modality], model.opts, parent=None)


def tower_rows(model: MultimodalModel, modality: str, batch: Mapping[str, Any],
               num_tokens: int) -> jnp.ndarray:
    """[B, T] weights of a tower's pooling over its output tokens (rows sum to one)."""
    return encoders.pool_rows(tower(model, modality), batch[modality], num_tokens)


def fuser(model: MultimodalModel) -> Any:
    """An unbound instance of the model's fusion (None: a two-tower model), to ask how it pools
    and how relevance flows through it."""
    return fusion_lib.build(model.fusion, model.opts, parent=None)


def to_map(model: MultimodalModel, modality: str, scores: np.ndarray,
           shape: tuple[int, ...]) -> np.ndarray:
    """Token scores [T] of one example → the tower's 2-D grid (prefix tokens dropped)."""
    t = tower(model, modality)
    p = encoders.prefix_tokens(t)
    rows, cols = encoders.token_grid(t, shape, scores.shape[-1])
    return np.asarray(scores[p:p + rows * cols]).reshape(rows, cols)
