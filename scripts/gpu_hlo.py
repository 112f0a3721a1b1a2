"""Compiles a config's train step for an H100/H200 without a GPU and reports what XLA built.

    pip install --target /tmp/gpusite jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<same>
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
does to its stacked activation buffers), XLA's temp/argument/output buffer sizes (the temp size
is a lower bound on the run's peak memory; an H200 run measured 24.2 GiB for CLIP at batch 256),
and the compile time. It is a static view: the device session's profile gives the times.

The state is built abstractly (``jax.eval_shape``), so a ViT-B/16 model costs no memory here;
the step is the trainer's own ``train_step`` under the mesh path (plain ``jax.jit``, state
donated). ``attn_implementation="auto"`` resolves to XLA on a CPU host, so it is compiled as
``cudnn`` here, what an H200 run resolves it to for these shapes.
"""

# XLA_FLAGS must be set before JAX is imported, hence the imports after the flag line.
from __future__ import annotations

from mmjax import xla_flags

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

from mmjax import cli
from mmjax.benchmark import synthetic_batch
from mmjax.models.multimodal import build_model
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


def analyse(hlo: str) -> dict[str, Any]:
    """Kernel counts and zero-fill bytes of an optimised GPU HLO module (per step)."""
    comps = _computations(hlo)
    runs = _trip_counts(comps)
    kinds: dict[str, float] = {"fusion": 0, "gemm": 0, "cudnn": 0, "other_custom_call": 0,
                               "copy": 0, "collective": 0}
    fill_bytes = 0
    fill_ops = ("broadcast(", "constant(", "parameter(", "tuple(", "bitcast(", "copy(")
    fused = {name for name, lines in comps.items()  # fusions that only broadcast a constant
             if lines and all(any(op in ln for op in fill_ops) for ln in lines)}
    for comp, n in runs.items():
        for line in comps.get(comp, []):
            m = re.match(r"(?:ROOT )?%\S+ = (.+?) (\w[\w\-]*)\(", line)
            if not m:
                continue
            type_str, op = m.groups()
            if op == "fusion":
                kinds["fusion"] += n
                callee = re.search(r"calls=%?([\w.\-]+)", line)
                if callee and callee.group(1) in fused:
                    fill_bytes += n * _nbytes(type_str)
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                t = target.group(1) if target else ""
                key = ("gemm" if "gemm" in t.lower() or "cublas" in t.lower() else
                       "cudnn" if "cudnn" in t.lower() else "other_custom_call")
                kinds[key] += n
            elif op in ("copy", "copy-start"):
                kinds["copy"] += n
            elif op in ("all-reduce", "all-reduce-start", "all-gather", "reduce-scatter"):
                kinds["collective"] += n
    return {"kernels_per_step": {k: int(v) for k, v in kinds.items()},
            "while_loops": sum(1 for c in runs if c != "ENTRY"),
            "zero_fill_gib_per_step": round(fill_bytes / 2**30, 3)}


def compile_for_gpu(config: Any, batch_size: int, target: str) -> tuple[Any, float]:
    """The trainer's train step compiled by XLA's GPU pipeline for ``target``; (compiled, s)."""
    if config.model.get("attn_implementation", "") == "auto":
        config.model.attn_implementation = "cudnn"
    topo = topologies.get_topology_desc("mmjax_gpu", "cuda", topology="1x1x1",
                                        target_config=Path(target).read_text())
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
    t0 = time.perf_counter()
    compiled = step.trace(jax.tree.map(on_gpu, state), jax.tree.map(on_gpu, host_batch)).lower(
        lowering_platforms=("cuda",)).compile()
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
        "scan_unroll": int(config.model.get("scan_unroll", 1)),
        "compile_s": round(seconds, 1),
        **analyse(hlo),
        "temp_gib": round(mem.temp_size_in_bytes / 2**30, 2),
        "argument_gib": round(mem.argument_size_in_bytes / 2**30, 2),
        "jax": jax.__version__,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
