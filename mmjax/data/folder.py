"""A dataset in a folder: ``DIR/{train,val,test}.jsonl`` plus the image files they name.

Each line is a JSON object with ``"label"`` (string or int) and any non-empty subset of the modality
fields (``mmjax.modalities``: ``"image"``, ``"audio"``, ``"series"`` name files relative to DIR,
``"text"`` holds the text itself). Loading a split runs a validation pass that parses every line and
fully decodes every file *before* training starts, because a bad record found an hour into a run
wastes the hour; each failure names the JSONL file and line (and the media file). With ``skip_bad``
the bad records are dropped and counted instead.

``FolderSource.from_file`` reads any JSONL file in the same format, with the label optional
(inputs to ``mmjax.predict``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmjax import modalities
from mmjax.pp import ops

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.json"


class BadDataError(ValueError):
    """A record cannot be used; the message starts with ``file:line``."""


class FolderSource:
    """Random-access records of one split: ``{"image": path, "text": str, "label": raw, ...}``,
    each record with the modality fields its line has (file fields as absolute paths).

    ``ctx`` (``mmjax.pp.ops.Context``) is what the modalities' decoders need (the audio front
    end's rate); ``on_loaded(modality, i, value)`` is called with each decoded file of a good
    record ``i``, so a caller can cache preprocessed inputs instead of decoding it again, and
    ``modalities.get(m).measure`` of each decoded file is kept in ``measures[m]``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        skip_bad: bool = False,
        ctx: ops.Context | None = None,
        on_loaded: Callable[[str, int, Any], None] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown folder split {split!r}; expected one of {SPLITS}")
        self.split = split
        self._open(Path(root) / f"{split}.jsonl", True, skip_bad, ctx, on_loaded)

    @classmethod
    def from_file(
        cls,
        file: str | Path,
        *,
        skip_bad: bool = False,
        ctx: ops.Context | None = None,
        on_loaded: Callable[[str, int, Any], None] | None = None,
    ) -> FolderSource:
        """Records of any JSONL file in the folder format, media paths relative to the file's
        folder; ``label`` is optional and dropped (new inputs to a trained model)."""
        self = cls.__new__(cls)
        self.split = ""
        self._open(Path(file), False, skip_bad, ctx, on_loaded)
        return self

    def _open(self, file: Path, labelled: bool, skip: bool, ctx: ops.Context | None,
              on_loaded: Callable[[str, int, Any], None] | None) -> None:
        self.root = str(file.parent.absolute())
        self.file = os.path.join(self.root, file.name)
        self.records: list[dict[str, Any]] = []
        self.lines: list[int] = []  # the JSONL line number of each record, for error messages
        self.indices: list[int] = []  # each record's position among the file's non-blank lines
        self.skipped = 0
        self.measures: dict[str, list[float]] = {}
        self._labelled = labelled
        self._ctx = ctx or ops.Context()
        self._on_loaded = on_loaded
        self._load(skip)

    def _bad(self, skip: bool, line: int, why: str) -> None:
        message = f"{self.file}:{line}: {why}"
        if not skip:
            raise BadDataError(message)
        self.skipped += 1
        log.warning("skipping bad record %s", message)

    def _load(self, skip: bool) -> None:
        if not os.path.isfile(self.file):
            raise FileNotFoundError(f"{self.file}: split file not found")
        labelled = self._labelled
        fields = modalities.names()
        position = -1
        with open(self.file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                position += 1
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    self._bad(skip, line_no, f"malformed JSON ({e.msg}, column {e.colno})")
                    continue
                if not isinstance(rec, dict):
                    self._bad(skip, line_no, "a line must be a JSON object")
                    continue
                if labelled and "label" not in rec:
                    self._bad(skip, line_no, "record has no field 'label'")
                    continue
                label = rec.get("label")
                if labelled and (isinstance(label, bool) or not isinstance(label, str | int)):
                    self._bad(skip, line_no, f"label must be a string or an int, got {label!r}")
                    continue
                have = [m for m in fields if m in rec]
                if not have:
                    self._bad(skip, line_no, f"record has none of the fields {fields}")
                    continue
                wrong = [m for m in have if not isinstance(rec[m], str)]
                if wrong:
                    self._bad(skip, line_no, f"field {wrong[0]!r} must be a string")
                    continue
                record: dict[str, Any] = {}
                why = self._check_media(rec, have, record)
                if why:
                    self._bad(skip, line_no, why)
                    continue
                if labelled:
                    record["label"] = label
                self.records.append(record)
                self.lines.append(line_no)
                self.indices.append(position)
        if not self.records:
            raise BadDataError(f"{self.file}: no usable records")
        if self.skipped:
            log.warning("%s: skipped %d bad records", self.file, self.skipped)

    def _check_media(self, rec: dict, have: list[str], record: dict) -> str:
        """Fills ``record``'s modality fields, decoding each file; returns why the record is bad
        ("" if it is not). Callbacks run only once the whole record is good."""
        decoded = {}
        for m in have:
            load = modalities.get(m).load
            if load is None:  # the record holds the value itself
                record[m] = rec[m]
                continue
            path = record[m] = os.path.join(self.root, rec[m])
            if not os.path.isfile(path):
                return f"{m} file {path} not found"
            try:
                decoded[m] = load(path, self._ctx)
            except Exception as e:
                return f"cannot decode {m} file {path}: {e}"
        i = len(self.records)
        for m, value in decoded.items():
            measure = modalities.get(m).measure
            if measure is not None:
                self.measures.setdefault(m, []).append(measure(value))
            if self._on_loaded is not None:
                self._on_loaded(m, i, value)
        return ""

    def modalities(self) -> tuple[str, ...]:
        """The modality fields that occur in at least one record, in registry order."""
        seen = set().union(*(r.keys() for r in self.records))
        return tuple(m for m in modalities.names() if m in seen)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.records[index])


def build_label_vocab(labels: Sequence[str | int]) -> list[str | int]:
    """Sorted distinct labels: numerically when all are ints, else by their string form."""
    distinct = set(labels)
    if all(isinstance(x, int) for x in distinct):
        return sorted(distinct)
    return sorted(distinct, key=str)


def label_vocab(
    train: FolderSource | Sequence[str | int], workdir: str | Path = ""
) -> list[str | int]:
    """The label vocabulary of the train split, saved in (or read back from) ``workdir``.

    Reading it back keeps class indices stable when a run resumes, even if the train file
    changed in between.
    """
    path = Path(workdir) / LABELS_FILE if workdir else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    raw = [r["label"] for r in train.records] if isinstance(train, FolderSource) else train
    vocab = build_label_vocab(raw)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(vocab))
        os.replace(tmp, path)
    return vocab


def label_index(vocab: Sequence[str | int]) -> dict[str, int]:
    """Label → class index, keyed by the string form so ``1`` and ``"1"`` agree."""
    return {str(v): i for i, v in enumerate(vocab)}
