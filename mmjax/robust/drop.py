"""Evaluation with modalities marked absent, following the batch contract for missing inputs.

A batch may carry ``batch["present"] = {modality: bool[B]}``; False means the example lacks
that modality, and the model replaces it (a learned per-modality token) without reading the
entry. Dropping a modality sets its mask to False in every row and leaves the entry in place as
the placeholder: same shape and dtype, and real values, so a model that reads it anyway sees
valid inputs (never an all-padding text row), and any change in the metrics comes from the model
honouring ``present``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from mmjax.errors import ExplainedError


class DropError(ValueError, ExplainedError):
    """``--drop`` names a modality the model has no tower for."""


def parse_drop(text: str | Sequence[str], modalities: Iterable[str]) -> tuple[str, ...]:
    """``"image,text"`` → ``("image", "text")``, each checked against the model's towers."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [s for s in names if s]
    known = list(modalities)
    for name in names:
        if name not in known:
            raise DropError(f"--drop={name!r}: the model has no such modality; its modalities: "
                            f"{known}")
    if len(set(names)) != len(names):
        raise DropError(f"--drop names a modality twice: {names}")
    return tuple(names)


def batch_drop(modalities: Sequence[str]) -> Callable[[dict], dict]:
    """``batch -> batch`` with ``present[m]`` False in every row for each ``m`` dropped
    (present masks already in the batch are kept for the other modalities)."""
    dropped = tuple(modalities)

    def fn(batch: dict) -> dict:
        rows = len(np.asarray(batch["label"] if "label" in batch else batch["valid"]))
        present = {k: np.asarray(v, bool) for k, v in dict(batch.get("present", {})).items()}
        for m in dropped:
            if m not in batch:
                raise DropError(f"--drop={m!r}: the batch has no {m!r} entry (keys "
                                f"{sorted(batch)})")
            present[m] = np.zeros(rows, bool)
        return {**batch, "present": present} if dropped else batch

    return fn
