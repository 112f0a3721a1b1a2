"""Compiles a config's train step for an H100/H200 without a GPU and reports what XLA built.

    pip install --target /tmp/gpusite jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<same> \
        nvidia-cudnn-cu12
    PYTHONPATH=/tmp/gpusite:$PWD JAX_PLATFORMS=cpu python scripts/gpu_hlo.py \
        --config configs/clip_vitb16.py [--batch_size B] [--config.model.scan_layers=True] ...

XLA can compile for a GPU it does not have: the CUDA PJRT plugin builds a "topology" from a
target description (``scripts/h200_target.txtpb``: the device facts XLA's cost models and
fusion passes read) and ``jax.jit(...).trace(...).lower(lowering_platforms=("cuda",))`` then
``.compile()`` runs XLA's whole GPU pipeline (fusion, layout, cuBLAS/cuDNN rewrites, scheduling,
buffer assignment) on this CPU. There is no autotuning (no device to time kernels on), so
GEMM algorithm choices can differ from a real run; the graph-level decisions do not depend on it.

What it prints, one JSON line: the step's kernels (fusions, cuBLAS GEMMs, cuDNN calls and the
rest, with those inside a ``while`` loop counted once per iteration), the bytes that
zero-filling fusions write (a broadcast of a constant into a buffer: what a scan's gradient
does to its stacked activation buffers), a first-order time estimate (:func:`analyse`), XLA's
temp/argument buffer sizes (temp + argument ≈ the run's peak memory: 24.4 GiB for the unrolled
CLIP at batch 256, where an H200 run measured 24.2), two layout checks (the arrays laid out
batch-minor, :func:`batch_minor_arrays`; activations stored both ways round,
:func:`transposed_pairs`) and the compile time. It is a static view: a profile on the GPU
gives the real times.

The state is built abstractly (``jax.eval_shape``), so a ViT-B/16 model costs no memory here;
the step is the trainer's own ``train_step`` under the mesh path (plain ``jax.jit``, state
donated). ``attn_implementation="auto"`` is resolved as on a GPU (cuDNN where the dtype and
shapes allow: ``layers.resolve_attention`` with ``backend="gpu"``), not as on this CPU host.
"""

# XLA_FLAGS must be set before JAX is imported, hence the imports after the flag line.
from __future__ import annotations

from mmjax.runtime import xla_flags

if __name__ == "__main__":  # the flags the benchmark runs with; importing changes nothing
    xla_flags.apply_default_flags()

import functools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import flags
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from mmjax.models import layers
from mmjax.models.multimodal import build_model
from mmjax.perf.step import synthetic_batch
from mmjax.runtime import cli
from mmjax.trainer import create_state, tasks_from_config, train_step

# --batch_size and --config are mmjax.benchmark's flags (0 = the config's batch size); this
# script's own are defined only when it runs, so tests can import analyse() alone.
if __name__ == "__main__":
    flags.DEFINE_string("target", str(Path(__file__).with_name("h200_target.txtpb")),
                        "XLA GpuTargetConfig (text proto) of the device to compile for")
    flags.DEFINE_string("hlo_out", "", "also write the optimised HLO text here")
cli.define_config_flag()
FLAGS = flags.FLAGS

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
# One instruction line: (name, result type, opcode).
_INSTR = re.compile(r"(?:ROOT )?%(\S+) = (.+?) (\w[\w\-]*)\(")


def _nbytes(type_str: str) -> int:
    """Bytes of an HLO result type (a tuple counts all its arrays)."""
    return sum(_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
               for dt, dims in _SHAPE.findall(type_str))


def _computations(hlo: str) -> dict[str, list[str]]:
    """``{computation name: its instruction lines}`` of an HLO module's text."""
    out: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            name = "ENTRY" if line.startswith("ENTRY") else head.group(1)
            out[name] = []
        elif name is not None and line.startswith("  "):
            out[name].append(line.strip())
    return out


def _trip_counts(comps: dict[str, list[str]]) -> dict[str, int]:
    """How many times each while body runs per step (nested loops multiply)."""
    runs = {"ENTRY": 1}
    pending = ["ENTRY"]
    while pending:
        comp = pending.pop()
        for line in comps.get(comp, []):
            m = re.search(r"while\(.*body=%?([\w.\-]+)", line)
            if not m:
                continue
            n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            runs[m.group(1)] = runs[comp] * (int(n.group(1)) if n else 1)
            pending.append(m.group(1))
    return runs


