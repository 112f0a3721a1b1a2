"""Several folder datasets or shard sets trained on as one: ``data.mixture``.

``--config.data.mixture='{"DIR_A": 3, "DIR_B": 1}'`` names the sources (folders or shard sets)
and their weights (normalised). Train rows are drawn from the sources in those proportions by
grain's ``MapDataset.mix`` (a fixed interleaving of the sources' streams), and each source's
stream walks its own per-epoch permutations (``order.GlobalOrder``), so step i's global batch
is a pure function of (seed, i): deterministic, the same whatever the process count, resumed
exactly. Val and test are the sources' splits one after another.

The sources share one label vocabulary (their train labels merged) and one tokenizer (trained
on all their train texts); batches carry every modality some source has (a record without one
is marked absent). A source whose labels are ints and another whose labels are strings disagree
on the task's type: that is an error naming both.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmjax import modalities
from mmjax.data import folder, order
from mmjax.pp import ops


def sources(data_config: Any) -> list[tuple[str, str, float]]:
    """``(name, path, weight)`` per source of ``data.mixture`` (``[]`` when it is empty), weights
    normalised to sum 1. A name is the folder's name, made unique with ``_2``, ``_3``..."""
    text = order.config_get(data_config, "mixture", "") or ""
    if isinstance(text, str):
        if not text.strip():
            return []
        try:
            spec = json.loads(text)
        except ValueError as e:
            raise ValueError(f"data.mixture is not JSON ({e}): expected "
                             '\'{"DIR_A": 3, "DIR_B": 1}\'') from None
    else:
        spec = dict(text)
    if not isinstance(spec, dict) or not spec:
        raise ValueError("data.mixture must map dataset folders to weights, e.g. "
                         '\'{"DIR_A": 3, "DIR_B": 1}\'')
    for path, w in spec.items():
        if isinstance(w, bool) or not isinstance(w, int | float) or not w > 0:
            raise ValueError(f"data.mixture: the weight of {path!r} must be a positive number, "
                             f"got {w!r}")
    total = float(sum(spec.values()))
    out, seen = [], set()
    for path, w in spec.items():
        name = base = Path(path).name or "source"
        n = 1
        while name in seen:
            n += 1
            name = f"{base}_{n}"
        seen.add(name)
        out.append((name, str(Path(path).absolute()), float(w) / total))
    return out


def check_label_types(named_labels: Sequence[tuple[str, Sequence[str | int]]]) -> None:
    """Raises when one source's labels are all ints (class ids) and another's are strings."""
    kinds = {name: "ints" if all(isinstance(x, int) for x in labels) else "strings"
             for name, labels in named_labels}
    if len(set(kinds.values())) > 1:
        ints = [n for n, k in kinds.items() if k == "ints"]
        strs = [n for n, k in kinds.items() if k == "strings"]
        raise folder.BadDataError(
            f"data.mixture: the sources disagree on the label's type: {ints[0]} has int labels "
            f"(class ids), {strs[0]} has string labels; give them the same kind of label")


class MixtureData:
    """The splits of several sources as one (what ``records`` trains and evaluates on):
    example ``i`` is source ``k``'s example ``i - offsets[k]``."""

    def __init__(self, parts: Sequence[Any], names: Sequence[str]):
        self.parts = list(parts)
        self.names = list(names)
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        self.modalities: tuple[str, ...] = ()
        self.skipped = sum(p.skipped for p in parts)
        self.labels: np.ndarray | None = None

    @classmethod
    def load(cls, data_config: Any, split: str, pp: str, make: Any) -> MixtureData:
        """Each source's split, ``make(config, split, pp)`` with this config's settings and
        the source's path."""
        parts = []
        for _, path, _ in sources(data_config):
            sub = data_config.copy_and_resolve_references()
            with sub.unlocked():
                sub.path, sub.mixture = path, ""
            parts.append(make(sub, split, pp))
        return cls(parts, [n for n, _, _ in sources(data_config)])

    def set_modalities(self, names: tuple[str, ...], where: str) -> None:
        for p in self.parts:
            p.set_modalities(names, where)
        self.modalities = names
        if any(p.partial for p in self.parts):  # then every part's batches say what is present
            for p in self.parts:
                p.partial = True

    def set_labels(self, vocab: list, skip_bad: bool) -> None:
        for p in self.parts:
            p.set_labels(vocab, skip_bad)
        self.offsets = np.cumsum([0, *(len(p) for p in self.parts)])
        self.labels = np.concatenate([p.labels for p in self.parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def example(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k].example(int(i - self.offsets[k]))

    def read_ahead(self, indices: list[int]) -> None:
        """Each source reads its records among ``indices`` at once (``_SplitData``)."""
        for k, part in enumerate(self.parts):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            part.read_ahead([i - lo for i in indices if lo <= i < hi])

    def rest(self, all_ops: list[ops.Op]) -> list[ops.Op]:
        return self.parts[0].rest(all_ops)

    def union_modalities(self) -> tuple[str, ...]:
        """Every modality some source's train records have, in registry order."""
        have = {m for p in self.parts for m in p.source.modalities()}
        return tuple(m for m in modalities.names() if m in have)


class MixtureOrder:
    """Step → the global batch's indices into a :class:`MixtureData` of train splits: row
    positions interleaved over the sources by weight (grain's ``MapDataset.mix``), each
    source's draws walking its own per-epoch permutations."""

    def __init__(self, data: MixtureData, spec: Sequence[tuple[str, str, float]],
                 batch_size: int, seed: int):
        import grain

        sizes = [len(p) for p in data.parts]
        weights = [w for _, _, w in spec]
        self.names = [n for n, _, _ in spec]
        self.batch_size = batch_size
        self.offsets = np.cumsum([0, *sizes])[:-1]
        self._orders = [order.GlobalOrder(n, 1, seed + 7919 * k) for k, n in enumerate(sizes)]
        streams = [grain.MapDataset.range(sys.maxsize).map(lambda j, k=k: (k, j))
                   for k in range(len(sizes))]
        self._mix = grain.MapDataset.mix(streams, list(weights))

    def row_sources(self, element: int) -> np.ndarray:
        """The source index of each row of iterator element ``element``'s global batch."""
        rows = range(element * self.batch_size, (element + 1) * self.batch_size)
        return np.asarray([self._mix[r][0] for r in rows], np.int64)

    def fractions(self, start: int, stop: int) -> dict[str, float]:
        """``{"data/<source>_fraction": f}`` over the rows of the global batches of iterator
        elements ``[start, stop)``."""
        rows = range(start * self.batch_size, stop * self.batch_size)
        counts = np.bincount([self._mix[r][0] for r in rows], minlength=len(self.names))
        return {f"data/{n}_fraction": float(c) / max(len(rows), 1)
                for n, c in zip(self.names, counts, strict=True)}

    def __call__(self, step: int) -> np.ndarray:
        rows = range(step * self.batch_size, (step + 1) * self.batch_size)
        out = []
        for r in rows:
            k, j = self._mix[r]
            out.append(self.offsets[k] + int(self._orders[k](j)[0]))
        return np.asarray(out, np.int64)
