"""Preprocessing as a registry of small named ops, chained by a spec string in the config.

A spec such as ``"decode|resize(64)|flip|normalize|tokenize"`` names ops in order, each with
optional literal arguments (big_vision's ``pp`` idea). An op maps one example dict to another;
ops that draw randomness take a ``numpy.random.Generator`` that the pipeline derives from
``(seed, step, row)``, so a batch is a pure function of its step and a resumed run sees the
same augmentations as an uninterrupted one.

Ops that depend only on the record (decode, resize, center crop) may be run once per record,
during the validation pass that decodes every image anyway, and their output cached: that
saves re-decoding the same small images every epoch on a 2-core machine.
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


def parse(spec: str, ctx: Context) -> list[Op]:
    """``"a|b(1, 2)"`` → ops; an unknown name or bad argument fails naming the item."""
    ops = []
    for item in [s for s in spec.split("|") if s.strip()]:
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"bad preprocessing item {item!r} in {spec!r}")
        name, arg_text = m.group(1), m.group(2)
        if name not in _REGISTRY:
            raise ValueError(f"unknown preprocessing op {name!r} in {spec!r}; known: {names()}")
        try:
            args = ast.literal_eval(f"({arg_text},)") if arg_text and arg_text.strip() else ()
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"bad arguments of preprocessing op {item!r}: {e}") from None
        factory, deterministic = _REGISTRY[name]
        ops.append(Op(name, factory(ctx, *args), deterministic))
    return ops


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


@register("random_crop", deterministic=False)
def _random_crop(
    ctx: Context, min_scale: float = 0.6, size: int = 0, key: str = "image"
) -> OpFn:
    """A square crop covering a random fraction ``[min_scale, 1]`` of the area, resized back."""
    size = size or ctx.image_size

    def fn(ex: Example, rng: np.random.Generator) -> Example:
        im = ex[key]
        h, w = im.shape[:2]
        side = round(float(min(h, w)) * np.sqrt(rng.uniform(min_scale, 1.0)))
        side = max(1, min(side, h, w))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        return {**ex, key: _resize(im[top : top + side, left : left + side], size)}

    return fn


@register("flip", deterministic=False)
def _flip(ctx: Context, p: float = 0.5, key: str = "image") -> OpFn:
    def fn(ex: Example, rng: np.random.Generator) -> Example:
        if rng.uniform() < p:
            return {**ex, key: np.ascontiguousarray(ex[key][:, ::-1])}
        return ex

    return fn


@register("normalize")
def _normalize(ctx: Context, key: str = "image") -> OpFn:
    """uint8 → float32 in [-1, 1], the range every image encoder here expects."""

    def fn(ex: Example, rng: Any) -> Example:
        return {**ex, key: ex[key].astype(np.float32) * (1.0 / 127.5) - 1.0}

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
