"""One writer per workdir: an OS file lock held for the run's lifetime.

``WORKDIR/.lock`` is locked with ``fcntl.flock``; the kernel releases the lock when the holding
process ends, however it ends (SIGKILL included), so a stale lock file never blocks a new run.
The file records the holder (pid, host, start time, command) for the error a second run gets.
On a filesystem without working ``flock`` across hosts (some NFS setups) the lock only protects
runs started on the same host.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from mmjax.errors import ExplainedError

LOCK_FILE = ".lock"


class WorkdirInUseError(RuntimeError, ExplainedError):
    """Another run holds the workdir's lock; the message names the workdir and the holder."""


class WorkdirWriteError(OSError, ExplainedError):
    """Writing into the workdir failed (full disk, lost permission, a read-only mount)."""


def _holder_text(raw: str) -> str:
    try:
        info = json.loads(raw)
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}: "
                f"{info.get('command', '')}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


@contextlib.contextmanager
def lock(workdir: str | Path, *, enabled: bool = True) -> Iterator[None]:
    """Holds ``WORKDIR/.lock`` while the block runs; :class:`WorkdirInUseError` at once if
    another process holds it. ``enabled=False`` (processes other than 0) does nothing."""
    if not enabled:
        yield
        return
    path = Path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _holder_text(f.read())
        f.close()
        raise WorkdirInUseError(
            f"workdir {Path(workdir).absolute()} is in use by another run ({holder}); wait for "
            "it to end or choose another --workdir") from None
    try:
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": started, "command": " ".join(sys.argv)}) + "\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
