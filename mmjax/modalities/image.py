"""Images: ``"image": "photo.png"`` in a record (any format Pillow reads), RGB uint8 pixels
``[B, H, W, 3]`` in a batch, scaled to [-1, 1] inside the model.

Corruptions follow Hendrycks & Dietterich 2019 (ImageNet-C) with its parameter tables, on raw
uint8 pixels: ``gaussian_noise``, ``gaussian_blur``, ``contrast`` and ``jpeg``. A batch that
carries the ``[-1, 1]`` scaling of ``normalize(where="host")`` is mapped back to its exact
pixels, corrupted and scaled again. Attacks move pixels on the [0, 1] scale, clipped to it.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmjax.modalities.base import Attack, Corruption, CorruptionError, Modality, register
from mmjax.pp import image as image_pp
from mmjax.pp import ops

# --- ImageNet-C: uint8 [H, W, 3] -> uint8 [H, W, 3] -----------------------------------------


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian_noise(image: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of std ``c`` on the [0, 1] scale, clipped."""
    x = image.astype(np.float64) / 255.0
    return _to_uint8(x + rng.normal(scale=c, size=x.shape))


def _blur_axis(x: np.ndarray, sigma: float, axis: int, truncate: float = 4.0) -> np.ndarray:
    """1-D Gaussian along ``axis`` with edge replication (scipy's ``mode="nearest"``)."""
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(i, i + n), axis=axis)
    return out


def gaussian_blur(image: np.ndarray, sigma: float, rng: Any = None) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels over height and width (skimage's ``gaussian`` as
    ImageNet-C calls it: edge replication, kernel truncated at 4 sigma)."""
    x = image.astype(np.float64) / 255.0
    return _to_uint8(_blur_axis(_blur_axis(x, sigma, 0), sigma, 1))


def contrast(image: np.ndarray, c: float, rng: Any = None) -> np.ndarray:
    """Each channel pulled towards its mean: ``(x - mean) * c + mean``."""
    x = image.astype(np.float64) / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * c + means)


def jpeg(image: np.ndarray, quality: float, rng: Any = None) -> np.ndarray:
    """A JPEG round trip at ImageNet-C's quality (Pillow, its default 4:2:0 subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, "JPEG", quality=int(quality))
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB"))


# ImageNet-C's parameters per severity 1..5 (Hendrycks & Dietterich 2019, make_imagenet_c.py).
TABLES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std of the noise on the [0, 1] scale
    "gaussian_blur": (1, 2, 3, 4, 6),  # sigma in pixels
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor towards each channel's mean
    "jpeg": (25, 18, 15, 10, 7),  # JPEG quality
}
FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "contrast": contrast,
    "jpeg": jpeg,
}


