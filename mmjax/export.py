"""Export a trained run for deployment: python -m mmjax.export --workdir DIR --output OUT
[--quantize int8] [--step N|best] [--task NAME] [--format jaxexport|onnx].

OUT/model.jaxexport is serialized StableHLO (``jax.export``) with the weights inside; calling it
needs jax alone. OUT/README.md says what each input is (docs/inference.md).
"""

from __future__ import annotations

from absl import flags

from mmjax.runtime import cli

flags.DEFINE_string("workdir", None, "a training run's workdir")
flags.DEFINE_string("output", None, "directory to write the artifact into")
flags.DEFINE_enum("quantize", "", ["", "int8"], "int8 weights with per-channel scales")
flags.DEFINE_string("step", None, "checkpoint step, or 'best'; default: the newest")
flags.DEFINE_string("task", "", "the head to export (default: the first classification, else "
                    "regression, else caption head)")
flags.DEFINE_integer("num_examples", 8, "test rows in example_inputs.npz")
flags.DEFINE_enum("format", "jaxexport", ["jaxexport", "onnx"], "jaxexport: serialized "
                  "StableHLO (model.jaxexport); onnx: model.onnx via jax2onnx, checked with "
                  "onnxruntime (pip install jax2onnx onnxruntime)")
FLAGS = flags.FLAGS


def main() -> None:
    for name in ("workdir", "output"):
        if not getattr(FLAGS, name):
            raise ValueError(f"--{name} is required")
    from mmjax.inference import export

    result = export.export(FLAGS.workdir, FLAGS.output, step=FLAGS.step,
                           quantize=FLAGS.quantize, task=FLAGS.task,
                           num_examples=FLAGS.num_examples, fmt=FLAGS.format)
    print(f"done: {result['output']}/{result['file']}, {result['bytes']:,} bytes, task "
          f"{result['task']}, step {result['step']}, platforms {result['platforms']}, inputs "
          f"{result['inputs']}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
