"""XLA flags that mmjax sets for speed, unless the user already chose a value.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`apply_default_flags` must
run before any JAX computation (safest: before ``import jax``); this module itself imports no JAX
for that reason. A flag the user already names in ``XLA_FLAGS`` is left as the user set it, so
any default here can be switched off from the command line
(``XLA_FLAGS=--xla_gpu_enable_triton_gemm=true python -m mmjax.benchmark ...``), and
``MMJAX_NO_XLA_FLAGS=1`` adds none of them (for an XLA build that no longer knows one: XLA
aborts on unknown flags).

The flags, and why (docs/performance.md has the measurements):

* ``--xla_gpu_enable_latency_hiding_scheduler=true``: schedules the data-parallel gradient
  all-reduce asynchronously so it overlaps the rest of the backward pass (NVIDIA's JAX
  containers set it); with one GPU there is no collective to overlap.
* ``--xla_gpu_enable_triton_gemm=false``: every matmul to cuBLAS instead of XLA's Triton GEMM
  emitter (also a JAX-Toolbox default), which also skips Triton autotuning at compile time.

The GPU flags are accepted, and ignored, by the CPU backend, so setting them is harmless there.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

DEFAULT_FLAGS: tuple[str, ...] = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
)


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].strip()


def apply_default_flags(
    flags: Sequence[str] = DEFAULT_FLAGS, environ: MutableMapping[str, str] | None = None
) -> list[str]:
    """Appends each of ``flags`` to ``XLA_FLAGS`` unless a flag of that name is already there.

    Returns the flags it added (so a benchmark can report them). Call before JAX starts a backend.
    """
    env = os.environ if environ is None else environ
    if env.get("MMJAX_NO_XLA_FLAGS"):  # escape hatch, e.g. an XLA build that lacks a flag
        return []
    current = env.get("XLA_FLAGS", "").split()
    present = {_flag_name(f) for f in current}
    added = [f for f in flags if _flag_name(f) not in present]
    if added:
        env["XLA_FLAGS"] = " ".join([*current, *added])
    return added
