"""The benchmark's measurement: timed train steps and the JSON report (docs/performance.md)."""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax.perf import flops as flops_lib
from mmjax.perf import step as step_lib
from mmjax.perf import trace as trace_lib
from mmjax.trainer.loop import NonFiniteLossError

# Dense bf16 peak of one H100/H200 SXM (vendor datasheet), the MFU denominator by default.
HOPPER_PEAK_TFLOPS = 989.0
_PEAKS = {"H100": HOPPER_PEAK_TFLOPS, "H200": HOPPER_PEAK_TFLOPS}


def _peak_memory_gib() -> float | None:
    """Largest peak allocation over local devices, where the backend reports one (GPU/TPU)."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return round(max(peaks) / 2**30, 3) if peaks else None


def _sig(x: float | None, digits: int = 5) -> float | None:
    """``x`` to ``digits`` significant figures: tiny CPU counts must not round to 0."""
    return None if x is None else float(f"{x:.{digits}g}")


def _peak_tflops(device_kind: str, override: float) -> float | None:
    if override > 0:
        return override
    return next((v for k, v in _PEAKS.items() if k in device_kind), None)


def run_benchmark(
    config: ml_collections.ConfigDict,
    *,
    config_name: str = "",
    steps: int = 20,
    warmup: int = 3,
    batch_size: int = 0,
    peak_tflops: float = 0.0,
    profile_steps: int = 0,
    profile_top: int = 15,
    xla_flags_added: list[str] | None = None,
) -> dict[str, Any]:
    """Times ``steps`` train steps after ``warmup`` ones; returns the report as a dict.

    The step, state and batch are :func:`build_step`'s (pmapped over the local devices with the
    state donated, or jitted over the mesh, as ``config.parallel`` says). Each timed step is
    synchronised with ``jax.block_until_ready``; ``step_ms_median`` is their median and
    ``samples_per_s`` the batch over it.
    ``step_ms_pipelined`` times the same number of steps dispatched back to back with one sync at
    the end (as training runs), so the difference is the host's per-step dispatch gap;
    ``dispatch_ms_median`` is how long the host spends in the step call before it returns.

    ``profile_steps`` > 0 then traces that many more synced steps of the same compiled step
    (:func:`mmjax.perf.trace.trace_steps`, after the timing, so the numbers above are untouched)
    and adds ``profile``: device ms per step, per category, kernels per step and the
    ``profile_top`` heaviest kernels, from the one compiled step.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps={steps} and --warmup={warmup} must both be at least 1")
    setup = step_lib.build_step(config, batch_size)
    par, train_fn, rstate, batch = setup.par, setup.train_fn, setup.state, setup.batch
    batch_size, device_batch = setup.batch_size, setup.device_batch
    n_params, n_leaves, n_dev = setup.n_params, setup.n_leaves, jax.device_count()

    t0 = time.perf_counter()
    rstate, metrics = jax.block_until_ready(train_fn(rstate, batch))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        rstate, metrics = jax.block_until_ready(train_fn(rstate, batch))

    times, dispatch = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = train_fn(rstate, batch)
        dispatch.append(time.perf_counter() - t0)  # host time until the call returns
        rstate, metrics = jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(steps):
        rstate, metrics = train_fn(rstate, batch)
    jax.block_until_ready((rstate, metrics))
    pipelined_s = (time.perf_counter() - t0) / steps

    loss = float(par.fetch(metrics)["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"non-finite loss ({loss}) in the benchmark's last step")
    profile = None
    if profile_steps > 0:
        summary, trace, rstate = trace_lib.trace_steps(train_fn, rstate, batch, profile_steps)
        profile = {
            "steps": profile_steps,
            "trace": str(trace),
            **{k: summary[k] for k in ("device_tracks", "device_ms_per_step",
                                       "categories_ms_per_step", "kernels_per_step")},
            "top": [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                    for row in summary["ops"][:profile_top]],
        }

    step_s = statistics.median(times)
    try:
        # Contrastive logits span the local batch under pmap, the global one under the mesh.
        logits_batch = device_batch if par.mode == "pmap" else batch_size
        count = flops_lib.model_flops(config, device_batch=logits_batch)
        tflops_per_step = count["train"] * batch_size / 1e12
    except NotImplementedError:  # e.g. a ResNet tower: no analytic count yet
        count, tflops_per_step = None, None
    device = jax.local_devices()[0]
    peak = _peak_tflops(device.device_kind, peak_tflops)
    achieved = tflops_per_step / step_s if tflops_per_step is not None else None
    return {
        "config": config_name,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": n_dev,
        "parallel": par.mode,
        "batch_size": batch_size,
        "per_device_batch": device_batch,
        "steps": steps,
        "step_ms_median": round(step_s * 1e3, 3),
        "step_ms_min": round(min(times) * 1e3, 3),
        "step_ms_max": round(max(times) * 1e3, 3),
        "step_ms_pipelined": round(pipelined_s * 1e3, 3),
        "dispatch_ms_median": round(float(np.median(dispatch)) * 1e3, 3),
        "samples_per_s": round(batch_size / step_s, 2),
        "tflops_per_step": _sig(tflops_per_step),
        "gflops_per_sample": None if count is None else _sig(count["train"] / 1e9),
        "tflops_per_s": _sig(achieved),
        "mfu": None if achieved is None or peak is None else round(achieved / (peak * n_dev), 4),
        "peak_tflops_per_device": peak,
        "peak_memory_gib": _peak_memory_gib(),
        "compile_s": round(compile_s, 2),
        "params": int(n_params),
        "state_leaves": n_leaves,
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "scan_unroll": int(config.model.get("scan_unroll", 0)),
        "gpu_rewrites": bool(config.model.get("gpu_rewrites", False)),
        "loss": loss,
        "dtype": config.model.dtype,
        "attention": step_lib.attention_backends(config),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_flags_added": list(xla_flags_added or []),
        "jax": jax.__version__,
        **({"profile": profile} if profile is not None else {}),
    }