# The static time estimate's rates (H200, bf16): what cuBLAS reaches on these mid-size GEMMs
# (below the 787 TFLOP/s of the 8192³ matmul ceiling), cuDNN flash attention at 196 tokens, HBM
# bandwidth as fusions see it, and a launch-and-tail cost per kernel. A first-order model to
# compare variants of one config; its absolute value is ~15 % under a real step
# (docs/performance.md).
GEMM_TFLOPS = 650.0
ATTENTION_TFLOPS = 400.0
HBM_TB_PER_S = 3.6
KERNEL_US = 2.0


def _shape(type_str: str) -> list[int]:
    """Dims of the first array in an HLO type."""
    found = _SHAPE.search(type_str)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def _fusion_bytes(body: list[str], operand_bytes: list[int], out_type: str) -> int:
    """HBM bytes a fusion moves: its operands and results, except that an operand it only
    dynamic-slices is read for the slice alone, and a buffer it dynamic-update-slices in place
    is neither read nor rewritten beyond the update (a scan's stacked params and activations)."""
    local: dict[str, str] = {}
    params: dict[str, int] = {}
    for ln in body:
        m = _INSTR.match(ln)
        if not m:
            continue
        local[m.group(1)] = m.group(2)
        if m.group(3) == "parameter":
            params[m.group(1)] = int(re.search(r"parameter\((\d+)\)", ln).group(1))
    read = list(operand_bytes)
    written = _nbytes(out_type)
    for ln in body:
        m = re.match(r"(?:ROOT )?%\S+ = (.+?) (dynamic-slice|dynamic-update-slice)"
                     r"\(%([\w.\-]+)(?:, %([\w.\-]+))?", ln)
        if not m or m.group(3) not in params or params[m.group(3)] >= len(read):
            continue
        i = params[m.group(3)]
        if m.group(2) == "dynamic-slice":
            read[i] = min(read[i], _nbytes(m.group(1)))
        else:  # in place: the untouched part of the buffer costs nothing
            update = _nbytes(local.get(m.group(4) or "", ""))
            read[i] = 0
            written -= _nbytes(m.group(1)) - update
    return sum(read) + max(written, 0)


def _kernel(line: str, type_str: str, op: str, types: dict[str, str],
            comps: dict[str, list[str]], fills: set[str]) -> tuple[str, float, int] | None:
    """(kind, estimated seconds, zero-fill bytes) of one instruction; None if no kernel."""
    operands = re.findall(r"%([\w.\-]+)", line.split(f" {op}(", 1)[1].split(")", 1)[0])
    sizes = [_nbytes(types.get(o, "")) for o in operands]
    traffic = sum(sizes)
    if op == "fusion":
        callee = re.search(r"calls=%?([\w.\-]+)", line)
        name = callee.group(1) if callee else ""
        moved = _fusion_bytes(comps.get(name, []), sizes, type_str)
        fill = _nbytes(type_str) if name in fills else 0
        return "fusion", moved / (HBM_TB_PER_S * 1e12), fill
    if op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', line)
        t = (target.group(1) if target else "").lower()
        if "gemm" in t or "cublas" in t or "matmul" in t:
            contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
            lhs = _shape(types.get(operands[0], "")) if operands else []
            dims = [int(d) for d in (contracting.group(1) if contracting else "").replace(
                '"', "").split(",") if d]
            k = int(np.prod([lhs[d] for d in dims if d < len(lhs)] or [1]))
            flops = 2.0 * float(np.prod(_shape(type_str) or [0])) * k
            return "gemm", flops / (GEMM_TFLOPS * 1e12), 0
        if "fmha" in t:  # q is [B, T, heads, head_dim]; backward ≈ 2.5x forward
            b, q_len, heads, head_dim = (_shape(types.get(operands[0], "")) + [1] * 4)[:4]
            flops = 4.0 * b * heads * q_len * q_len * head_dim * (2.5 if "backward" in t else 1)
            return "cudnn", flops / (ATTENTION_TFLOPS * 1e12), 0
        kind = "cudnn" if "cudnn" in t else "other_custom_call"
        return kind, (traffic + _nbytes(type_str)) / (HBM_TB_PER_S * 1e12), 0
    if op in ("copy", "copy-start"):
        return "copy", 2 * _nbytes(type_str) / (HBM_TB_PER_S * 1e12), 0
    if op in ("all-reduce", "all-reduce-start", "all-gather", "reduce-scatter"):
        return "collective", 0.0, 0
    return None


