"""scripts/gpu_hlo.py's HLO reading: kernels per step (loop bodies once per iteration) and the
bytes that zero-filling fusions write, on a hand-written module in XLA:GPU's text format.

(Compiling for a GPU needs the CUDA PJRT plugin, which the test environment does not install;
docs/performance.md, "Compiled for an H200", has the numbers the script printed with it.)
"""

# ruff: noqa: E501 - the HLO lines below are kept whole, as XLA prints them.
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_hlo():
    spec = importlib.util.spec_from_file_location("gpu_hlo", ROOT / "scripts" / "gpu_hlo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Two zero-filled f32[1024,1024,64] buffers (256 MiB each) from one multi-output fusion, a loop
# of 12 iterations holding a fusion and a cuBLAS GEMM, one cuDNN call and one copy outside it.
HLO = """HloModule jit_step, is_scheduled=true

%fused_fill () -> (f32[1024,1024,64], f32[1024,1024,64]) {
  %constant_1 = f32[] constant(0)
  %broadcast.1 = f32[1024,1024,64]{2,1,0} broadcast(%constant_1), dimensions={}
  %copy.1 = f32[1024,1024,64]{2,1,0} copy(%broadcast.1)
  ROOT %tuple.1 = (f32[1024,1024,64]{2,1,0}, f32[1024,1024,64]{2,1,0}) tuple(%broadcast.1, %copy.1)
}

%fused_add (p0: bf16[4,8]) -> bf16[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  ROOT %add.1 = bf16[4,8]{1,0} add(%p0, %p0)
}

%body (arg: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %arg = (s32[], bf16[4,8]{1,0}) parameter(0)
  %gte = bf16[4,8]{1,0} get-tuple-element(%arg), index=1
  %loop_add_fusion = bf16[4,8]{1,0} fusion(%gte), kind=kLoop, calls=%fused_add
  %gemm = (bf16[4,8]{1,0}, s8[0]{0}) custom-call(%loop_add_fusion, %gte), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%gte, %gte)
}

%cond (arg: (s32[], bf16[4,8])) -> pred[] {
  %arg = (s32[], bf16[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {
  %a = bf16[4,8]{1,0} parameter(0)
  %loop_broadcast_fusion = (f32[1024,1024,64]{2,1,0}, f32[1024,1024,64]{2,1,0}) fusion(), kind=kLoop, calls=%fused_fill
  %init = (s32[], bf16[4,8]{1,0}) tuple(%a, %a)
  %while.1 = (s32[], bf16[4,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %fmha = (bf16[4,8]{1,0}, u8[0]{0}) custom-call(%a, %a, %a), custom_call_target="__cudnn$fmhaSoftmax"
  %copy.2 = bf16[4,8]{1,0} copy(%a)
  ROOT %out = bf16[4,8]{1,0} get-tuple-element(%while.1), index=1
}
"""


def test_kernels_count_loop_bodies_per_iteration(gpu_hlo):
    report = gpu_hlo.analyse(HLO)
    assert report["kernels_per_step"] == {"fusion": 1 + 12, "gemm": 12, "cudnn": 1,
                                          "other_custom_call": 0, "copy": 1, "collective": 0}
    assert report["while_loops"] == 1
    assert report["zero_fill_gib_per_step"] == 0.5  # 2 x 1024*1024*64 float32
    est = report["estimate_ms"]
    fill_s = 2 * 2**28 / (gpu_hlo.HBM_TB_PER_S * 1e12)  # the fill fusion writes 512 MiB
    gemm_s = 12 * 2.0 * 32 * 8 / (gpu_hlo.GEMM_TFLOPS * 1e12)  # [4,8] out, K = 8, 12 times
    assert est["gemm"] == round(gemm_s * 1e3, 2)
    assert est["fusion"] == pytest.approx(fill_s * 1e3, abs=0.01)
    assert est["launch"] == round(27 * gpu_hlo.KERNEL_US * 1e-3, 2)  # 13 + 12 + 1 + 1 kernels
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"), abs=0.1)


def test_fusion_bytes_count_slices_not_whole_stacks(gpu_hlo):
    """A fusion that dynamic-slices one layer out of a stacked [12, ...] operand reads the slice;
    one that dynamic-update-slices a layer into it writes the update, in place."""
    mib = 2**20
    reads_a_layer = [
        "%param_0.1 = bf16[12,1024,1024]{2,1,0} parameter(0)",
        "%param_1.1 = f32[1024]{0} parameter(1)",
        "%c = s32[] constant(3)",
        "%ds = bf16[1,1024,1024]{2,1,0} dynamic-slice(%param_0.1, %c, %c, %c), "
        "dynamic_slice_sizes={1,1024,1024}",
        "ROOT %b = bf16[1024,1024]{1,0} bitcast(%ds)",
    ]
    assert gpu_hlo._fusion_bytes(reads_a_layer, [24 * mib, 4096], "bf16[1024,1024]") == (
        2 * mib + 4096 + 2 * mib)
    writes_a_layer = [
        "%param_0.2 = bf16[12,1024,1024]{2,1,0} parameter(0)",
        "%param_1.2 = bf16[1,1024,1024]{2,1,0} parameter(1)",
        "%c = s32[] constant(3)",
        "ROOT %dus = bf16[12,1024,1024]{2,1,0} dynamic-update-slice(%param_0.2, %param_1.2, %c, "
        "%c, %c)",
    ]
    assert gpu_hlo._fusion_bytes(writes_a_layer, [24 * mib, 2 * mib], "bf16[12,1024,1024]") == (
        2 * mib + 2 * mib)
    plain = ["%param_0.3 = f32[256]{0} parameter(0)", "ROOT %n = f32[256]{0} negate(%param_0.3)"]
    assert gpu_hlo._fusion_bytes(plain, [1024], "f32[256]") == 2048


def test_a_fusion_that_computes_is_not_a_fill(gpu_hlo):
    computing = HLO.replace("%copy.1 = f32[1024,1024,64]{2,1,0} copy(%broadcast.1)",
                            "%copy.1 = f32[1024,1024,64]{2,1,0} exponential(%broadcast.1)")
    assert gpu_hlo.analyse(computing)["zero_fill_gib_per_step"] == 0.0


def test_target_config_names_an_sm90_device():
    text = (ROOT / "scripts" / "h200_target.txtpb").read_text()
    assert "core_count: 132" in text and "major: 9" in text and 'platform_name: "CUDA"' in text


def test_a_missing_cuda_plugin_is_named_with_the_install_line(gpu_hlo, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jax_plugins.xla_cuda12", None)  # import -> ImportError
    with pytest.raises(RuntimeError, match=r"CUDA PJRT plugin.*pip install --target .*"
                                           r"jax-cuda12-plugin==.*jax-cuda12-pjrt=="):
        gpu_hlo.gpu_topology(str(ROOT / "scripts" / "h200_target.txtpb"))


def test_batch_minor_arrays_counts_transposed_activations(gpu_hlo):
    """Top-level results of rank >= 3 whose most minor physical dimension is the batch are
    counted (tuple elements too); row-major ones, rank-2 ones and fusion bodies are not."""
    hlo = """HloModule m, is_scheduled=true

%fused (p: bf16[80,512,256]) -> bf16[80,512,256] {
  %p = bf16[80,512,256]{2,1,0} parameter(0)
  ROOT %n = bf16[80,512,256]{2,1,0} negate(%p)
}

ENTRY %main (a: bf16[256,80,512]) -> bf16[256,80,512] {
  %a = bf16[256,80,512]{2,1,0} parameter(0)
  %t = bf16[80,512,256]{2,1,0} transpose(%a), dimensions={1,2,0}
  %f = bf16[80,512,256]{2,1,0} fusion(%t), kind=kLoop, calls=%fused
  %m = (f32[80,512,256]{2,1,0}, f32[80,256]{1,0}) fusion(%f), kind=kInput, calls=%fused
  %r = bf16[256,80,512]{0,2,1} copy(%a)
  ROOT %o = bf16[256,80,512]{2,1,0} negate(%a)
}
"""
    got = gpu_hlo.batch_minor_arrays(hlo, 256)
    # %t, %f, the tuple's f32[80,512,256], and %r (dimension 0, the batch, is minor there).
    assert got["count"] == 4
    assert got["top"]["bf16[80,512,256]{2,1,0}"] == 2
    assert gpu_hlo.batch_minor_arrays(hlo, 512)["count"] == 2  # the row-major [256,80,512]s


def test_transposed_pairs_finds_a_stream_stored_both_ways(gpu_hlo):
    """[B, T, D] and [B, D, T] at the top level (by physical order: a {1,2,0} layout of
    [B, T, D] is [B, D, T] in memory) form a pair; fusion bodies, unit dimensions, other leading
    dimensions and unpaired shapes do not."""
    hlo = """HloModule m, is_scheduled=true

%fused (p: bf16[256,768,64]) -> bf16[256,768,64] {
  %p = bf16[256,768,64]{2,1,0} parameter(0)
  ROOT %n = bf16[256,768,64]{2,1,0} negate(%p)
}

ENTRY %main (a: bf16[256,64,768]) -> bf16[256,64,768] {
  %a = bf16[256,64,768]{2,1,0} parameter(0)
  %t = bf16[256,768,64]{2,1,0} transpose(%a), dimensions={0,2,1}
  %c = bf16[256,64,768]{1,2,0} copy(%a)
  %u = (f32[256,1,64]{2,1,0}, f32[256,64,1]{2,1,0}) fusion(%a), kind=kInput, calls=%fused
  %o = bf16[64,768,256]{2,1,0} transpose(%a), dimensions={1,2,0}
  %q = bf16[256,196,768]{2,1,0} negate(%a)
  ROOT %r = bf16[256,64,768]{2,1,0} negate(%a)
}
"""
    # Row-major [256,64,768]: %a, %r; stored [256,768,64]: %t and %c (its layout). The unit
    # dimension pair, the [64,768,256] transpose and the lone [256,196,768] are not pairs.
    assert gpu_hlo.transposed_pairs(hlo, 256) == {"[256,64,768] / [256,768,64]": [2, 2]}
    assert gpu_hlo.transposed_pairs(hlo, 64) == {}
