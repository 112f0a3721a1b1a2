"""Times train steps on synthetic data and prints one JSON line.

    python -m mmjax.benchmark --config configs/X.py[:arg] [--steps N] [--batch_size B]

The line holds config, devices, batch_size, step_ms_median, samples_per_s, tflops_per_step, mfu,
peak memory and more (docs/performance.md lists them). The step is the trainer's own
``train_step``, compiled by the same ``parallel`` strategy, on one synthetic batch that stays on
the devices, so the number is the model's and the step's speed with no input pipeline in it.
XLA flags from :mod:`mmjax.xla_flags` are added before JAX starts, unless the user set them.
"""

# ruff: noqa: E402 - XLA_FLAGS must be set before JAX is imported, hence the late imports.
from __future__ import annotations

from mmjax import xla_flags

# Only the CLI touches the environment; importing this module as a library changes nothing.
ADDED_XLA_FLAGS: list[str] = xla_flags.apply_default_flags() if __name__ == "__main__" else []

import dataclasses
import functools
import json
import math
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from mmjax import cli, parallel
from mmjax import flops as flops_lib
from mmjax.models import layers
from mmjax.models.multimodal import MODEL_OPTIONS, build_model, get_dtype
from mmjax.trainer import NonFiniteLossError, create_state, tasks_from_config, train_step

# Dense bf16 peak of one H100/H200 SXM (vendor datasheet), the MFU denominator by default.
HOPPER_PEAK_TFLOPS = 989.0
_PEAKS = {"H100": HOPPER_PEAK_TFLOPS, "H200": HOPPER_PEAK_TFLOPS}

flags.DEFINE_integer("steps", 20, "timed train steps")
flags.DEFINE_integer("warmup", 3, "untimed steps first (the first one compiles)")
flags.DEFINE_integer("batch_size", 0, "global batch size; 0 = the config's batch_size")
flags.DEFINE_float("peak_tflops", 0.0,
                   "per-device peak TFLOP/s for MFU; 0 = 989 on H100/H200, else no MFU")
flags.DEFINE_integer("profile_steps", 0,
                     "after timing, trace this many synced steps (mmjax.profile_step's summary "
                     "joins the report as 'profile'); 0 = off")
cli.define_config_flag()
FLAGS = flags.FLAGS


