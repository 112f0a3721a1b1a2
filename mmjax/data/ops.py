"""Preprocessing as a registry of small named ops, chained by a spec string in the config.

A spec such as ``"decode|resize(64)|flip|normalize|tokenize"`` names ops in order, each with
optional literal arguments (big_vision's ``pp`` idea). An op maps one example dict to another;
ops that draw randomness take a ``numpy.random.Generator`` that the pipeline derives from
``(seed, step, row)``, so a batch is a pure function of its step and a resumed run sees the
same augmentations as an uninterrupted one.

Ops that depend only on the record (decode, resize, center crop) may be run once per record,
during the validation pass that decodes every image anyway, and their output cached: that
saves re-decoding the same small images every epoch on a 2-core machine. A ``decode`` right
before ``random_crop`` reads only the file (the crop decodes it, cropped and DCT-scaled), and
``normalize`` leaves pixels uint8 for the jitted step to scale: the cheap train path of
docs/input_pipeline.md.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from mmjax.data import image as image_lib

Example = dict[str, Any]
OpFn = Callable[[Example, np.random.Generator | None], Example]


@dataclasses.dataclass(frozen=True)
class Context:
    """What ops take from the data config when their arguments are left out."""

    image_size: int = 32
    max_len: int = 16
    tokenizer: Any = None
    root: str = ""
    audio: Any = None  # the audio front end (mmjax.data.audio.FrontEnd) of the audio ops


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    fn: OpFn
    deterministic: bool

    def __call__(self, example: Example, rng: np.random.Generator | None = None) -> Example:
        return self.fn(example, rng)


_REGISTRY: dict[str, tuple[Callable[..., OpFn], bool]] = {}


def register(name: str, *, deterministic: bool = True) -> Callable:
    """Adds an op factory ``factory(ctx, *args) -> fn(example, rng) -> example``."""

    def wrap(factory: Callable[..., OpFn]) -> Callable[..., OpFn]:
        _REGISTRY[name] = (factory, deterministic)
        return factory

    return wrap


def names() -> list[str]:
    return sorted(_REGISTRY)


_ITEM = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$", re.S)


def _arguments(arg_text: str | None) -> tuple[tuple, dict[str, Any]]:
    """``"1, (2, 3), key='x'"`` → literal positional and keyword arguments."""
    if not arg_text or not arg_text.strip():
        return (), {}
    call = ast.parse(f"f({arg_text})", mode="eval").body
    if not isinstance(call, ast.Call):
        raise ValueError("not an argument list")
    args = tuple(ast.literal_eval(a) for a in call.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    if len(kwargs) != len(call.keywords):
        raise ValueError("**kwargs are not allowed")
    return args, kwargs


def parse(spec: str, ctx: Context) -> list[Op]:
    """``"a|b(1, key=2)"`` → ops; an unknown name or bad argument fails naming the item."""
    ops = []
    for item in [s for s in spec.split("|") if s.strip()]:
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"bad preprocessing item {item!r} in {spec!r}")
        name, arg_text = m.group(1), m.group(2)
        if name not in _REGISTRY:
            raise ValueError(f"unknown preprocessing op {name!r} in {spec!r}; known: {names()}")
        try:
            args, kwargs = _arguments(arg_text)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"bad arguments of preprocessing op {item!r}: {e}") from None
        factory, deterministic = _REGISTRY[name]
        try:
            fn = factory(ctx, *args, **kwargs)
        except TypeError as e:
            raise ValueError(f"bad arguments of preprocessing op {item!r}: {e}") from None
        ops.append(Op(name, fn, deterministic))
    return _fuse_decode(ops)


def _fuse_decode(ops: list[Op]) -> list[Op]:
    """A ``decode`` right before a crop that reads files reads only the header: the crop then
    decodes the pixels once, already cropped and scaled (``mmjax.data.image``)."""
    out = list(ops)
    for i in range(len(out) - 1):
        lazy = getattr(out[i].fn, "lazy", None)
        if lazy is not None and getattr(out[i + 1].fn, "reads_files", "") == out[i].fn.key:
            out[i] = Op(out[i].name, lazy, out[i].deterministic)
    return out


def device_normalized(ops: list[Op]) -> bool:
    """Whether the chain leaves the ``image`` uint8 for the train/eval step to normalise."""
    return any(getattr(op.fn, "on_device", False) for op in ops)


# Ops that only touch pixels and need nothing but the record: safe to cache per record.
CACHEABLE = frozenset({"decode", "resize", "center_crop"})


def cacheable_prefix(ops: list[Op]) -> int:
    """How many leading ops can be run once per record (during validation) and cached."""
    n = 0
    while n < len(ops) and ops[n].name in CACHEABLE:
        n += 1
    return n


def apply(ops: list[Op], example: Example, rng: np.random.Generator | None) -> Example:
    for op in ops:
        example = op(example, rng)
    return example


# --- images ---------------------------------------------------------------------------------


def decode_image(value: Any, root: str = "") -> np.ndarray:
    """A path (relative to ``root``), encoded bytes or an array → uint8 ``[H, W, 3]`` RGB.

    ``load()`` forces a full decode, so a truncated file fails here rather than later.
    """
    if isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, -1)
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, -1)
        return np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    if isinstance(value, bytes | bytearray):
        im = Image.open(io.BytesIO(value))
    else:
        im = Image.open(os.path.join(root, str(value)))
    with im:
        im.load()
        return np.asarray(im.convert("RGB"))


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    im = Image.fromarray(image).resize((size, size), Image.BILINEAR)
    return np.asarray(im)


@register("decode")
def _decode(ctx: Context, key: str = "image") -> OpFn:
    def fn(ex: Example, rng: Any) -> Example:
        return {**ex, key: decode_image(ex[key], ctx.root)}

    def lazy(ex: Example, rng: Any) -> Example:
        value = ex[key]
        if isinstance(value, np.ndarray):
            return fn(ex, rng)
        return {**ex, key: image_lib.read_encoded(value, ctx.root)}

    fn.lazy, fn.key = lazy, key  # used by _fuse_decode
    return fn


@register("resize")
def _resize_op(ctx: Context, size: int = 0, key: str = "image") -> OpFn:
    size = size or ctx.image_size

    def fn(ex: Example, rng: Any) -> Example:
        return {**ex, key: _resize(ex[key], size)}

    return fn


@register("center_crop")
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

    fn.reads_files = key  # a decode right before it only reads the header (_fuse_decode)
    return fn


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


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) * (1.0 / 127.5) - 1.0


@register("normalize")
def _normalize(ctx: Context, where: str = "device", key: str = "image") -> OpFn:
    """Pixels → float32 in [-1, 1] (``x / 127.5 - 1``), the range every image encoder expects.

    ``"device"`` (default): uint8 pixels leave the host as they are (4x fewer bytes through the
    workers and to the accelerator) and the jitted train/eval step scales them
    (``mmjax.data.device.normalize_images``); ``"host"``: scaled here, float32 batches.
    """
    if where not in ("device", "host"):
        raise ValueError(f"normalize: where={where!r}; expected 'device' or 'host'")

    def fn(ex: Example, rng: Any) -> Example:
        pixels = ex[key]
        if fn.on_device and pixels.dtype == np.uint8:
            return ex
        return {**ex, key: _to_unit_range(pixels)}

    fn.on_device = where == "device" and key == "image"
    return fn


# --- text -----------------------------------------------------------------------------------


@register("tokenize")
def _tokenize(ctx: Context, max_len: int = 0, key: str = "text") -> OpFn:
    """text → ``{"ids", "mask"}`` of length ``max_len`` (padded and truncated by the tokenizer)."""
    max_len = max_len or ctx.max_len

    def fn(ex: Example, rng: Any) -> Example:
        if ctx.tokenizer is None:
            raise ValueError("preprocessing op 'tokenize' needs a tokenizer")
        value = ex[key]
        if isinstance(value, dict):
            return ex
        ids, mask = ctx.tokenizer.encode([str(value)], max_len)
        return {**ex, key: {"ids": ids[0], "mask": mask[0]}}

    return fn


@register("pad_truncate")
def _pad_truncate(ctx: Context, length: int = 0, key: str = "text") -> OpFn:
    """Re-fits tokenized text to ``length`` (e.g. to a multiple of 8 for fused attention)."""
    length = length or ctx.max_len

    def fn(ex: Example, rng: Any) -> Example:
        out = {}
        for k, v in ex[key].items():
            row = np.zeros(length, np.int32)
            row[: min(length, len(v))] = v[:length]
            out[k] = row
        return {**ex, key: out}

    return fn
