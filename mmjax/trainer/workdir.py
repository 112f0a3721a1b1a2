"""One writer per workdir: an OS file lock held for the run's lifetime.

``WORKDIR/.lock`` is locked with ``fcntl.flock``; the kernel releases the lock when the holding
process ends, however it ends (SIGKILL included), so a stale lock file never blocks a new run.
The file records the holder (pid, host, start time, command) for the error a second run gets.
It is opened without following a symbolic link and without truncating, so a ``.lock`` planted
as a link to another file is refused and that file is left as it is. A filesystem without
``flock`` is an error naming the workdir, never an unlocked run. On a filesystem whose
``flock`` does not work across hosts (some NFS setups) the lock only protects runs started on
the same host.

Only training (and ``mmjax.convert`` writing a checkpoint) writes into a workdir: other
commands refuse an output inside one (:func:`refuse_output_inside`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from mmjax.errors import ExplainedError

# What makes a folder a training workdir lives in mmjax.files, below the data layer, so that
# every command (mmjax.data.inspect included) can refuse to write into one; re-exported here.
from mmjax.files import LOCK_FILE as LOCK_FILE
from mmjax.files import InsideWorkdirError as InsideWorkdirError
from mmjax.files import enclosing_workdir as enclosing_workdir
from mmjax.files import is_training_workdir as is_training_workdir
from mmjax.files import refuse_output_inside as refuse_output_inside


class WorkdirInUseError(RuntimeError, ExplainedError):
    """Another run holds the workdir's lock; the message names the workdir and the holder."""


class WorkdirLockError(OSError, ExplainedError):
    """The workdir cannot be locked (a ``.lock`` that is a link or not a plain file, a
    filesystem without ``flock``); the message names the workdir."""


class WorkdirWriteError(OSError, ExplainedError):
    """Writing into the workdir failed (full disk, lost permission, a read-only mount)."""


def _holder_text(raw: str) -> str:
    try:
        info = json.loads(raw)
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}: "
                f"{info.get('command', '')}")
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _open_lock_file(path: Path, workdir: Path) -> int:
    """The lock file's descriptor: created if absent, never through a link, never truncated."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise WorkdirLockError(
                f"cannot lock workdir {workdir}: {path} is a symbolic link; mmjax does not "
                "write through it (remove it)") from None
        raise WorkdirLockError(f"cannot lock workdir {workdir}: {path}: {e.strerror}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a plain file" if not stat.S_ISREG(st.st_mode) else "a hard link"
        raise WorkdirLockError(f"cannot lock workdir {workdir}: {path} is {what} (remove it)")
    return fd


@contextlib.contextmanager
def lock(workdir: str | Path, *, enabled: bool = True) -> Iterator[None]:
    """Holds ``WORKDIR/.lock`` while the block runs; :class:`WorkdirInUseError` at once if
    another process holds it, :class:`WorkdirLockError` if it cannot be locked at all.
    ``enabled=False`` (processes other than 0) does nothing."""
    if not enabled:
        yield
        return
    where = Path(workdir).absolute()
    path = where / LOCK_FILE
    where.mkdir(parents=True, exist_ok=True)
    f = os.fdopen(_open_lock_file(path, where), "r+", encoding="utf-8")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = _holder_text(f.read())
        f.close()
        raise WorkdirInUseError(
            f"workdir {where} is in use by another run ({holder}); wait for "
            "it to end or choose another --workdir") from None
    except OSError as e:
        f.close()
        raise WorkdirLockError(
            f"cannot lock workdir {where}: its filesystem does not support file locks "
            f"(flock: {e.strerror or e}); use a workdir on a local disk") from e
    try:
        f.seek(0)
        f.truncate()  # the holder's own record, under the lock
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": started, "command": " ".join(sys.argv)}) + "\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()
