"""A dataset in a folder: ``DIR/{train,val,test}.jsonl`` plus the image files they name.

Each line is a JSON object with ``"label"`` (string or int) and any non-empty subset of the
modality fields ``"image"`` (a path relative to DIR, any format Pillow reads), ``"audio"`` (a
path relative to DIR, WAV/FLAC/OGG or anything libsndfile reads), ``"series"`` (a path to a
``.npy`` of floats ``[time, channels]``) and ``"text"``. Loading a split
runs a validation pass that parses every line and fully decodes every image and clip *before*
training starts, because a bad record found an hour into a run wastes the hour; each failure
names the JSONL file and line (and the media file). With ``skip_bad`` the bad records are
dropped and counted instead.

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

from mmjax.data import audio_ops, ops, series_ops

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MODALITIES = ("image", "audio", "series", "text")  # the record fields that are model inputs
FIELDS = (*MODALITIES, "label")
LABELS_FILE = "labels.json"


class BadDataError(ValueError):
    """A record cannot be used; the message starts with ``file:line``."""


class FolderSource:
    """Random-access records of one split: ``{"image": path, "audio": path, "text": str,
    "label": raw}``, each record with the modality fields its line has.

    ``on_image(i, array)`` / ``on_audio(i, waveform)`` are called with each decoded image / clip
    (mono, at ``audio_rate`` Hz; the file's own rate if 0) during validation, so a caller can
    cache preprocessed inputs instead of decoding the file again.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        skip_bad: bool = False,
        validate_images: bool = True,
        on_image: Callable[[int, np.ndarray], None] | None = None,
        on_audio: Callable[[int, np.ndarray], None] | None = None,
        audio_rate: int = 0,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown folder split {split!r}; expected one of {SPLITS}")
        self.split = split
        self._on_audio, self._audio_rate = on_audio, audio_rate
        self._open(Path(root) / f"{split}.jsonl", True, skip_bad, validate_images, on_image)

    @classmethod
    def from_file(
        cls,
        file: str | Path,
        *,
        skip_bad: bool = False,
        validate_images: bool = True,
        on_image: Callable[[int, np.ndarray], None] | None = None,
        on_audio: Callable[[int, np.ndarray], None] | None = None,
        audio_rate: int = 0,
    ) -> FolderSource:
        """Records of any JSONL file in the folder format, media paths relative to the file's
        folder; ``label`` is optional and dropped (new inputs to a trained model)."""
        self = cls.__new__(cls)
        self.split = ""
        self._on_audio, self._audio_rate = on_audio, audio_rate
        self._open(Path(file), False, skip_bad, validate_images, on_image)
        return self

    def _open(self, file: Path, labelled: bool, skip: bool, validate_images: bool,
              on_image: Callable[[int, np.ndarray], None] | None) -> None:
        self.root = str(file.parent.absolute())
        self.file = os.path.join(self.root, file.name)
        self.records: list[dict[str, Any]] = []
        self.lines: list[int] = []  # the JSONL line number of each record, for error messages
        self.indices: list[int] = []  # each record's position among the file's non-blank lines
        self.skipped = 0
        self._labelled = labelled
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
        labelled = self._labelled
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
                have = [m for m in MODALITIES if m in rec]
                if not have:
                    self._bad(skip, line_no, f"record has none of the fields {MODALITIES}")
                    continue
                wrong = [m for m in have if not isinstance(rec[m], str)]
                if wrong:
                    self._bad(skip, line_no, f"field {wrong[0]!r} must be a string")
                    continue
                record = {"text": rec["text"]} if "text" in rec else {}
                why = self._check_media(rec, record, validate_images, on_image)
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

    def _check_media(self, rec: dict, record: dict, validate: bool,
                     on_image: Callable[[int, np.ndarray], None] | None) -> str:
        """Fills ``record``'s media paths, decoding each file if ``validate``; returns why the
        record is bad ("" if it is not). Callbacks run only once the whole record is good."""
        decoded = {}
        for m in ("image", "audio", "series"):
            if m not in rec:
                continue
            path = record[m] = os.path.join(self.root, rec[m])
            if not validate:
                continue
            if not os.path.isfile(path):
                return f"{m} file {path} not found"
            try:
                if m == "image":
                    decoded[m] = ops.decode_image(path)
                elif m == "audio":
                    decoded[m] = audio_ops.decode_audio(path, self._audio_rate or 0)
                else:
                    series_ops.load_series(path)
            except Exception as e:
                return f"cannot decode {m} file {path}: {e}"
        i = len(self.records)
        if on_image is not None and "image" in decoded:
            on_image(i, decoded["image"])
        if self._on_audio is not None and "audio" in decoded:
            self._on_audio(i, decoded["audio"])
        return ""

    def modalities(self) -> tuple[str, ...]:
        """The modality fields that occur in at least one record, in ``MODALITIES`` order."""
        seen = set().union(*(r.keys() for r in self.records))
        return tuple(m for m in MODALITIES if m in seen)

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
