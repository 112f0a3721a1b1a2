"""Errors whose message says everything a user needs: the CLIs print them without a traceback."""

from __future__ import annotations


class ExplainedError(Exception):
    """Base of errors that name their culprit (the workdir, the step, the holder of a lock)."""
