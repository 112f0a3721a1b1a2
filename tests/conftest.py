"""Test-session settings.

One persistent JAX compilation cache for the whole session, shared by the xdist workers and by
every subprocess a test starts (they inherit the environment): many tests compile the same tiny
train and eval steps (the CLI runs, resumes, multi-device equivalence runs), and on this 2-core
machine compilation is most of their time (a `configs/default.py:tiny` run: 44 s cold, 18 s
with the cache warm). The cache is keyed by the compiled program, its options and the backend,
so a hit runs exactly the executable a fresh compile would produce; it starts empty in every
session (a new temporary folder), so no result depends on an earlier run. A developer's own
``JAX_COMPILATION_CACHE_DIR`` is respected.
"""

from __future__ import annotations

import os
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
    # Cache every program, however small or quick to compile: the tests' programs are tiny.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

