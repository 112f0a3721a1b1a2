"""A folder dataset written as ArrayRecord shards: the format, its writer and its reader.

A shard set is a folder ``OUT`` with

- ``shards.json``: the manifest (format version, per split its shard files, record count and
  index file, the JSONL file the records came from), the train modalities and the label
  vocabulary (also in ``labels.json``);
- ``<split>-NNNNN-of-MMMMM.array_record``: one record per example, a msgpack map of the encoded
  bytes of each of its media files (``image``, ``audio``, ``series``, ... exactly as on disk), its
  ``text`` and its ``label``;
- ``<split>.index.jsonl``: per record, its line in the source JSONL, label, text and relative
  media paths. Labels, texts (the tokenizer) and which modalities a record has come from here,
  so no process reads the media of records it does not train on.

Records are validated on the way in by the folder source itself (``FolderSource``: the same
named errors and ``skip_bad``), so reading a shard set decodes the same bytes with the same
decoders, and training from it gives the batches of the folder it was made from. ArrayRecord
gives random access (grain's ``ArrayRecordDataSource``), so the global shuffle, each process's
rows of a batch and exact resume work as for a folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import msgpack

from mmjax import files, modalities
from mmjax.data import folder
from mmjax.errors import ExplainedError
from mmjax.pp import ops

log = logging.getLogger(__name__)

MANIFEST = "shards.json"
FORMAT = "mmjax-shards"
VERSION = 1
_WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random reads (grain's advice)
# The file modalities whose decoders read encoded bytes as well as paths.
FROM_BYTES = ("image", "audio", "series")


class ShardSetError(ValueError, ExplainedError):
    """A shard set is damaged or not one; the message names the file."""


def is_shard_set(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`write`."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the shard set at ``path``; a damaged one is named."""
    file = Path(path).absolute() / MANIFEST
    try:
        manifest = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as e:
        raise ShardSetError(f"{file}: damaged, not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardSetError(f"{file}: not an mmjax shard manifest")
    if manifest.get("version") != VERSION:
        raise ShardSetError(f"{file}: shard format version {manifest.get('version')!r}, this "
                            f"mmjax reads version {VERSION}: write the shards again")
    return manifest


def write(input_dir: str | Path, output_dir: str | Path, *, shard_mb: float = 256,
          skip_bad: bool = False, data: Any = None) -> dict[str, Any]:
    """Writes the folder dataset ``input_dir`` as a shard set in ``output_dir`` (new or empty)
    and returns its manifest.

    Every split is validated first by ``FolderSource`` (``data``: the ``data.*`` settings that
    decide which records are good, as a dict or config); val/test labels must occur in train.
    The set is written next to ``output_dir`` and renamed into place at the end, so a failure
    leaves nothing half-written under that name.
    """
    out = Path(output_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; shards are written "
                              "to a new folder")
    ctx = ops.Context(data=dict(data or {}))
    sources = {split: folder.FolderSource(input_dir, split, skip_bad=skip_bad, ctx=ctx)
               for split in folder.SPLITS}
    vocab = folder.build_label_vocab([r["label"] for r in sources["train"].records])
    known = folder.label_index(vocab)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits = {split: _write_split(src, tmp, split, known, shard_mb, skip_bad)
                  for split, src in sources.items()}
        manifest = {"format": FORMAT, "version": VERSION, "source": str(Path(input_dir).absolute()),
                    "modalities": list(sources["train"].modalities()), "labels": vocab,
                    "splits": splits}
        (tmp / folder.LABELS_FILE).write_text(json.dumps(vocab))
        files.write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_split(src: folder.FolderSource, out: Path, split: str, known: dict[str, int],
                 shard_mb: float, skip_bad: bool) -> dict[str, Any]:
    from array_record.python.array_record_module import ArrayRecordWriter

    limit = max(1, int(shard_mb * 2**20))
    names: list[str] = []
    writer, size, count, skipped = None, 0, 0, src.skipped
    index_lines = []
    for rec, line in zip(src.records, src.lines, strict=True):
        if str(rec["label"]) not in known:
            message = folder.printable(f"{src.file}:{line}: label {folder.shown(rec['label'])} "
                                       "does not occur in train")
            if not skip_bad:
                raise folder.BadDataError(message)
            log.warning("skipping bad record %s", message)
            skipped += 1
            continue
        payload: dict[str, Any] = {"label": rec["label"]}
        entry: dict[str, Any] = {"line": line, "label": rec["label"]}
        for m in modalities.names():
            if m not in rec:
                continue
            if modalities.get(m).load is None:
                payload[m] = entry[m] = rec[m]
            elif m not in FROM_BYTES:
                raise ShardSetError(folder.printable(
                    f"{src.file}:{line}: {m} files cannot go into a shard set yet (its decoder "
                    f"reads paths only; shard sets hold {', '.join(FROM_BYTES)} files)"))
            else:
                payload[m] = Path(rec[m]).read_bytes()
                entry[m] = os.path.relpath(rec[m], src.root)
        blob = msgpack.packb(payload, use_bin_type=True)
        if writer is None or size >= limit:
            if writer is not None:
                writer.close()
            names.append(f"{split}-{len(names):05d}.array_record")
            writer, size = ArrayRecordWriter(str(out / names[-1]), _WRITER_OPTIONS), 0
        writer.write(blob)
        size += len(blob)
        count += 1
        index_lines.append(json.dumps(entry))
    if writer is not None:
        writer.close()
    final = [f"{split}-{i:05d}-of-{len(names):05d}.array_record" for i in range(len(names))]
    for old, new in zip(names, final, strict=True):
        (out / old).rename(out / new)
    index = f"{split}.index.jsonl"
    (out / index).write_text("".join(line + "\n" for line in index_lines))
    log.info("%s: %d records in %d shards (%d skipped)", split, count, len(final), skipped)
    return {"files": final, "records": count, "index": index, "jsonl": src.file,
            "skipped": skipped}


class ShardSource:
    """Random-access records of one split of a shard set, with the interface of
    ``FolderSource``: ``records`` (label, text and media paths from the index), ``lines`` and
    ``file`` (where each record came from, for messages), ``source[i]`` the record with each
    media field as its encoded bytes, read from the shards on demand."""

    def __init__(self, root: str | Path, split: str):
        import grain

        if split not in folder.SPLITS:
            raise ValueError(f"unknown folder split {split!r}; expected one of {folder.SPLITS}")
        self.root = str(Path(root).absolute())
        self.split = split
        info = read_manifest(root)["splits"].get(split)
        if info is None:
            raise ShardSetError(f"{self.root}/{MANIFEST}: no split {split!r}")
        self.file = str(info["jsonl"])  # messages name the line a record came from
        self.records: list[dict[str, Any]] = []
        self.lines: list[int] = []
        index = Path(self.root) / info["index"]
        with open(index, "rb") as f:
            for n, line in enumerate(f, start=1):
                try:
                    entry = json.loads(line)
                    self.lines.append(int(entry.pop("line")))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise ShardSetError(f"{index}:{n}: damaged index line ({e})") from None
                self.records.append(entry)
        if len(self.records) != info["records"]:
            raise ShardSetError(f"{index}: {len(self.records)} lines, the manifest says "
                                f"{info['records']}: the shard set is damaged")
        self.indices = list(range(len(self.records)))
        self.positions = list(range(len(self.records)))  # each record's place in the shards
        self.skipped = 0  # bad records were counted (and dropped) when the shards were written
        self.measures: dict[str, list[float]] = {}
        paths = [os.path.join(self.root, name) for name in info["files"]]
        self._reader: Any = grain.sources.ArrayRecordDataSource(paths) if paths else []

    def modalities(self) -> tuple[str, ...]:
        """The modality fields that occur in at least one record, in registry order."""
        seen = set().union(*(r.keys() for r in self.records))
        return tuple(m for m in modalities.names() if m in seen)

    def __len__(self) -> int:
        return len(self.records)

    def many(self, indices: list[int]) -> list[dict[str, Any]]:
        """``[self[i] for i in indices]``, read in one call."""
        blobs = self._reader.__getitems__([self.positions[i] for i in indices]) \
            if indices else []
        return [dict(msgpack.unpackb(b, raw=False)) for b in blobs]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(msgpack.unpackb(self._reader[self.positions[index]], raw=False))
