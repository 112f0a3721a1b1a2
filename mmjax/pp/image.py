"""Image preprocessing ops: decode, resize, crops, flip, normalize."""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from mmjax.pp import image_io as image_lib
from mmjax.pp.ops import Context, Example, OpFn, register, tag


def max_pixels(ctx: Context) -> int:
    """``data.max_image_pixels``: larger images are refused from their header."""
    return int(ctx.setting("max_image_pixels", image_lib.MAX_PIXELS))


def decode_image(value: Any, root: str = "", max_pixels: int = image_lib.MAX_PIXELS
                 ) -> np.ndarray:
    """A path (relative to ``root``), encoded bytes or an array → uint8 ``[H, W, 3]`` RGB.

    A file whose header says it has more than ``max_pixels`` is refused before decoding
    (``LimitError``); ``load()`` forces a full decode, so a truncated file fails here rather
    than later.
    """
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, -1)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, -1)
        return np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    source = io.BytesIO(value) if isinstance(value, bytes | bytearray) else \
        os.path.join(root, str(value))
    with image_lib.open_image(source, max_pixels) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    im = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im)


@register("decode", cacheable=True)
def _decode(ctx: Context, key: str = "image") -> OpFn:
    limit = max_pixels(ctx)

    def fn(ex: Example, rng: Any) -> Example:
        return {**ex, key: decode_image(ex[key], ctx.root, limit)}

    def lazy(ex: Example, rng: Any) -> Example:
        value = ex[key]
        if isinstance(value, np.ndarray):
            return fn(ex, rng)
        return {**ex, key: image_lib.read_encoded(value, ctx.root, limit)}

    return tag(fn, lazy=lazy)  # used by ops._fuse_decode


@register("resize", cacheable=True)
def _resize_op(ctx: Context, size: int = 0, key: str = "image") -> OpFn:
    size = size or ctx.image_size

    def fn(ex: Example, rng: Any) -> Example:
        return {**ex, key: _resize(ex[key], size)}

    return fn


@register("center_crop", cacheable=True)
def _center_crop(ctx: Context, size: int = 0, key: str = "image") -> OpFn:
    size = size or ctx.image_size

    def fn(ex: Example, rng: Any) -> Example:
        im = ex[key]
        h, w = im.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return {**ex, key: _resize(im[top : top + s, left : left + s], size)}

    return fn


def _crop_op(ctx: Context, size: int, key: str, scale: tuple[float, float],
             ratio: tuple[float, float]) -> OpFn:
    size = int(size or ctx.image_size)
    lo, hi = (float(x) for x in scale)
    r_lo, r_hi = (float(x) for x in ratio)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
    if not 0 < r_lo <= r_hi:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got ({r_lo}, {r_hi})")

    def fn(ex: Example, rng: np.random.Generator) -> Example:
        im = ex[key]
        h, w = (im.height, im.width) if isinstance(im, image_lib.Encoded) else im.shape[:2]
        box = image_lib.inception_box(rng, h, w, (lo, hi), (r_lo, r_hi))
        return {**ex, key: image_lib.crop_resize(im, box, size)}

    return tag(fn, reads_files=key)  # a decode right before it only reads the header


@register("random_crop", deterministic=False)
def _random_crop(ctx: Context, min_scale: float = 0.6, size: int = 0, key: str = "image",
                 max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> OpFn:
    """Inception-style random resized crop: ``[min_scale, max_scale]`` of the area, aspect
    ratio (w/h) log-uniform in ``ratio``, resized to ``size`` (torchvision's RandomResizedCrop).
    ``ratio=(1, 1)`` gives square crops."""
    return _crop_op(ctx, size, key, (min_scale, max_scale), ratio)


@register("inception_crop", deterministic=False)
def _inception_crop(ctx: Context, size: int = 0, min_scale: float = 0.08,
                    max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    key: str = "image") -> OpFn:
    """big_vision's ``inception_crop``: ``random_crop`` with ImageNet's defaults (8-100 %)."""
    return _crop_op(ctx, size, key, (min_scale, max_scale), ratio)


@register("flip", deterministic=False)
def _flip(ctx: Context, p: float = 0.5, key: str = "image") -> OpFn:
    def fn(ex: Example, rng: np.random.Generator) -> Example:
        if rng.uniform() < p:
            return {**ex, key: np.ascontiguousarray(ex[key][:, ::-1])}
        return ex

    return fn


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels → float32 ``x / 127.5 - 1`` in [-1, 1] (what the model does on device)."""
    return pixels.astype(np.float32) * (1.0 / 127.5) - 1.0


@register("normalize")
def _normalize(ctx: Context, where: str = "device", key: str = "image") -> OpFn:
    """Pixels → float32 in [-1, 1] (``x / 127.5 - 1``), the range every image encoder expects.

    ``"device"`` (default): uint8 pixels leave the host as they are (4x fewer bytes through the
    workers and to the accelerator) and the model scales them inside the jitted step (the
    image modality's ``to_model``); ``"host"``: scaled here, float32 batches.
    """
    if where not in ("device", "host"):
        raise ValueError(f"normalize: where={where!r}; expected 'device' or 'host'")

    def fn(ex: Example, rng: Any) -> Example:
        pixels = ex[key]
        if where == "device" and pixels.dtype == np.uint8:
            return ex
        return {**ex, key: to_unit_range(pixels)}

    return tag(fn, where=where)  # read by the exported README


