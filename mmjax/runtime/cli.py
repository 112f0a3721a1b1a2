"""Shared command-line plumbing: config flags, logging, and the error contract.

Every CLI ends a failure with a non-zero exit and a last stderr line that names the culprit, so
``run_main`` turns any exception into ``error: <message>`` as the final line.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from mmjax.errors import ExplainedError

FLAGS = flags.FLAGS


def define_config_flag() -> None:
    """Defines ``--config`` once per process (several CLI modules may be imported together)."""
    if "config" in FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", None, "config file, optionally with an argument: configs/x.py[:arg]",
        lock_config=True,
    )


def _explain_override_error(argv: Sequence[str], error: BaseException) -> str:
    """Names the --config.* override that failed (ml_collections reports it obliquely)."""
    text = str(error)
    for arg in argv:
        m = re.match(r"--config\.([\w.]+)(=.*)?$", arg)
        if not m:
            continue
        key = m.group(1)
        leaf = key.rsplit(".", 1)[-1]
        if leaf in text or key in text:
            return f"bad config override {arg}: no such key or bad value for config.{key} ({text})"
    return f"bad command line: {type(error).__name__}: {text}"


def parse_flags(argv: Sequence[str]) -> None:
    try:
        FLAGS(list(argv))
    except Exception as e:
        _fail(_explain_override_error(argv, e), code=2)


def _escaped(line: str) -> str:
    """``line`` with control characters other than tabs escaped (``\\x1b``, ``\\r``,
    ``\\u2028``): text from data cannot move the cursor, erase or split the error line."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == "\t" else
                   c.encode("unicode_escape").decode("ascii") for c in line)


def _fail(message: str, code: int = 1) -> None:
    """Exits with ``code``; the last stderr line is ``error: `` + the message's last line.

    Multi-line messages (a config file's own traceback, say) are printed whole first, since
    their last line is the one that names the culprit. Lines end only at ``\\n``; other
    controls are escaped.
    """
    lines = [_escaped(line) for line in message.split("\n") if line.strip()] or [
        "unknown error"]
    _quiet_shutdown()
    sys.stderr.flush()
    if len(lines) > 1:
        print("\n".join(lines[:-1]), file=sys.stderr)
    print(f"error: {lines[-1]}", file=sys.stderr, flush=True)
    sys.exit(code)


def _drop_closed_loop_reports() -> None:
    """Orbax's writes, after one fails, call into asyncio loops that are already closed; each
    call reports "Event loop is closed" through ``sys.unraisablehook``, repeating the failure
    the run reports itself. Those go to the debug log; every other report goes through."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            logging.getLogger(__name__).debug("ignored: %s", value)
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _quiet_shutdown() -> None:
    """After a failure, background writers (Orbax's asyncio tasks) may report the same error
    again while the interpreter shuts down; those reports go to the debug log, so the error
    line stays the last one."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda u: logging.getLogger(__name__).debug(
        "ignored during shutdown: %s", u.exc_value)


def _one_line_orbax_errors(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background write from several threads, each with its traceback; the
    run reports the error itself, so those records keep their message and lose the traceback."""
    if record.exc_info and "orbax" in record.pathname:
        record.exc_info = record.exc_text = None
    return True


def run_main(main: Callable[[], object], argv: Sequence[str] | None = None) -> None:
    """Parses flags, configures logging, runs ``main``; failures end with an ``error:`` line."""
    argv = list(sys.argv if argv is None else argv)
    parse_flags(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_one_line_orbax_errors)
    _drop_closed_loop_reports()
    try:
        main()
    except KeyboardInterrupt:
        _fail("interrupted", code=130)
    except Exception as e:
        if not isinstance(e, ExplainedError):
            traceback.print_exc(file=sys.stderr)
        _fail(f"{type(e).__name__}: {e}")
