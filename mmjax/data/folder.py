"""A dataset in a folder: ``DIR/{train,val,test}.jsonl`` plus the image files they name.

Each line is a JSON object with ``"label"`` (string or int) and any non-empty subset of the modality
fields (``mmjax.modalities``: ``"image"``, ``"audio"``, ``"series"`` name files relative to DIR,
``"text"`` holds the text itself). Loading a split runs a validation pass that parses every line and
fully decodes every file *before* training starts, because a bad record found an hour into a run
wastes the hour; each failure names the JSONL file and line (and the media file). With ``skip_bad``
the bad records are dropped and counted instead.

The records are data, not trusted: a line that is not UTF-8, not JSON Python can hold (an
integer of thousands of digits, nesting thousands deep) or longer than ``data.max_record_bytes``
is a bad record like malformed JSON; a file whose header promises more than
``data.max_image_pixels`` or ``data.max_audio_seconds`` is refused before it is decoded; a path
that leaves the folder (absolute, ``..``, or through a symlink) is refused unless
``data.allow_outside_paths``; values quoted in messages are escaped (docs/security.md).

``FolderSource.from_file`` reads any JSONL file in the same format, with the label optional
(inputs to ``mmjax.predict``, whose paths may lead anywhere: whoever runs it names the file).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from mmjax import files, modalities
from mmjax.errors import ExplainedError
from mmjax.pp import ops

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.json"
MAX_RECORD_BYTES = 1 << 20  # data.max_record_bytes's default: one JSONL line
_CHUNK = 1 << 16  # what the rest of an over-long line is skipped by
# The data.* keys that decide which records are good (with data.skip_bad).
SAFETY_KEYS = ("allow_outside_paths", "max_image_pixels", "max_audio_seconds", "max_record_bytes")


class BadDataError(ValueError, ExplainedError):
    """A record cannot be used; the message starts with ``file:line``."""


class SplitNotFoundError(FileNotFoundError, ExplainedError):
    """A split's JSONL file is missing; the message names it."""


