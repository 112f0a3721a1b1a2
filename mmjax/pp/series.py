"""Time series (sensor data) in the data pipeline: ``"series": "path.npy"`` records.

A series is a ``.npy`` file of floats ``[time, channels]`` (``[time]`` is one channel); empty, non-
numeric or non-finite series are bad records, named like a broken image. The ``series`` op
(registered in ``mmjax.pp.ops``'s registry when ``mmjax.pp`` is imported) loads it and pads with
zeros or cuts it to ``length`` steps, so every example has one shape: ``{"values": [length,
channels], "mask": [length]}`` (mask 1 on the series' own steps, the keyword arguments of the
``series`` tower, ``mmjax/models/series.py``). A record without a series gets zero values and an
all-ones mask (finite inputs; its ``present`` flag says it is absent).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from mmjax.pp import ops

MODALITY = "series"


def load_series(value: Any, root: str = "") -> np.ndarray:
    """A ``.npy`` path (relative to ``root``), its bytes or an array → float32
    ``[time, channels]``."""
    if isinstance(value, np.ndarray):
        x = value
    elif isinstance(value, bytes | bytearray):
        x = np.load(io.BytesIO(value), allow_pickle=False)
    else:
        x = np.load(os.path.join(root, str(value)), allow_pickle=False)
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise ValueError(f"a series must hold real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"a series must be [time, channels], got shape {x.shape}")
    if x.size == 0:
        raise ValueError("an empty series")
    if not np.isfinite(x).all():
        raise ValueError("non-finite values in the series (NaN or inf)")
    return x


def placeholder() -> np.ndarray:
    """What stands for an absent series before the ``series`` op gives it its shape."""
    return np.zeros((0, 0), np.float32)


@ops.register("series", cacheable=True)
def _series_op(ctx: ops.Context, length: int = 64, channels: int = 1,
               key: str = MODALITY) -> ops.OpFn:
    """Loads a series and fits it to ``length`` steps of ``channels`` (zero-padded, masked,
    or cut in time): ``{"values": float32 [length, channels], "mask": int32 [length]}``."""

    def fn(ex: ops.Example, rng: Any) -> ops.Example:
        if key not in ex or isinstance(ex[key], dict):  # absent, or fitted already
            return ex
        value = ex[key]
        if isinstance(value, np.ndarray) and value.size == 0:  # a placeholder
            return {**ex, key: {"values": np.zeros((length, channels), np.float32),
                                "mask": np.ones(length, np.int32)}}
        x = load_series(value, ctx.root)
        if x.shape[1] != channels:
            raise ValueError(f"series {value if isinstance(value, str) else ''} has "
                             f"{x.shape[1]} channels, the op series({length}, {channels}) "
                             f"expects {channels}")
        out = np.zeros((length, channels), np.float32)
        mask = np.zeros(length, np.int32)
        out[: min(length, len(x))] = x[:length]
        mask[: min(length, len(x))] = 1
        return {**ex, key: {"values": out, "mask": mask}}

    return fn