def corrupt_image(image: np.ndarray, name: str, severity: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Image corruption ``name`` at ``severity`` of one uint8 ``[H, W, 3]`` image."""
    if name not in FUNCTIONS:
        raise CorruptionError(f"unknown image corruption {name!r}; known: {sorted(FUNCTIONS)}")
    if severity not in range(1, 6):
        raise CorruptionError(f"corruption {name}: severity {severity!r} is not one of 1..5")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise CorruptionError(f"{name}: expected a uint8 [H, W, C] image, got {image.dtype} "
                              f"{image.shape}")
    return FUNCTIONS[name](image, TABLES[name][severity - 1], rng)


def image_pixels(images: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """(uint8 pixels of a batch's images, a function back to the batch's representation).

    uint8 images pass through; float images must be the ``normalize`` op's ``x / 127.5 - 1``
    of uint8 pixels (checked), which is inverted exactly.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images, lambda pixels: pixels
    if not np.issubdtype(images.dtype, np.floating):
        raise CorruptionError(f"batch['image'] has dtype {images.dtype}; corruptions need "
                              "uint8 pixels or their [-1, 1] scaling")
    scaled = (images.astype(np.float64) + 1.0) * 127.5
    pixels = np.round(scaled)
    if images.size and (np.abs(scaled - pixels).max() > 1e-3 or pixels.min() < 0
                        or pixels.max() > 255):
        raise CorruptionError("batch['image'] is not the [-1, 1] scaling (x / 127.5 - 1) of "
                              "uint8 pixels that data.pp_eval's normalize op writes, so the raw "
                              "pixels that corruptions act on cannot be recovered")
    dtype = images.dtype

    def back(p: np.ndarray) -> np.ndarray:
        return (p.astype(np.float32) * (1.0 / 127.5) - 1.0).astype(dtype)

    return pixels.astype(np.uint8), back


def _corruption(name: str) -> Corruption:
    def apply(entry: np.ndarray, severity: int, rng: np.random.Generator, tokenizer: Any
              ) -> np.ndarray:
        pixels, back = image_pixels(entry)
        return back(np.stack([corrupt_image(p, name, severity, rng) for p in pixels]))

    return Corruption(TABLES[name], apply)


# --- in the model, attacks, export -----------------------------------------------------------


def to_model(x: Any) -> Any:
    """uint8 pixels → float32 ``x / 127.5 - 1``; floats are taken as already scaled."""
    return x.astype(jnp.float32) * (1.0 / 127.5) - 1.0 if x.dtype == jnp.uint8 else x


def pixels01(images: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(images on the [0, 1] scale, the map back to what the model reads: [-1, 1] floats)."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0, lambda x: x * 2.0 - 1.0
    return (images.astype(jnp.float32) + 1.0) * 0.5, lambda x: (x * 2.0 - 1.0).astype(
        images.dtype)


def _attack_start(entry: Any, params: Mapping[str, Any]) -> tuple[Any, Any, float, float]:
    return pixels01(entry)[0], jnp.ones((), jnp.float32), 0.0, 1.0


def _synthetic(batch_size: int, ctx: ops.Context, tower: Mapping[str, Any],
               rng: np.random.Generator) -> np.ndarray:
    s = ctx.image_size
    return rng.integers(0, 256, size=(batch_size, s, s, 3), dtype=np.uint8)


def _describe(leaf: str, dtype: str) -> str:
    if dtype == "uint8":
        return "RGB pixels, uint8 in [0, 255], scaled inside the function (see Image)"
    return "pixels in [-1, 1] (see Image)"


def _steps(ctx: ops.Context, spec: str, tokenizer_file: str) -> list[str]:
    size = ctx.image_size
    steps = []
    for op in ops.of_key(ops.parse(spec, ctx), "image"):
        if op.name == "decode":
            steps.append("decode the file to RGB, uint8 [H, W, 3] (Pillow)")
        elif op.name == "resize":
            steps.append(f"resize to {size} x {size} (Pillow `Image.BILINEAR`)")
        elif op.name == "center_crop":
            steps.append(f"crop the central square and resize it to {size} x {size} (Pillow "
                         "`Image.BILINEAR`)")
        elif op.name == "normalize" and getattr(op.fn, "where", "device") == "device":
            steps.append("pass the pixels as uint8 [0, 255]: the function itself converts them "
                         "to float32 and scales them, `x / 127.5 - 1`, to [-1, 1]")
        elif op.name == "normalize":
            steps.append("convert to float32 and scale: `x / 127.5 - 1`, so [0, 255] → [-1, 1]")
    return steps


IMAGE = register(Modality(
    name="image",
    towers=("vit", "resnet"),
    load=lambda path, ctx: image_pp.decode_image(path, max_pixels=image_pp.max_pixels(ctx)),
    placeholder=lambda ctx: np.zeros((ctx.image_size, ctx.image_size, 3), np.uint8),
    required_ops=("decode",),
    default_pp="decode|resize|normalize",
    to_model=to_model,
    synthetic=_synthetic,
    corruptions={name: _corruption(name) for name in TABLES},
    attack=Attack("pixels on the [0, 1] scale", _attack_start,
                  lambda entry, x: pixels01(entry)[1](x)),
    describe=_describe,
    steps=_steps,
))
