"""Where a train step's accelerator time goes: a profiler trace of N steps, summed by kernel.

    python -m mmjax.profile_step --config configs/X.py[:arg] --steps 5 [--batch_size B] \
        [--out DIR] [--top 30]

The benchmark says how long a step takes; this says what it is made of. It builds the
benchmark's step (the trainer's own state, step and parallel strategy on a synthetic batch), runs
warm-up steps, then ``--steps`` synced steps under ``jax.profiler.trace`` (``mmjax.perf.trace``).
Printed: one JSON line per top op (``name``, ``ms_per_step``, ``share``, ``calls_per_step``), then
one summary line with the categories and ``device_ms_per_step``. The trace stays in ``--out`` for
TensorBoard/Perfetto.
"""

# ruff: noqa: E402 - XLA_FLAGS must be set before JAX is imported, hence the late imports.
from __future__ import annotations

from mmjax.runtime import xla_flags

ADDED_XLA_FLAGS: list[str] = xla_flags.apply_default_flags() if __name__ == "__main__" else []

import json

import jax
from absl import flags

from mmjax.runtime import cli

flags.DEFINE_integer("steps", 5, "traced train steps")
flags.DEFINE_integer("warmup", 3, "untraced steps first (the first one compiles)")
flags.DEFINE_integer("batch_size", 0, "global batch size; 0 = the config's batch_size")
flags.DEFINE_string("out", "", "trace directory; empty = a temporary one")
flags.DEFINE_integer("top", 30, "how many ops to print")
cli.define_config_flag()
FLAGS = flags.FLAGS


def main() -> None:
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/clip_vitb16.py:tiny)")
    from mmjax.perf import trace

    summary, path = trace.profile(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                                  batch_size=FLAGS.batch_size, out=FLAGS.out)
    for row in summary.pop("ops")[: FLAGS.top]:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    print(json.dumps({"summary": True, "trace": str(path), "jax": jax.__version__,
                      "backend": jax.default_backend(), **summary}), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
