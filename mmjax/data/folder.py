"""A dataset in a folder: ``DIR/{train,val,test}.jsonl`` plus the image files they name.

Each line is a JSON object with ``"image"`` (a path relative to DIR, any format Pillow reads),
``"text"`` and ``"label"`` (string or int). Loading a split runs a validation pass that parses
every line and fully decodes every image *before* training starts, because a bad record found
an hour into a run wastes the hour; each failure names the JSONL file and line (and the image
file). With ``skip_bad`` the bad records are dropped and counted instead.

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

import numpy as np

from mmjax.data import ops

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
FIELDS = ("image", "text", "label")
LABELS_FILE = "labels.json"


class BadDataError(ValueError):
    """A record cannot be used; the message starts with ``file:line``."""


class FolderSource:
    """Random-access records of one split: ``{"image": path, "text": str, "label": raw}``.

    ``on_image(i, array)`` is called with each decoded image during validation, so a caller
    can cache preprocessed pixels instead of decoding the file again.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        skip_bad: bool = False,
        validate_images: bool = True,
        on_image: Callable[[int, np.ndarray], None] | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown folder split {split!r}; expected one of {SPLITS}")
        self.split = split
        self._open(Path(root) / f"{split}.jsonl", FIELDS, skip_bad, validate_images, on_image)

    @classmethod
    def from_file(
        cls,
        file: str | Path,
        *,
        skip_bad: bool = False,
        validate_images: bool = True,
        on_image: Callable[[int, np.ndarray], None] | None = None,
    ) -> FolderSource:
        """Records of any JSONL file in the folder format, image paths relative to the file's
        folder; ``label`` is optional and dropped (new inputs to a trained model)."""
        self = cls.__new__(cls)
        self.split = ""
        self._open(Path(file), FIELDS[:2], skip_bad, validate_images, on_image)
        return self

    def _open(self, file: Path, fields: tuple[str, ...], skip: bool, validate_images: bool,
              on_image: Callable[[int, np.ndarray], None] | None) -> None:
        self.root = str(file.parent.absolute())
        self.file = os.path.join(self.root, file.name)
        self.records: list[dict[str, Any]] = []
        self.lines: list[int] = []  # the JSONL line number of each record, for error messages
        self.indices: list[int] = []  # each record's position among the file's non-blank lines
        self.skipped = 0
        self._fields = fields
        self._load(skip, validate_images, on_image)

    def _bad(self, skip: bool, line: int, why: str) -> None:
        message = f"{self.file}:{line}: {why}"
        if not skip:
            raise BadDataError(message)
        self.skipped += 1
        log.warning("skipping bad record %s", message)

    def _load(
        self,
        skip: bool,
        validate_images: bool,
        on_image: Callable[[int, np.ndarray], None] | None,
    ) -> None:
        if not os.path.isfile(self.file):
            raise FileNotFoundError(f"{self.file}: split file not found")
        labelled = "label" in self._fields
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
                missing = [k for k in self._fields if k not in rec]
                if missing:
                    self._bad(skip, line_no, f"record has no field {missing[0]!r}")
                    continue
                label = rec.get("label")
                if labelled and (isinstance(label, bool) or not isinstance(label, str | int)):
                    self._bad(skip, line_no, f"label must be a string or an int, got {label!r}")
                    continue
                if not isinstance(rec["image"], str) or not isinstance(rec["text"], str):
                    self._bad(skip, line_no, "image and text must be strings")
                    continue
                path = os.path.join(self.root, rec["image"])
                if validate_images:
                    if not os.path.isfile(path):
                        self._bad(skip, line_no, f"image file {path} not found")
                        continue
                    try:
                        pixels = ops.decode_image(path)
                    except Exception as e:
                        self._bad(skip, line_no, f"cannot decode image file {path}: {e}")
                        continue
                    if on_image is not None:
                        on_image(len(self.records), pixels)
                record = {"image": path, "text": rec["text"]}
                if labelled:
                    record["label"] = label
                self.records.append(record)
                self.lines.append(line_no)
                self.indices.append(position)
        if not self.records:
            raise BadDataError(f"{self.file}: no usable records")
        if self.skipped:
            log.warning("%s: skipped %d bad records", self.file, self.skipped)

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
