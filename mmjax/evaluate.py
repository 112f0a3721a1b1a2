"""Evaluate a checkpoint again: python -m mmjax.evaluate --workdir DIR [--split test]
[--step N|best] [--quantize int8].

The last stdout line is one JSON object: ``step``, ``split`` and the metrics a training line of
that split carries (docs/inference.md). Only reads the workdir.
"""

from __future__ import annotations

from absl import flags

from mmjax import cli

flags.DEFINE_string("workdir", None, "a training run's workdir")
flags.DEFINE_string("split", "test", "val, test (or train)")
flags.DEFINE_string("step", None, "checkpoint step, or 'best' (by validation metric); "
                    "default: the newest")
flags.DEFINE_enum("quantize", "", ["", "int8"], "evaluate with int8 weights (per-channel)")
FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    from mmjax import writers
    from mmjax.inference import evaluate

    result = evaluate.evaluate(FLAGS.workdir, split=FLAGS.split, step=FLAGS.step,
                               quantize=FLAGS.quantize)
    print(writers.json_line(result), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
