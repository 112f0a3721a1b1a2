"""What a modality is, as the rest of mmjax asks it, and the registry of modalities.

A modality is a name (the record field and the batch key) and the answers to every question the
pipeline, the model, the explainers, the robustness tools and the exporter would otherwise
answer by switching on that name: how a record's file is decoded and validated, what stands in
for it when a record lacks it, which preprocessing ops make it a model input, which towers read
it, how the model scales what the pipeline sends, a random input of the right shape, which
corruptions and attacks act on it, how an explanation of it is drawn, and what an exported
input of it means. ``register`` adds one (``mmjax/modalities/*.py`` for the built-in five).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mmjax.errors import ExplainedError
from mmjax.pp import ops

Entry = Any  # one modality's batch entry: an array [B, ...] or a dict of arrays


class CorruptionError(ValueError, ExplainedError):
    """A bad ``--corrupt`` spec or an input the corruption cannot act on; the message says."""


@dataclasses.dataclass(frozen=True)
class Corruption:
    """An input corruption at severities 1..5: ``table[s - 1]`` is its parameter at severity s,
    ``apply(entry, severity, rng, tokenizer) -> entry`` corrupts every row of a batch entry
    (numpy, on the host)."""

    table: tuple[float, ...]
    apply: Callable[[Entry, int, np.random.Generator, Any], Entry]


@dataclasses.dataclass(frozen=True)
class Attack:
    """How an L∞ attack perturbs a modality (``mmjax.robust.attacks``).

    ``start(entry, tower_params) -> (x0, step_mask, lo, hi)``: the clean point of the attacked
    space (float32), where steps may move (broadcastable to x0) and the box to clip to;
    ``put(entry, x) -> entry``: the entry the model reads at point ``x``. ``space`` names the
    space in messages ("pixels on the [0, 1] scale", "token embeddings").
    """

    space: str
    start: Callable[[Entry, Mapping[str, Any]], tuple[Any, Any, float, float]]
    put: Callable[[Entry, Any], Entry]


def _same(x: Any) -> Any:
    return x


@dataclasses.dataclass(frozen=True)
class Modality:
    """One modality. Only ``name``, ``towers``, ``placeholder`` and ``synthetic`` are needed;
    the rest have defaults that suit an array input.

    - ``towers``: encoder kinds (``mmjax.models.encoders``) that read it; the first is the
      default of a config that names none.
    - ``load(path, ctx)``: decodes a record's file during validation (raises on a bad file);
      None when the record holds the value itself (text).
    - ``placeholder(ctx)``: the record value of an absent modality, which the preprocessing ops
      turn into an input of the usual shape (the model never reads it: ``batch["present"]``).
    - ``required_ops``: the preprocessing must contain one of these ops, or the run stops naming
      ``data.pp_*``; ``default_pp``: the ops that make the model input (docs, errors).
    - ``to_model(x)``: inside the model (jitted), the batch entry as the towers read it: uint8
      pixels become ``x / 127.5 - 1``. It must leave its own output unchanged.
    - ``synthetic(batch_size, ctx, tower_cfg, rng)``: a random entry with the pipeline's shapes
      and dtypes (benchmarks, tests, export examples).
    - ``explained_as``: ``"map"`` (a heat map over the input) or ``"tokens"`` (a score per
      token, through the tower's token embeddings); ``explained_value(entry)`` is the array a
      gradient method attributes, ``with_explained(entry, x)`` puts one back.
    - ``corruptions`` (name -> Corruption), ``attack`` (None: attacks leave it alone).
    - ``describe(leaf, dtype)``: what an exported input leaf of it holds (``leaf``: ``"ids"``
      of a dict entry, ``""`` for an array entry); ``steps(ctx, spec, tokenizer_file)``: how
      raw data becomes that input, for the exported README.
    - ``from_tfds(value, feature)``: a TFDS feature's value as a record value.
    - ``measure(loaded)`` and ``report(measures, ctx, where)``: a number kept per decoded file
      during validation, and what the split's numbers call for (audio: a warning when clips
      are longer than the features hold).
    """

    name: str
    towers: tuple[str, ...]
    placeholder: Callable[[ops.Context], Any]
    synthetic: Callable[[int, ops.Context, Mapping[str, Any], np.random.Generator], Entry]
    load: Callable[[str, ops.Context], Any] | None = None
    required_ops: tuple[str, ...] = ()
    default_pp: str = ""
    to_model: Callable[[Any], Any] = _same
    explained_as: str = "map"
    explained_value: Callable[[Entry], Any] = _same
    with_explained: Callable[[Entry, Any], Entry] = lambda entry, x: x
    corruptions: Mapping[str, Corruption] = dataclasses.field(default_factory=dict)
    attack: Attack | None = None
    describe: Callable[[str, str], str] = lambda leaf, dtype: f"{leaf or 'input'} ({dtype})"
    steps: Callable[[ops.Context, str, str], list[str]] = lambda ctx, spec, tok: []
    from_tfds: Callable[[Any, Any], Any] = lambda value, feature: value
    measure: Callable[[Any], float] | None = None
    report: Callable[[list[float], ops.Context, str], None] = lambda measures, ctx, where: None

    @property
    def from_file(self) -> bool:
        """Whether a record names a file for it (else the record holds the value)."""
        return self.load is not None


_REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Adds a modality (its name must be new, unless the same object is registered again)."""
    old = _REGISTRY.get(modality.name)
    if old is not None and old is not modality:
        raise ValueError(f"modality {modality.name!r} is registered already")
    _REGISTRY[modality.name] = modality
    return modality


def get(name: str) -> Modality:
    if name not in _REGISTRY:
        raise ValueError(f"unknown modality {name!r}; known: {names()}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered modalities, in registration order (the order of a record's fields)."""
    return tuple(_REGISTRY)


def of_tower(kind: str | None) -> str | None:
    """The modality whose ``towers`` list encoder ``kind`` (None: no registered one)."""
    return next((m for m, modality in _REGISTRY.items() if kind in modality.towers), None)


def corruption(name: str) -> tuple[str, Corruption]:
    """(modality, corruption) of a corruption name; an unknown name lists the known ones."""
    for m, modality in _REGISTRY.items():
        if name in modality.corruptions:
            return m, modality.corruptions[name]
    known = sorted(c for modality in _REGISTRY.values() for c in modality.corruptions)
    raise CorruptionError(f"unknown corruption {name!r}; known: {known}")
