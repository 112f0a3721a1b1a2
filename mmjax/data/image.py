"""Fast image decode-and-crop, and the Inception-style random resized crop box.

A train crop reads the file's bytes and header only; the pixels are decoded once, already
cropped and resized: JPEGs with simplejpeg (libjpeg-turbo), DCT-scaled by 1/2, 1/4 or 1/8 when
the crop is at least 2, 4 or 8 times the target (libjpeg-turbo's other k/8 scales were
measurably blurrier), other formats with Pillow (``draft`` does the same scaling for JPEGs it
decodes); then one OpenCV resize of the crop (a view, no copy): bilinear, or area averaging
for a shrink over 2x. docs/input_pipeline.md has the measurements that chose these libraries
and rules (Pillow's antialiased resize cost 5x OpenCV's bilinear and was no closer to a
Lanczos reference).

The crop box is drawn as torchvision's ``RandomResizedCrop.get_params`` and big_vision's
``inception_crop`` draw it: area fraction uniform in ``scale``, log aspect ratio uniform in
``ratio``, ten tries, then the central crop clipped to the ratio range.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any

import cv2
import numpy as np
import simplejpeg
from PIL import Image

Box = tuple[int, int, int, int]  # (top, left, height, width) in the full image
_SIMPLEJPEG_SPACES = frozenset({"YCbCr", "Gray", "RGB"})  # CMYK/YCCK: Pillow converts them
cv2.setNumThreads(1)  # the data workers are the parallelism; threads per resize only contend


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An image file not decoded yet: its bytes and size (read from the header)."""

    data: bytes
    height: int
    width: int
    jpeg: bool  # simplejpeg decodes it (else Pillow)
    name: str  # the file, for error messages


def read_encoded(value: Any, root: str = "") -> Encoded:
    """A path (relative to ``root``) or encoded bytes → :class:`Encoded` (header read only)."""
    if isinstance(value, bytes | bytearray):
        data, name = bytes(value), "<bytes>"
    else:
        name = os.path.join(root, str(value))
        with open(name, "rb") as f:
            data = f.read()
    if data[:2] == b"\xff\xd8":
        try:
            height, width, space, _ = simplejpeg.decode_jpeg_header(data)
            if space in _SIMPLEJPEG_SPACES:
                return Encoded(data, int(height), int(width), True, name)
        except ValueError:
            pass  # a JPEG libjpeg-turbo's header reader rejects: let Pillow try
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except Exception as e:
        raise ValueError(f"cannot read image {name}: {e}") from None
    return Encoded(data, int(height), int(width), False, name)


def inception_box(rng: np.random.Generator, height: int, width: int,
                  scale: tuple[float, float] = (0.08, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """A random crop box covering ``scale`` of the area with aspect ratio (w/h) in ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height  # ten misses: the central crop, clipped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _resize(pixels: np.ndarray, box: tuple[float, float, float, float], size: int
            ) -> np.ndarray:
    """``pixels[top:bottom, left:right]`` (fractional edges rounded) → ``[size, size, 3]``."""
    top, left, bottom, right = (round(x) for x in box)
    crop = pixels[top : max(bottom, top + 1), left : max(right, left + 1)]
    # Bilinear where the shrink is at most 2x (after the DCT scaling it nearly always is): it
    # reads every source pixel; area averaging beyond that, where bilinear would alias.
    shrink = max(crop.shape[0], crop.shape[1]) / size
    interpolation = cv2.INTER_LINEAR if shrink <= 2 else cv2.INTER_AREA
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def crop_resize(image: Encoded | np.ndarray, box: Box, size: int) -> np.ndarray:
    """``box`` of ``image`` resized to uint8 ``[size, size, 3]``."""
    top, left, h, w = box
    if isinstance(image, np.ndarray):
        return _resize(image, (top, left, top + h, left + w), size)
    H, W = image.height, image.width
    k = 1  # DCT-domain downscale by 2, 4 or 8 where the crop keeps >= size pixels each way
    while k < 8 and min(h, w) >= 2 * k * size:
        k *= 2
    min_h, min_w = math.ceil(H / k), math.ceil(W / k)
    if image.jpeg:
        try:
            pixels = simplejpeg.decode_jpeg(image.data, colorspace="RGB", min_height=min_h,
                                            min_width=min_w)
        except ValueError as e:
            raise ValueError(f"cannot decode image {image.name}: {e}") from None
    else:
        with Image.open(io.BytesIO(image.data)) as im:
            im.draft("RGB", (min_w, min_h))  # JPEGs Pillow decodes: a 1/2, 1/4, 1/8 DCT scale
            pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    fy, fx = pixels.shape[0] / H, pixels.shape[1] / W
    return _resize(pixels, (top * fy, left * fx, (top + h) * fy, (left + w) * fx), size)
