"""mmjax.profile_step (mmjax.perf.trace): the trace summary adds up what the trace holds, on the
right tracks; the CLI prints it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.perf import trace

ROOT = Path(__file__).resolve().parents[1]


def _meta(pid, name, tid=None):
    kind = "thread_name" if tid is not None else "process_name"
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def test_summary_sums_device_kernels_per_step():
    rng = np.random.default_rng(0)
    gemm, fusion, fmha = (rng.uniform(50, 500, size=4) for _ in range(3))  # µs, 4 calls each
    events = [_meta(1, "/device:GPU:0"), _meta(1, "stream 7", tid=7), _meta(2, "/host:CPU")]
    for i in range(4):
        events += [
            {"ph": "X", "pid": 1, "tid": 7, "name": "sm90_xmma_gemm_bf16", "dur": gemm[i]},
            {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "dur": fusion[i]},
            {"ph": "X", "pid": 1, "tid": 7, "name": "cudnn_fmha_fwd", "dur": fmha[i]},
            # Host events are not device time, and would double count nested host ops.
            {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "dur": 1e6},
            {"ph": "i", "pid": 1, "tid": 7, "name": "marker"},
        ]
    s = trace.summarize(events, steps=2)
    assert s["device_tracks"] is True
    total = (gemm.sum() + fusion.sum() + fmha.sum()) / 1e3
    assert s["device_ms_per_step"] == pytest.approx(total / 2)
    by_name = {r["name"]: r for r in s["ops"]}
    assert set(by_name) == {"sm90_xmma_gemm_bf16", "loop_add_fusion", "cudnn_fmha_fwd"}
    row = by_name["sm90_xmma_gemm_bf16"]
    assert row["ms_per_step"] == pytest.approx(gemm.sum() / 1e3 / 2)
    assert row["calls_per_step"] == 2 and row["share"] == pytest.approx(gemm.sum() / 1e3 / total)
    assert s["categories_ms_per_step"] == pytest.approx(
        {"matmul": gemm.sum() / 2e3, "fusion": fusion.sum() / 2e3, "attention": fmha.sum() / 2e3})
    assert [r["ms_per_step"] for r in s["ops"]] == sorted(
        (r["ms_per_step"] for r in s["ops"]), reverse=True)
    assert s["kernels_per_step"] == 6
    with pytest.raises(ValueError, match="steps=0"):
        trace.summarize(events, steps=0)


@pytest.mark.parametrize(("name", "cat"), [
    ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNN", "matmul"),
    ("cutlass_80_tensorop_bf16_s16816gemm", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90", "attention"),
    ("input_reduce_fusion_3", "fusion"),
    ("ncclDevKernel_AllReduce_Sum_f32", "collective"),
    ("Memcpy HtoD", "copy"),
    ("something_else", "other"),
])
def test_categories(name, cat):
    assert trace.category(name) == cat


def test_a_real_cpu_trace_is_found_and_read(tmp_path):
    """jax.profiler's own Perfetto file: found below the directory, parsed, host tracks only."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 64)), jnp.float32)
    f = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(x).block_until_ready()
    found = trace.find_trace(tmp_path)
    s = trace.summarize(trace.load_events(found), steps=3)
    assert s["device_tracks"] is False and s["device_ms_per_step"] > 0 and s["ops"]
    with pytest.raises(FileNotFoundError, match="perfetto_trace"):
        trace.find_trace(tmp_path / "empty")


@pytest.mark.slow
def test_cli_prints_ops_then_the_summary(tmp_path):
    """``python -m mmjax.profile_step``: one JSON line per op (heaviest first), then the summary;
    the trace stays in --out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "mmjax.profile_step", "--config", "configs/clip_vitb16.py:tiny",
         "--steps", "2", "--warmup", "1", "--batch_size", "4", "--top", "5",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    *ops, summary = [json.loads(line) for line in result.stdout.splitlines()
                     if line.startswith("{")]
    assert summary["summary"] is True and summary["batch_size"] == 4
    assert summary["device_ms_per_step"] > 0 and summary["state_leaves"] > 0
    assert 0 < len(ops) <= 5
    assert [r["ms_per_step"] for r in ops] == sorted((r["ms_per_step"] for r in ops),
                                                     reverse=True)
    assert sum(summary["categories_ms_per_step"].values()) == pytest.approx(
        summary["device_ms_per_step"], rel=1e-6)
    assert Path(summary["trace"]).is_file() and tmp_path in Path(summary["trace"]).parents
