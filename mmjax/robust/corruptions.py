"""Input corruptions at five severities, for evaluating a model on damaged inputs.

Each modality declares its corruptions (``mmjax.modalities``: ImageNet-C's ``gaussian_noise``,
``gaussian_blur``, ``contrast`` and ``jpeg`` on images; ``typo``, ``word_drop`` and
``word_shuffle`` on text; ``audio_noise`` on waveforms), each with its table of parameters per
severity 1..5. Every one takes a ``numpy.random.Generator``, so a corrupted evaluation is
reproducible. :func:`batch_corruption` turns a spec into a ``batch -> batch`` function for the
evaluation loop, acting on the one batch entry of the corruption's modality.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mmjax import modalities
from mmjax.modalities import CorruptionError

SEVERITIES = (1, 2, 3, 4, 5)

__all__ = ["SEVERITIES", "CorruptionError", "batch_corruption", "corrupt_batch", "names",
           "parameter", "parse_specs"]


def names() -> list[str]:
    """Every corruption the registered modalities declare."""
    return sorted(c for m in modalities.names() for c in modalities.get(m).corruptions)


def parameter(name: str, severity: int) -> float:
    """The table value of corruption ``name`` at ``severity`` (1..5)."""
    _, corruption = modalities.corruption(name)
    if severity not in SEVERITIES:
        raise CorruptionError(f"corruption {name}: severity {severity!r} is not one of 1..5")
    return corruption.table[severity - 1]


def parse_specs(text: str) -> list[tuple[str, int]]:
    """``"gaussian_noise:3,jpeg:1-5"`` → ``[("gaussian_noise", 3), ("jpeg", 1), ...]``."""
    out: list[tuple[str, int]] = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, sep, sev = item.partition(":")
        lo, dash, hi = sev.partition("-")
        if not sep or not lo.isdigit() or (dash and not hi.isdigit()):
            raise CorruptionError(f"--corrupt item {item!r}: expected NAME:SEVERITY or "
                                  "NAME:FIRST-LAST with severities 1..5")
        for s in range(int(lo), int(hi if dash else lo) + 1):
            parameter(name, s)  # validates both
            out.append((name, s))
    if not out:
        raise CorruptionError(f"--corrupt={text!r} names no corruption")
    return out


def corrupt_batch(batch: Mapping[str, Any], name: str, severity: int, rng: np.random.Generator,
                  *, tokenizer: Any = None) -> dict[str, Any]:
    """``batch`` with corruption ``name`` applied to every row of its modality's entry (text
    is decoded and encoded again with ``tokenizer``)."""
    parameter(name, severity)
    modality, corruption = modalities.corruption(name)
    if modality not in batch:
        raise CorruptionError(f"corruption {name} acts on {modality!r}, which the batch lacks "
                              f"(keys {sorted(batch)})")
    return {**batch, modality: corruption.apply(batch[modality], severity, rng, tokenizer)}


def batch_corruption(name: str, severity: int, *, tokenizer: Any = None,
                     seed: int = 0) -> Callable[[dict], dict]:
    """``batch -> corrupted batch`` for the evaluation loop; batch ``i`` draws from
    ``default_rng([seed, crc32(name), severity, i])``, so the same split gives the same
    corruption every time."""
    parameter(name, severity)
    counter = iter(range(2**62))
    salt = zlib.crc32(name.encode())

    def fn(batch: dict) -> dict:
        rng = np.random.default_rng([seed, salt, severity, next(counter)])
        return corrupt_batch(batch, name, severity, rng, tokenizer=tokenizer)

    return fn
