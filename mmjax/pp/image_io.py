"""Fast image decode-and-crop, and the Inception-style random resized crop box.

A train crop reads the file's bytes and header only; the pixels are decoded once, already
cropped and resized: JPEGs with simplejpeg (libjpeg-turbo), DCT-scaled by 1/2, 1/4 or 1/8 when
the crop is at least 2, 4 or 8 times the target (libjpeg-turbo's other k/8 scales are
blurrier), other formats with Pillow (``draft`` does the same scaling for JPEGs it decodes);
then one OpenCV resize of the crop (a view, no copy): bilinear, or area averaging for a shrink
over 2x. docs/input_pipeline.md compares these libraries and rules with Pillow's antialiased
resize (slower, and no closer to a Lanczos reference).

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

from mmjax.pp.ops import LimitError

Box = tuple[int, int, int, int]  # (top, left, height, width) in the full image
_SIMPLEJPEG_SPACES = frozenset({"YCbCr", "Gray", "RGB"})  # CMYK/YCCK: Pillow converts them
cv2.setNumThreads(1)  # the data workers are the parallelism; threads per resize only contend
MAX_PIXELS = 64_000_000  # data.max_image_pixels's default (an 8K frame is 33 megapixels)


def check_size(width: int, height: int, limit: int) -> None:
    """Refuses an image whose header promises more than ``limit`` pixels, before anything
    decodes it: a few kilobytes of PNG can unpack to gigabytes."""
    if width * height > limit:
        raise LimitError(f"{width} x {height} = {width * height} pixels, more than "
                         f"data.max_image_pixels={limit}")


def open_image(source: Any, limit: int) -> Image.Image:
    """``Image.open`` (header only) of a path or file object, refused over ``limit`` pixels.

    Pillow's own decompression-bomb error (at twice its ``MAX_IMAGE_PIXELS``, which it checks
    when opening) becomes a :class:`LimitError` too.
    """
    try:
        im = Image.open(source)
    except Image.DecompressionBombError as e:
        raise LimitError(f"more pixels than Pillow opens ({e}); data.max_image_pixels="
                         f"{limit}") from None
    try:
        check_size(*im.size, limit)
    except LimitError:
        im.close()
        raise
    return im


@dataclasses.dataclass(frozen=True)
class Encoded:
    """An image file not decoded yet: its bytes and size (read from the header)."""

    data: bytes
    height: int
    width: int
    jpeg: bool  # simplejpeg decodes it (else Pillow)
    name: str  # the file, for error messages


def read_encoded(value: Any, root: str = "", max_pixels: int = MAX_PIXELS) -> Encoded:
    """A path (relative to ``root``) or encoded bytes → :class:`Encoded` (header read only);
    more than ``max_pixels`` raises :class:`LimitError`."""
    if isinstance(value, bytes | bytearray):
        data, name = bytes(value), "<bytes>"
    else:
        name = os.path.join(root, str(value))
        with open(name, "rb") as f:
            data = f.read()
    if data[:2] == b"\xff\xd8":
        try:
            height, width, space, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            pass  # a JPEG libjpeg-turbo's header reader rejects: let Pillow try
        else:
            check_size(int(width), int(height), max_pixels)
            if space in _SIMPLEJPEG_SPACES:
                return Encoded(data, int(height), int(width), True, name)
    try:
        with open_image(io.BytesIO(data), max_pixels) as im:
            width, height = im.size
    except LimitError:
        raise
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


def _resize(pixels: np.ndarray, box: Box, size: int) -> np.ndarray:
    """``pixels`` inside ``box`` → ``[size, size, 3]``; the crop is a view, not a copy."""
    top, left, h, w = box
    crop = pixels[top : top + h, left : left + w]
    # Bilinear where the shrink is at most 2x (after the DCT scaling it nearly always is): it
    # reads every source pixel; area averaging beyond that, where bilinear would alias.
    interpolation = cv2.INTER_LINEAR if max(h, w) <= 2 * size else cv2.INTER_AREA
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def dct_scale(box: Box, size: int) -> int:
    """1, 2, 4 or 8: the JPEG is decoded at ``1/k`` scale where the crop keeps >= ``2 * size``
    pixels before the scaling, i.e. >= ``size`` after it, each way."""
    _, _, h, w = box
    k = 1
    while k < 8 and min(h, w) >= 2 * k * size:
        k *= 2
    return k


def scaled_box(box: Box, k: int, height: int, width: int) -> Box:
    """``box`` on the ``1/k`` decode (ceil(height/k) x ceil(width/k)): edges to the nearest
    scaled pixel, so the crop moves by at most ``k/2`` full-size pixels."""
    top, left, h, w = box
    t, lo = round(top / k), round(left / k)
    b = min(max(round((top + h) / k), t + 1), -(-height // k))
    r = min(max(round((left + w) / k), lo + 1), -(-width // k))
    return t, lo, b - t, r - lo


def crop_resize(image: Encoded | np.ndarray, box: Box, size: int) -> np.ndarray:
    """``box`` of ``image`` resized to uint8 ``[size, size, 3]``."""
    if isinstance(image, np.ndarray):
        return _resize(image, box, size)
    H, W = image.height, image.width
    k = dct_scale(box, size)
    if image.jpeg:
        try:
            pixels = simplejpeg.decode_jpeg(image.data, colorspace="RGB",
                                            min_height=-(-H // k), min_width=-(-W // k))
        except ValueError as e:
            raise ValueError(f"cannot decode image {image.name}: {e}") from None
    else:
        with Image.open(io.BytesIO(image.data)) as im:
            im.draft("RGB", (-(-W // k), -(-H // k)))  # Pillow's JPEGs: the same DCT scaling
            pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    # The scale the decoder used (Pillow's draft may choose less, a PNG has none).
    scales = [s for s in (1, 2, 4, 8) if pixels.shape[:2] == (-(-H // s), -(-W // s))]
    if not scales:
        raise ValueError(f"{image.name}: decoded to {pixels.shape[:2]}, which is no 1/k of "
                         f"its {(H, W)} header size")
    return _resize(pixels, scaled_box(box, scales[0], H, W), size)
