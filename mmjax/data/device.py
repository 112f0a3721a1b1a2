"""The part of preprocessing that runs inside the jitted steps: scaling uint8 pixels.

Batches leave the host with uint8 images (``normalize`` in ``data.pp_*``, the default), a
quarter of the bytes of float32 through the data workers and to the accelerator; the train and
eval steps, ``predict`` and the exported function call :func:`normalize_images` first, which
computes exactly what the host op computed before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp


def normalize_images(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """A uint8 ``batch["image"]`` → float32 ``x / 127.5 - 1`` in [-1, 1]; otherwise unchanged
    (float images were scaled on the host, e.g. the embedded shapes data)."""
    pixels = batch.get("image")
    if pixels is None or pixels.dtype != jnp.uint8:
        return batch
    return {**batch, "image": pixels.astype(jnp.float32) * (1.0 / 127.5) - 1.0}