def analyse(hlo: str) -> dict[str, Any]:
    """Kernels, zero-fill bytes and a static time estimate of an optimised GPU HLO module.

    Per step: instructions inside a ``while`` body count once per iteration (its known trip
    count). The estimate: GEMMs at :data:`GEMM_TFLOPS` (2·M·N·K), cuDNN attention at
    :data:`ATTENTION_TFLOPS`, fusions and copies at their operand plus result bytes over
    :data:`HBM_TB_PER_S`, plus :data:`KERNEL_US` per kernel.
    """
    comps = _computations(hlo)
    runs = _trip_counts(comps)
    types = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if m:
                types[m.group(1)] = m.group(2)
    fill_ops = ("broadcast(", "constant(", "parameter(", "tuple(", "bitcast(", "copy(")
    fills = {name for name, lines in comps.items()  # fusions that only broadcast a constant
             if lines and all(any(op in ln for op in fill_ops) for ln in lines)}
    kinds = dict.fromkeys(("fusion", "gemm", "cudnn", "other_custom_call", "copy",
                           "collective"), 0)
    seconds = dict.fromkeys(kinds, 0.0)
    fill_bytes = 0
    for comp, n in runs.items():
        for line in comps.get(comp, []):
            m = _INSTR.match(line)
            found = _kernel(line, *m.groups()[1:], types, comps, fills) if m else None
            if found is None:
                continue
            kind, t, fill = found
            kinds[kind] += n
            seconds[kind] += n * t
            fill_bytes += n * fill
    launches = sum(kinds.values()) * KERNEL_US * 1e-6
    estimate = {k: round(v * 1e3, 2) for k, v in seconds.items() if v}
    estimate["launch"] = round(launches * 1e3, 2)
    estimate["total"] = round((sum(seconds.values()) + launches) * 1e3, 1)
    return {"kernels_per_step": kinds,
            "while_loops": sum(1 for c in runs if c != "ENTRY"),
            "zero_fill_gib_per_step": round(fill_bytes / 2**30, 3),
            "estimate_ms": estimate}


_LAYOUT_ARRAY = re.compile(r"(\w+)\[([\d,]+)\]\{([\d,]+)")


def _entry_arrays(hlo: str) -> list[tuple[str, list[int], list[int]]]:
    """(dtype, dims, minor-to-major layout) of every array the step's top level produces
    (tuple elements included; fusion bodies excluded)."""
    out = []
    for line in _computations(hlo).get("ENTRY", []):
        m = _INSTR.match(line)
        if m:
            out.extend((dt, [int(d) for d in dims.split(",")], [int(d) for d in layout.split(",")])
                       for dt, dims, layout in _LAYOUT_ARRAY.findall(m.group(2)))
    return out


def batch_minor_arrays(hlo: str, batch: int) -> dict[str, Any]:
    """Arrays of rank >= 3 that the step's top level lays out with the batch dimension
    minor-most (their most minor physical dimension has size ``batch``).

    A handful are normal (the patch convolution's own input layout). Hundreds mean that XLA laid a
    whole residual stream out batch-minor, so every elementwise op on it transposes: what a batch
    sum of an activation gradient did to the text tower before ``gpu_rewrites.add_positions``
    (docs/performance.md, "The fast path"). Returns the count and the five most frequent shapes.
    """
    shapes: dict[str, int] = {}
    for dt, size, layout in _entry_arrays(hlo):
        if len(size) >= 3 and size[layout[0]] == batch:
            key = f"{dt}[{','.join(map(str, size))}]{{{','.join(map(str, layout))}}}"
            shapes[key] = shapes.get(key, 0) + 1
    top = sorted(shapes.items(), key=lambda kv: -kv[1])[:5]
    return {"count": sum(shapes.values()), "top": dict(top)}


