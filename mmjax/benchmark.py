"""Times train steps on synthetic data and prints one JSON line.

    python -m mmjax.benchmark --config configs/X.py[:arg] [--steps N] [--batch_size B]

The line holds config, devices, batch_size, step_ms_median, samples_per_s, tflops_per_step, mfu,
peak memory and more (docs/performance.md lists them). The step is the trainer's own, compiled
by the same ``parallel`` strategy, on one synthetic batch that stays on the devices. XLA flags
from :mod:`mmjax.runtime.xla_flags` are added before JAX starts, unless the user set them.
"""

# ruff: noqa: E402 - XLA_FLAGS must be set before JAX is imported, hence the late imports.
from __future__ import annotations

from mmjax.runtime import xla_flags

# Only the CLI touches the environment; importing this module as a library changes nothing.
ADDED_XLA_FLAGS: list[str] = xla_flags.apply_default_flags() if __name__ == "__main__" else []

import json

from absl import flags
from ml_collections import config_flags

from mmjax.runtime import cli

flags.DEFINE_integer("steps", 20, "timed train steps")
flags.DEFINE_integer("warmup", 3, "untimed steps first (the first one compiles)")
flags.DEFINE_integer("batch_size", 0, "global batch size; 0 = the config's batch_size")
flags.DEFINE_float("peak_tflops", 0.0,
                   "per-device peak TFLOP/s for MFU; 0 = 989 on H100/H200, else no MFU")
flags.DEFINE_integer("profile_steps", 0,
                     "after timing, trace this many synced steps (the profile summary joins the "
                     "report as 'profile'); 0 = off")
cli.define_config_flag()
FLAGS = flags.FLAGS


def main() -> None:
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/clip_vitb16.py:tiny)")
    from mmjax.perf import report

    result = report.run_benchmark(
        FLAGS.config,
        config_name=config_flags.get_config_filename(FLAGS["config"]),
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        batch_size=FLAGS.batch_size,
        peak_tflops=FLAGS.peak_tflops,
        profile_steps=FLAGS.profile_steps,
        xla_flags_added=ADDED_XLA_FLAGS,
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
