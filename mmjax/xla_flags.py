"""XLA flags that mmjax sets for speed, unless the user already chose a value.

XLA reads ``XLA_FLAGS`` once, when the first backend starts, so :func:`apply_default_flags` must
run before any JAX computation (safest: before ``import jax``); this module itself imports no JAX
for that reason. A flag the user already names in ``XLA_FLAGS`` is left as the user set it, so
any default here can be switched off from the command line
(``XLA_FLAGS=--xla_gpu_enable_triton_gemm=true python -m mmjax.benchmark ...``), and
``MMJAX_NO_XLA_FLAGS=1`` adds none of them (for an XLA build that no longer knows one: XLA
aborts on unknown flags).

The flags, and why (docs/performance.md records what each was predicted and measured to give):

* ``--xla_gpu_enable_latency_hiding_scheduler=true``: schedules the data-parallel gradient
  all-reduce (``lax.pmean``) asynchronously so it overlaps the rest of the backward pass; the
  setting NVIDIA's JAX containers ship. It matters with two or more GPUs; on one GPU there is
  no collective and it should change nothing.
* ``--xla_gpu_enable_triton_gemm=false``: sends every matmul to cuBLAS instead of XLA's Triton
  GEMM emitter (also a JAX-Toolbox default). The transformer matmuls here are large, regular
  bf16 shapes that cuBLAS's Hopper kernels serve well, and cuBLAS avoids autotuning Triton
  configurations at compile time.
* ``--xla_gpu_dot_merger_threshold_mb=0``: XLA otherwise merges matmuls that share an operand
  when they are small (under 32 MB), e.g. a text tower's query/key/value projections. Compiled
  for an H200 the merge costs more than it saves: the three weights are concatenated every
  step, the merged output is split again into three bias-add kernels (the bias no longer goes
  into the cuBLAS epilogue), and the gradients are concatenated for the merged backward matmul.
  Unmerged, the CLIP step's estimate drops 71.9 -> 70.4 ms and the fusion config's 98.8 -> 96.6
  (docs/performance.md §12; the device A/B is ``gpu_bench.sh``'s ``merge`` part).

The GPU flags are accepted, and ignored, by the CPU backend, so setting them is harmless there.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping, Sequence

DEFAULT_FLAGS: tuple[str, ...] = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_dot_merger_threshold_mb=0",
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
