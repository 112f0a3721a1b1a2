"""Preprocessing as a registry of small named ops, chained by a spec string in the config.

A spec such as ``"decode|resize(64)|flip|normalize|tokenize"`` names ops in order, each with
optional literal arguments (big_vision's ``pp`` idea). An op maps one example dict to another
and acts on one entry of it, its ``key`` (the modality: ``image``, ``text``, ``audio``...);
ops that draw randomness take a ``numpy.random.Generator`` that the pipeline derives from
``(seed, step, row)``, so a batch is a pure function of its step and a resumed run sees the
same augmentations as an uninterrupted one.

An op registered ``cacheable`` depends on the record alone (decode, resize, audio features):
the pipeline may run a modality's leading cacheable ops once per record, during the validation
pass that decodes every file anyway, and keep their output, which saves decoding the same small
files every epoch on a small machine. A ``decode`` right before ``random_crop`` reads only the
file (the crop decodes it, cropped and DCT-scaled), and ``normalize`` leaves pixels uint8 for
the model to scale: the cheap train path of docs/input_pipeline.md.

The ops of each modality live beside this registry (``image.py``, ``text.py``, ``audio.py``,
``series.py``); an op of your own is one ``@register(name)`` factory.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from collections.abc import Callable
from typing import Any

import numpy as np

Example = dict[str, Any]
# ``fn(example, rng)``: ``rng`` is a ``numpy.random.Generator`` (None where no op draws)
OpFn = Callable[[Example, Any], Example]


def tag(fn: OpFn, **attributes: Any) -> OpFn:
    """``fn`` with attributes that other ops or readers look for (``lazy``, ``reads_files``,
    ``where``)."""
    for name, value in attributes.items():
        setattr(fn, name, value)
    return fn


class LimitError(ValueError):
    """An input over one of the ``data.*`` limits (read from its header, before decoding it);
    the message names the key."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What ops take from the data config when their arguments are left out."""

    image_size: int = 32
    max_len: int = 16
    tokenizer: Any = None
    root: str = ""
    audio: Any = None  # the audio front end (mmjax.pp.audio_features.FrontEnd) of the audio ops
    data: Any = None  # the whole data config, for ops that read keys of their own

    def setting(self, key: str, default: Any) -> Any:
        """``data.<key>`` of the config, or ``default`` where there is none (older configs)."""
        if self.data is None:
            return default
        get = getattr(self.data, "get", None)
        return get(key, default) if get is not None else getattr(self.data, key, default)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    fn: OpFn
    deterministic: bool
    key: str = ""  # the example entry the op acts on
    cacheable: bool = False  # depends on the record alone: may run once per record

    def __call__(self, example: Example, rng: np.random.Generator | None = None) -> Example:
        """The op on ``example``; an example without the op's entry passes unchanged (a spec
        names the ops of every modality a dataset may have)."""
        if self.key and self.key not in example:
            return example
        return self.fn(example, rng)


@dataclasses.dataclass(frozen=True)
class _Entry:
    factory: Callable[..., OpFn]
    deterministic: bool
    cacheable: bool
    key: str  # the factory's default ``key``


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, deterministic: bool = True, cacheable: bool = False) -> Callable:
    """Adds an op factory ``factory(ctx, *args, key=<its entry>) -> fn(example, rng) ->
    example``; ``cacheable``: its output depends on the record alone (not on the tokenizer, not
    on randomness), so it may be computed once per record."""

    def wrap(factory: Callable[..., OpFn]) -> Callable[..., OpFn]:
        param = inspect.signature(factory).parameters.get("key")
        key = "" if param is None or param.default is inspect.Parameter.empty \
            else str(param.default)
        _REGISTRY[name] = _Entry(factory, deterministic, cacheable and deterministic, key)
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
        entry = _REGISTRY[name]
        try:
            fn = entry.factory(ctx, *args, **kwargs)
        except TypeError as e:
            raise ValueError(f"bad arguments of preprocessing op {item!r}: {e}") from None
        key = str(kwargs.get("key", entry.key))
        ops.append(Op(name, fn, entry.deterministic, key, entry.cacheable))
    return _fuse_decode(ops)


def _fuse_decode(ops: list[Op]) -> list[Op]:
    """A ``decode`` right before a crop that reads files reads only the header: the crop then
    decodes the pixels once, already cropped and scaled (``mmjax.pp.image_io``)."""
    out = list(ops)
    for i in range(len(out) - 1):
        lazy = getattr(out[i].fn, "lazy", None)
        if lazy is not None and getattr(out[i + 1].fn, "reads_files", "") == out[i].key:
            out[i] = dataclasses.replace(out[i], fn=lazy)
    return out


def of_key(ops: list[Op], key: str) -> list[Op]:
    """The ops of a chain that act on ``key``, in chain order."""
    return [op for op in ops if op.key == key]


def cacheable_prefix(ops: list[Op], key: str) -> list[int]:
    """Positions in the chain of the leading cacheable ops on ``key``: what may run once per
    record and be kept. Ops on different keys touch different entries, so they commute and
    the prefix may be run before the rest of the chain."""
    out = []
    for i, op in enumerate(ops):
        if op.key != key:
            continue
        if not op.cacheable:
            break
        out.append(i)
    return out


def apply(ops: list[Op], example: Example, rng: np.random.Generator | None) -> Example:
    for op in ops:
        example = op(example, rng)
    return example