def synthetic_batch(
    config: ml_collections.ConfigDict, batch_size: int, seed: int = 0
) -> dict[str, Any]:
    """A host batch of the shapes the data pipeline would give this config, filled at random.

    Images are float32 [B, S, S, 3] with S = ``data.image_size``; text is ``{"ids", "mask"}``
    int32 [B, L] with L = ``data.max_len`` and between L/2 and L valid tokens per row; each
    classification head gets integer labels and each regression head float targets. Random, not
    zero, values: zeros can run faster than real data (METHOD.md).
    """
    rng = np.random.default_rng(seed)
    batch: dict[str, Any] = {}
    for name, enc in config.model.items():
        if name in MODEL_OPTIONS:
            continue
        if enc.kind in ("vit", "resnet"):
            s = config.data.image_size
            batch[name] = rng.standard_normal((batch_size, s, s, 3), dtype=np.float32)
        elif enc.kind == "text":
            length = config.data.max_len
            lengths = rng.integers(max(length // 2, 1), length + 1, size=batch_size)
            mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
            ids = rng.integers(1, enc.vocab_size, size=(batch_size, length), dtype=np.int32)
            batch[name] = {"ids": ids * mask, "mask": mask}
        else:
            raise ValueError(f"model.{name}.kind={enc.kind!r}: no synthetic input for it")
    for head in config.model.heads.values():
        target = head.get("target", "label")
        if head.kind == "classification":
            batch[target] = rng.integers(0, head.num_classes, size=batch_size, dtype=np.int32)
        elif head.kind == "regression":
            out_dim = head.get("out_dim", 1)
            shape = (batch_size,) if out_dim == 1 else (batch_size, out_dim)
            batch[target] = rng.standard_normal(shape, dtype=np.float32)
    return batch


def attention_backends(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Which attention each tower's self-attention runs with, for the report.

    ``"auto"`` is resolved as :func:`mmjax.models.layers.resolve_attention` will resolve it
    inside the model; other values are reported as configured ("" = JAX's default, XLA).
    """
    impl = config.model.get("attn_implementation", "") or ""
    dtype = get_dtype(config.model.dtype)
    out = {}
    for name, enc in config.model.items():
        if name in MODEL_OPTIONS or enc.kind not in ("vit", "text"):
            continue
        sizes = flops_lib.tower_sizes(enc.to_dict())
        if enc.kind == "vit":
            tokens = (config.data.image_size // sizes["patch_size"]) ** 2
            tokens += int(enc.get("class_token", False))
        else:
            tokens = config.data.max_len
        if impl == "auto":
            head_dim = sizes["width"] // sizes["num_heads"]
            chosen = layers.resolve_attention(dtype, tokens, tokens, head_dim) or "xla"
        else:
            chosen = impl or "xla"
        out[name] = f"{chosen} ({tokens} tokens)"
    return out


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


@dataclasses.dataclass
class Setup:
    """A compiled-on-first-call train step with its state and one device-resident batch."""

    par: Any
    train_fn: Any
    state: Any
    batch: Any
    batch_size: int
    device_batch: int
    n_params: int
    n_leaves: int


def build_step(config: ml_collections.ConfigDict, batch_size: int = 0) -> Setup:
    """The trainer's own step, state and a synthetic batch, as the benchmark and profile use them.

    Built as the trainer builds it (``tasks_from_config``, ``build_model``, ``create_state``,
    ``train_step`` compiled by ``parallel.make_parallel(config.parallel)``); the batch is put on
    the devices once (single-process: the whole batch is this process's).
    """
    batch_size = batch_size or config.batch_size
    par = parallel.make_parallel(config.parallel)
    n_dev = jax.device_count()
    if batch_size % n_dev:
        raise ValueError(f"batch_size={batch_size} is not a multiple of the {n_dev} devices")
    device_batch = batch_size // n_dev
    accum_steps = int(config.get("grad_accum_steps", 1) or 1)
    if device_batch % accum_steps:
        raise ValueError(
            f"grad_accum_steps={accum_steps} does not divide the per-device batch {device_batch}"
        )

    tasks = tasks_from_config(config)
    model = build_model(config.model, bn_axis_name=par.axis_name)
    host_batch = synthetic_batch(config, batch_size, seed=config.seed)

    sample = jax.tree.map(lambda x: x[:2], host_batch)
    state, tx = create_state(model, config, sample)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_leaves = len(jax.tree.leaves(state))  # what the host hands the step: dispatch cost grows
    rstate = par.put_state(state)
    del state
    train_fn = par.compile_train(functools.partial(
        train_step, model=model, tx=tx, tasks=tasks, axis_name=par.axis_name,
        accum_steps=accum_steps,
    ))
    batch = jax.block_until_ready(par.put_batch(host_batch))
    return Setup(par, train_fn, rstate, batch, batch_size, device_batch, n_params, n_leaves)


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
) -> dict[str, Any]:
    """Times ``steps`` train steps after ``warmup`` ones; returns the report as a dict.

    The step, state and batch are :func:`build_step`'s (pmapped over the local devices with the
    state donated, or jitted over the mesh, as ``config.parallel`` says). Each timed step is
    synchronised with ``jax.block_until_ready``; ``step_ms_median`` is their median and
    ``samples_per_s`` the batch over it.
    ``step_ms_pipelined`` times the same number of steps dispatched back to back with one sync at
    the end (as training runs), so the difference is the host's per-step dispatch gap;
    ``dispatch_ms_median`` is how long the host spends in the step call before it returns (on an
    H200 the synced and pipelined times differed by 12.5 ms for CLIP B/16, docs/performance.md).

    ``profile_steps`` > 0 then traces that many more synced steps of the same compiled step
    (:func:`mmjax.profile_step.trace_steps`, after the timing, so the numbers above are
    untouched) and adds ``profile``: device ms per step, per category, kernels per step and the
    ``profile_top`` heaviest kernels. One process, one compile: cheaper on a rationed device
    than a separate ``mmjax.profile_step`` run.
    """
    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps={steps} and --warmup={warmup} must both be at least 1")
    setup = build_step(config, batch_size)
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
        from mmjax import profile_step

        summary, trace, rstate = profile_step.trace_steps(train_fn, rstate, batch, profile_steps)
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
        "text_padding": {name: enc.get("padding", "right") for name, enc in config.model.items()
                         if name not in MODEL_OPTIONS and enc.kind == "text"},
        "loss": loss,
        "dtype": config.model.dtype,
        "attention": attention_backends(config),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "xla_flags_added": ADDED_XLA_FLAGS,
        "jax": jax.__version__,
        **({"profile": profile} if profile is not None else {}),
    }


def main() -> None:
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/clip_vitb16.py:tiny)")
    report = run_benchmark(
        FLAGS.config,
        config_name=config_flags.get_config_filename(FLAGS["config"]),
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        batch_size=FLAGS.batch_size,
        peak_tflops=FLAGS.peak_tflops,
        profile_steps=FLAGS.profile_steps,
    )
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
