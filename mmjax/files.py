"""Files other commands read are written whole or not at all.

A file is written under a unique temporary name in its own folder (``tempfile.mkstemp``), then
renamed over the target (``os.replace``, atomic on one filesystem): a reader sees the old file
or the new one, never a half-written one, and several processes writing the same path never
share a temporary file. A folder of outputs (an export, an explanation gallery) is built in a
fresh temporary folder beside its target and swapped in whole (:func:`replaced_dir`), so a
command killed halfway leaves the previous output as it was, not old and new files mixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from mmjax.errors import ExplainedError


class OutputFolderError(ValueError, ExplainedError):
    """An output folder holds something the command did not write; the message names it."""


def _umask() -> int:
    """The process umask, read without changing it (Linux), else the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a fresh temporary path beside ``path``; when the block ends without an error it
    is renamed onto ``path``, otherwise deleted. For writers that take a file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, as a plain open would create it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def check_output_dir(path: str | Path, owned: Collection[str]) -> None:
    """:class:`OutputFolderError` unless ``path`` is absent or a folder holding only entries
    named in ``owned`` (what the command writes there)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputFolderError(f"output {path} exists and is not a folder: choose a new folder")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in owned) \
        if path.is_dir() else []
    if foreign:
        raise OutputFolderError(
            f"output folder {path} holds files this command did not write ({foreign[:5]}); "
            "choose an empty or new folder (its contents would be replaced)")


@contextlib.contextmanager
def replaced_dir(path: str | Path, *, owned: Collection[str]) -> Iterator[Path]:
    """Yields a fresh temporary folder beside ``path`` to write into; when the block ends
    without an error it replaces ``path`` (the old folder is renamed away, the new one renamed
    into place, the old one deleted), otherwise it is deleted and ``path`` is untouched.

    ``owned`` names the entries the command writes; an existing ``path`` holding anything
    else (or not a folder) is refused with :class:`OutputFolderError` before anything is
    written, so no file of the user's is ever deleted.
    """
    path = Path(path)
    check_output_dir(path, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        check_output_dir(path, owned)  # again: something may have been put there meanwhile
        old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
        moved = path.exists()
        if moved:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if moved:
                os.rename(old, path)
            raise
        if moved:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- training workdirs: only training writes into one -------------------------------------

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"


class InsideWorkdirError(ValueError, ExplainedError):
    """A command other than training was asked to write into a training workdir."""


def _holder_record(path: Path) -> dict | None:
    """The holder record :func:`lock` writes into ``path``, if ``path`` is such a file (other
    tools name their lock files ``.lock`` too)."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 65536:
            return None
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and {"pid", "host", "started"} <= set(info) else None


def is_training_workdir(path: str | Path) -> bool:
    """Whether ``path`` is a training workdir: a folder with mmjax's ``.lock``, a
    ``metrics.jsonl`` or a checkpoint step under ``checkpoints/``. The one definition mmjax
    uses."""
    p = Path(path)
    if not p.is_dir():
        return False
    if os.path.lexists(p / METRICS_FILE) or _holder_record(p / LOCK_FILE) is not None:
        return True
    try:
        return any(s.name.isdigit() and s.is_dir() for s in (p / CHECKPOINTS_DIR).iterdir())
    except OSError:  # no checkpoints/ (or not readable)
        return False


def enclosing_workdir(path: str | Path) -> Path | None:
    """The training workdir that ``path`` (symbolic links resolved) is or lies inside, if any."""
    p = Path(path).resolve()
    for q in (p, *p.parents):
        if is_training_workdir(q):
            return q
    return None


def refuse_output_inside(path: str | Path, flag: str = "--output") -> None:
    """:class:`InsideWorkdirError` if ``path`` is or lies inside a training workdir."""
    work = enclosing_workdir(path)
    if work is not None:
        raise InsideWorkdirError(
            f"{flag} {path} is inside the training workdir {work}: only training writes "
            "there; choose a path outside it")