def transposed_pairs(hlo: str, batch: int) -> dict[str, list[int]]:
    """Rank-3 arrays that the step's top level holds both as [batch, x, y] and as [batch, y, x]
    in memory (physical order, major to minor; x, y > 1), with how often each.

    A [B, T, D] stream that XLA stores token-minor ([B, D, T]) next to its row-major GEMM
    inputs and outputs shows up here: the fusion config's co-attention text stream did, as
    ``[256,64,768] / [256,768,64]``, until ``gpu_rewrites.masked_mean`` made it a matmul
    (docs/performance.md, "The fast path"). A healthy step has none; :func:`batch_minor_arrays`
    is the check for a batch-minor stream, which this one does not see.
    """
    shapes: dict[tuple[int, ...], int] = {}
    for _, size, layout in _entry_arrays(hlo):
        if len(size) == 3 and len(layout) == 3:
            physical = tuple(size[d] for d in reversed(layout))  # major to minor
            shapes[physical] = shapes.get(physical, 0) + 1
    return {f"[{b},{x},{y}] / [{b},{y},{x}]": [n, shapes[(b, y, x)]]
            for (b, x, y), n in sorted(shapes.items())
            if b == batch and 1 < x < y and (b, y, x) in shapes}


PLUGIN_HINT = (f"pip install --target /tmp/gpusite jax-cuda12-plugin=={jax.__version__} "
               f"jax-cuda12-pjrt=={jax.__version__} nvidia-cudnn-cu12, then run with "
               "PYTHONPATH=/tmp/gpusite:$PWD JAX_PLATFORMS=cpu")


def gpu_topology(target: str) -> Any:
    """A deviceless one-GPU topology for ``target``; a clear error where the plugin is missing."""
    try:
        import jax_plugins.xla_cuda12  # noqa: F401 - registers the "cuda" platform's plugin
    except ImportError:
        raise RuntimeError("scripts/gpu_hlo.py needs the CUDA PJRT plugin, which is not "
                           f"installed: {PLUGIN_HINT}") from None
    return topologies.get_topology_desc("mmjax_gpu", "cuda", topology="1x1x1",
                                        target_config=Path(target).read_text())


def compile_for_gpu(config: Any, batch_size: int, target: str) -> tuple[Any, float]:
    """The trainer's train step compiled by XLA's GPU pipeline for ``target``; (compiled, s)."""
    topo = gpu_topology(target)
    mesh = topologies.make_mesh(topo, (1,), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    tasks = tasks_from_config(config)
    model = build_model(config.model)
    host_batch = synthetic_batch(config, batch_size, seed=config.seed)
    sample = jax.tree.map(lambda x: x[:2], host_batch)
    holder: dict[str, Any] = {}

    def abstract_state() -> Any:
        state, tx = create_state(model, config, sample)
        holder["tx"] = tx
        return state

    state = jax.eval_shape(abstract_state)
    on_gpu = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
    step = jax.jit(
        functools.partial(train_step, model=model, tx=holder["tx"], tasks=tasks, axis_name=None),
        donate_argnums=(0,),
    )
    # attn_implementation="auto" asks the backend; tracing happens on this CPU host, so answer
    # as a GPU would (cuDNN where dtype and shapes allow, layers.resolve_attention's rule).
    resolve = layers.resolve_attention
    layers.resolve_attention = lambda *args, **kw: resolve(*args, **{**kw, "backend": "gpu"})
    try:
        t0 = time.perf_counter()
        compiled = step.trace(jax.tree.map(on_gpu, state), jax.tree.map(on_gpu, host_batch)).lower(
            lowering_platforms=("cuda",)).compile()
    finally:
        layers.resolve_attention = resolve
    return compiled, time.perf_counter() - t0


def main() -> None:
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/clip_vitb16.py)")
    config = FLAGS.config
    config.unlock()
    batch_size = FLAGS.batch_size or config.batch_size
    compiled, seconds = compile_for_gpu(config, batch_size, FLAGS.target)
    hlo = compiled.as_text()
    if FLAGS.hlo_out:
        Path(FLAGS.hlo_out).write_text(hlo)
    mem = compiled.memory_analysis()
    report = {
        "config": sys.argv[sys.argv.index("--config") + 1] if "--config" in sys.argv else "",
        "overrides": [a for a in sys.argv[1:] if a.startswith("--config.")],
        "batch_size": batch_size,
        "scan_layers": bool(config.model.get("scan_layers", False)),
        "scan_unroll": int(config.model.get("scan_unroll", 0)),  # build_model's default
        "compile_s": round(seconds, 1),
        **analyse(hlo),
        "batch_minor_arrays": batch_minor_arrays(hlo, batch_size),
        "transposed_pairs": transposed_pairs(hlo, batch_size),
        "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2),
        "argument_gib": round(mem.argument_size_in_bytes / 2**30, 2),
        "jax": jax.__version__,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
