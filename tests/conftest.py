"""Test-session settings.

One persistent JAX compilation cache for the whole session, shared by the xdist workers and by
every subprocess a test starts (they inherit the environment): many tests compile the same tiny
train and eval steps (the CLI runs, resumes, multi-device equivalence runs), and on a CPU
compilation is most of their time. The cache is keyed by the compiled program, its options and
the backend, so a hit runs exactly the executable a fresh compile would produce; it starts empty
in every session (a new temporary folder), so no result depends on an earlier run. A developer's
own ``JAX_COMPILATION_CACHE_DIR`` is respected.

The same reason sets ``TEST_XLA_FLAGS`` (added to ``XLA_FLAGS`` unless that already names them;
subprocesses inherit them): XLA:CPU's LLVM back end at optimisation level 0, whose passes are
most of the compile time of these tiny programs and buy them nothing, and XLA:CPU's older
elemental code generator in place of its fusion emitters, which compiles a tiny train step in
about two thirds of the time. Both are XLA:CPU settings that GPU and TPU runs never see; every
process of a session uses the same ones, so runs that must agree bit for bit (resumes, 1 vs 8
devices) compile alike. Tests that read a program's structure read what mmjax hands to XLA
(``jit(...).lower()``), not what XLA:CPU makes of it. The benchmark CLI tests run under these
flags too: they check the report, not its timings. Tests marked ``compute_bound`` (learning
runs, attacks) spend their time running programs rather than compiling them and take about
half the time at full optimisation; flags already named in ``XLA_FLAGS`` win, which is how
``.ci/run`` runs them apart.
"""

from __future__ import annotations

import os
import shutil
import tempfile

TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                  "--xla_cpu_use_fusion_emitters=false")

_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] + [f for f in TEST_XLA_FLAGS if f.split("=")[0] not in _flags]
).strip()

_OWN_CACHE = None  # the cache folder this process made (xdist workers inherit the variable)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="mmjax-test-jax-cache-")
    # Cache every program, however small or quick to compile: the tests' programs are tiny.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")



def pytest_unconfigure(config) -> None:
    """Removes the session's compilation cache once the session (all workers) has ended."""
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
