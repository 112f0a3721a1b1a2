"""Where a train step's accelerator time goes: a profiler trace of N steps, summed by kernel.

The trace's complete events (``"ph": "X"``) on the device's tracks (a process whose name holds
``GPU``/``TPU``/``device``; on a CPU, where there is none, every track) are summed per name and
per category (:data:`CATEGORIES`: matmul, attention, fusion, copy, collective, other). On a CPU
the tracks are the host's threads, so a summary there only checks that the path runs.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from mmjax.perf.step import build_step

# First match wins; kernel names as cuBLAS/cuDNN/XLA:GPU emit them.
CATEGORIES: tuple[tuple[str, re.Pattern], ...] = (
    ("attention", re.compile(r"fmha|flash|cudnn|attention|sdpa", re.I)),
    ("matmul", re.compile(r"gemm|cublas|nvjet|xmma|matmul|dot|sm\d+_.*tensorop|cutlass", re.I)),
    ("collective", re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter|collective", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|reduce|convert|broadcast|scatter|gather", re.I)),
)
_DEVICE_TRACK = re.compile(r"GPU|TPU|/device:|stream", re.I)


def category(name: str) -> str:
    """The :data:`CATEGORIES` bucket of a kernel or op name ("other" when none matches)."""
    return next((cat for cat, pattern in CATEGORIES if pattern.search(name)), "other")


def find_trace(directory: str | Path) -> Path:
    """The newest ``perfetto_trace.json.gz`` that ``jax.profiler.trace`` wrote below it."""
    found = sorted(Path(directory).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz below {directory}")
    return found[-1]


def load_events(path: str | Path) -> list[dict[str, Any]]:
    """The ``traceEvents`` list of a (gzipped) Chrome/Perfetto JSON trace."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, Mapping) else data


def summarize(events: Iterable[Mapping[str, Any]], steps: int) -> dict[str, Any]:
    """Per-op and per-category accelerator time of ``steps`` steps' worth of trace events.

    Complete events (``ph == "X"``, ``dur`` in µs) on device tracks are kept; if the trace has no
    device track (a CPU), all complete events are. Nested events on one track (a host op and the
    ops inside it) would be counted twice, which is why device tracks, whose kernels do not
    nest, are what the numbers mean.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    events = list(events)
    names: dict[tuple[Any, Any], str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            key = (e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None)
            names[key] = str(e.get("args", {}).get("name", ""))
    device_pids = {pid for (pid, tid), n in names.items()
                   if tid is None and _DEVICE_TRACK.search(n)}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    on_device = [e for e in complete if e.get("pid") in device_pids] or complete
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in on_device:
        slot = per_op[str(e.get("name", "?"))]
        slot[0] += float(e["dur"]) / 1e3
        slot[1] += 1
    total = sum(ms for ms, _ in per_op.values())
    ops: list[dict[str, Any]] = sorted(
        ({"name": n, "category": category(n), "ms_per_step": ms / steps,
          "share": ms / total if total else 0.0, "calls_per_step": calls / steps}
         for n, (ms, calls) in per_op.items()),
        key=lambda r: -r["ms_per_step"],
    )
    cats: dict[str, float] = collections.defaultdict(float)
    for r in ops:
        cats[r["category"]] += r["ms_per_step"]
    return {
        "device_tracks": bool(device_pids),
        "device_ms_per_step": total / steps,
        "categories_ms_per_step": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "kernels_per_step": sum(r["calls_per_step"] for r in ops),
        "ops": ops,
    }


def trace_steps(fn: Any, state: Any, batch: Any, steps: int,
                out: str = "") -> tuple[dict[str, Any], Path, Any]:
    """Runs ``steps`` synced calls ``state, _ = fn(state, batch)`` under ``jax.profiler.trace``.

    ``fn`` must already be compiled (warm), or the compilation lands in the trace. Returns the
    :func:`summarize` of the trace, the trace's path (below ``out``, or a temporary directory)
    and the last state (``fn`` may donate its input).
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    out_dir = Path(out or tempfile.mkdtemp(prefix="mmjax_profile_"))
    with jax.profiler.trace(str(out_dir), create_perfetto_trace=True):
        for _ in range(steps):
            state, _ = jax.block_until_ready(fn(state, batch))
    trace = find_trace(out_dir)
    return summarize(load_events(trace), steps), trace, state


def profile(config: ml_collections.ConfigDict, *, steps: int = 5, warmup: int = 3,
            batch_size: int = 0, out: str = "") -> tuple[dict[str, Any], Path]:
    """Traces ``steps`` synced train steps after ``warmup``; returns the summary and trace path."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps={steps} and --warmup={warmup} must both be at least 1")
    setup = build_step(config, batch_size)
    state, fn, batch = setup.state, setup.train_fn, setup.batch
    for _ in range(warmup):
        state, _ = jax.block_until_ready(fn(state, batch))
    summary, trace, _ = trace_steps(fn, state, batch, steps, out)
    summary["batch_size"] = setup.batch_size
    summary["state_leaves"] = setup.n_leaves
    return summary, trace
