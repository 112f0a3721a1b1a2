"""The trainer's own step on a synthetic, device-resident batch: what the benchmark times and
the profiler traces, with no input pipeline in the number."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import modalities
from mmjax.data import records
from mmjax.models import encoders, layers
from mmjax.models.multimodal import build_model
from mmjax.optim import weighting
from mmjax.perf import flops as flops_lib
from mmjax.runtime import parallel
from mmjax.trainer.state import create_state, tasks_from_config
from mmjax.trainer.step import train_step


def synthetic_batch(
    config: ml_collections.ConfigDict, batch_size: int, seed: int = 0
) -> dict[str, Any]:
    """A host batch of the shapes the data pipeline would give this config, filled at random.

    Each tower's entry is its modality's ``synthetic`` input (uint8 pixels; token ids below
    the tower's vocabulary with between L/2 and L real tokens per row; features...); each
    classification head gets integer labels and each regression head float targets. Random,
    not zero, values: zeros can run faster than real data.
    """
    rng = np.random.default_rng(seed)
    ctx = records.context(config.data, None)
    batch: dict[str, Any] = {m: modalities.get(m).synthetic(batch_size, ctx, dict(enc), rng)
                             for m, enc in config.model.encoders.items()}
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
    """Which attention each tower's self-attention runs with, for the report (towers that
    count their tokens, ``mmjax.models.encoders.flops``).

    ``"auto"`` is resolved as :func:`mmjax.models.layers.resolve_attention` will resolve it
    inside the model; other values are reported as configured ("" = JAX's default, XLA).
    """
    impl = config.model.get("attn_implementation", "") or ""
    dtype = layers.DTYPES[config.model.dtype]
    out = {}
    for m, shape in flops_lib.input_shapes(config).items():
        t = encoders.tower(m, config.model.encoders[m].to_dict(), layers.Options(), parent=None)
        if not hasattr(t, "flops") or not hasattr(t, "sizes"):
            continue
        _, tokens, _ = t.flops(shape)
        sizes = t.sizes()
        if impl == "auto":
            head_dim = sizes["width"] // sizes["num_heads"]
            chosen = layers.resolve_attention(dtype, tokens, tokens, head_dim) or "xla"
        else:
            chosen = impl or "xla"
        out[m] = f"{chosen} ({tokens} tokens)"
    return out


@dataclasses.dataclass
class StepSetup:
    """A compiled-on-first-call train step with its state and one device-resident batch."""

    par: Any
    train_fn: Any
    state: Any
    batch: Any
    batch_size: int
    device_batch: int
    n_params: int
    n_leaves: int


def build_step(config: ml_collections.ConfigDict, batch_size: int = 0) -> StepSetup:
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
    weights = weighting.from_config(config, [t.name for t in tasks])
    train_fn = par.compile_train(functools.partial(
        train_step, model=model, tx=tx, tasks=tasks, weights=weights, axis_name=par.axis_name,
        accum_steps=accum_steps,
    ))
    batch = jax.block_until_ready(par.put_batch(host_batch))
    return StepSetup(par, train_fn, rstate, batch, batch_size, device_batch, n_params, n_leaves)