def printable(text: str) -> str:
    """``text`` with every non-printable character (newlines, terminal escapes, bidi
    controls) escaped: a path or value from a record cannot break or forge a message line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def resolve(root: str, value: str, key: str, allow_outside: bool) -> str:
    """The path of a record's file field ``key``: ``value`` relative to ``root``.

    Unless ``allow_outside``, a path that leaves ``root`` (absolute, ``..``, or through a
    symlink) raises ``ValueError`` naming ``key``, whether or not the file exists, so
    "not found" and "cannot decode" say nothing about files outside the folder.
    """
    path = os.path.join(root, value)
    if allow_outside:
        return path
    try:
        real_root, real = os.path.realpath(root), os.path.realpath(path)
    except (OSError, ValueError) as e:  # a NUL byte, a name too long, a symlink loop
        raise ValueError(f"{key} path {value!r} cannot be resolved: {e}") from None
    if os.path.commonpath([real_root, real]) != real_root:
        raise ValueError(f"{key} path {value!r} leaves the dataset folder {root}: set "
                         "data.allow_outside_paths=True to read files outside it")
    return path


def _lines(f: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The lines of ``f``, each read with at most ``limit + 1`` bytes in memory; a longer one
    is skipped to its end and given as None."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = f.readline(_CHUNK)
        yield None


def _parse(line: bytes) -> Any:
    """A JSONL line → its value; ``ValueError`` says why it is not one Python can hold."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                         f"{e.start + 1})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError("malformed JSON (nested too deeply)") from None
    except ValueError as e:  # Python's int-str conversion limit
        raise ValueError(f"malformed JSON (a number of more than "
                         f"{sys.get_int_max_str_digits()} digits: {e})") from None


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
        ctx = ctx or ops.Context()
        outside = bool(ctx.setting("allow_outside_paths", False))
        self._open(Path(root) / f"{split}.jsonl", True, skip_bad, ctx, on_loaded, outside)

    @classmethod
    def from_file(
        cls,
        file: str | Path,
        *,
        skip_bad: bool = False,
        ctx: ops.Context | None = None,
        on_loaded: Callable[[str, int, Any], None] | None = None,
        allow_outside_paths: bool = True,
    ) -> FolderSource:
        """Records of any JSONL file in the folder format, media paths relative to the file's
        folder; ``label`` is optional and dropped (new inputs to a trained model). Their paths
        may leave the folder unless ``allow_outside_paths`` is False."""
        self = cls.__new__(cls)
        self.split = ""
        self._open(Path(file), False, skip_bad, ctx or ops.Context(), on_loaded,
                   allow_outside_paths)
        return self

    def _open(self, file: Path, labelled: bool, skip: bool, ctx: ops.Context,
              on_loaded: Callable[[str, int, Any], None] | None, allow_outside: bool) -> None:
        self.root = str(file.parent.absolute())
        self.file = os.path.join(self.root, file.name)
        self.records: list[dict[str, Any]] = []
        self.lines: list[int] = []  # the JSONL line number of each record, for error messages
        self.indices: list[int] = []  # each record's position among the file's non-blank lines
        self.skipped = 0
        self.measures: dict[str, list[float]] = {}
        self._labelled = labelled
        self._ctx = ctx
        self._allow_outside = allow_outside
        self._on_loaded = on_loaded
        self._load(skip)

    def _bad(self, skip: bool, line: int, why: str) -> None:
        message = printable(f"{self.file}:{line}: {why}")
        if not skip:
            raise BadDataError(message)
        self.skipped += 1
        log.warning("skipping bad record %s", message)

    def _load(self, skip: bool) -> None:
        if not os.path.isfile(self.file):
            raise SplitNotFoundError(printable(
                f"{Path(self.file).absolute()}: split file not found (data.path needs "
                "train.jsonl, val.jsonl and test.jsonl)"))
        labelled = self._labelled
        fields = modalities.names()
        limit = int(self._ctx.setting("max_record_bytes", MAX_RECORD_BYTES))
        position = -1
        with open(self.file, "rb") as f:
            for line_no, line in enumerate(_lines(f, limit), start=1):
                if line is None:
                    position += 1
                    self._bad(skip, line_no, f"line longer than data.max_record_bytes={limit}")
                    continue
                if not line.strip():
                    continue
                position += 1
                try:
                    rec = _parse(line)
                except ValueError as e:
                    self._bad(skip, line_no, str(e))
                    continue
                if not isinstance(rec, dict):
                    self._bad(skip, line_no, "a line must be a JSON object")
                    continue
                if labelled and "label" not in rec:
                    self._bad(skip, line_no, "record has no field 'label'")
                    continue
                label = rec.get("label")
                if labelled and (isinstance(label, bool) or not isinstance(label, str | int)):
                    self._bad(skip, line_no, f"label must be a string or an int, got "
                                             f"{shown(label)}")
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
            try:  # before the file is looked at: nothing is revealed about files outside
                path = record[m] = resolve(self.root, rec[m], m, self._allow_outside)
            except ValueError as e:
                return str(e)
            if not os.path.isfile(path):
                return f"{m} file {path} not found"
            try:
                decoded[m] = load(path, self._ctx)
            except ops.LimitError as e:
                return f"{m} file {path} refused: {e}"
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
        return _read_labels(path)
    raw = [r["label"] for r in train.records] if isinstance(train, FolderSource) else train
    vocab = build_label_vocab(raw)
    if path is not None:  # whole or not at all: runs starting together share no temporary file
        files.write_atomic(path, json.dumps(vocab))
    return vocab


def _read_labels(path: Path) -> list[str | int]:
    """A saved vocabulary; a damaged or cut-short file is named (it is the run's classes)."""
    try:
        vocab = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, int-str limit
        raise BadDataError(printable(f"{path.absolute()}: damaged or cut short, not JSON "
                                     f"({e})")) from None
    if not isinstance(vocab, list) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in vocab):
        raise BadDataError(f"{path.absolute()}: damaged, not a JSON list of labels (strings "
                           "or ints)")
    return vocab


def label_index(vocab: Sequence[str | int]) -> dict[str, int]:
    """Label → class index, keyed by the string form so ``1`` and ``"1"`` agree."""
    return {str(v): i for i, v in enumerate(vocab)}
