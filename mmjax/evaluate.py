"""Evaluate a checkpoint again: python -m mmjax.evaluate --workdir DIR [--split test]
[--step N|best] [--quantize int8] [--drop MOD,...] [--corrupt NAME:SEVERITY,...]
[--attack fgsm|pgd --eps E[,E...] [--steps K] [--step_size A]] [--report DIR].

The last stdout line is one JSON object: ``step``, ``split`` and the metrics a training line of
that split carries, plus ``corrupt`` and ``attack`` entries when asked (docs/inference.md).
Only reads the workdir (``--report`` writes into its own folder, refused inside a workdir).
"""

from __future__ import annotations

from absl import flags

from mmjax.runtime import cli

flags.DEFINE_string("workdir", None, "a training run's workdir")
flags.DEFINE_string("split", "test", "val, test (or train)")
flags.DEFINE_string("step", None, "checkpoint step, or 'best' (by validation metric); "
                    "default: the newest")
flags.DEFINE_enum("quantize", "", ["", "int8"], "evaluate with int8 weights (per-channel)")
flags.DEFINE_list("drop", [], "modalities to evaluate as absent (batch['present'] False)")
flags.DEFINE_string("corrupt", "", "corruptions NAME:SEVERITY[,...] (severity 1-5, or a "
                    "range 1-5): gaussian_noise, gaussian_blur, contrast, jpeg, typo, "
                    "word_drop, word_shuffle, audio_noise")
flags.DEFINE_string("attack", "", "adversarial attack on the classification head: fgsm or pgd")
flags.DEFINE_list("eps", [], "L-inf radius (images on the 0-1 scale; text in embedding "
                  "units); several values: one entry each")
flags.DEFINE_integer("steps", 10, "PGD steps")
flags.DEFINE_float("step_size", None, "PGD step size (default 2.5 * eps / steps)")
flags.DEFINE_string("report", "", "write a robustness table and plots (PNG) into this folder")
FLAGS = flags.FLAGS


def _floats(values: list[str]) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--eps={','.join(values)}: expected numbers") from None


def main() -> None:
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    from mmjax.inference.checkpoint_metrics import checkpoint_metrics
    from mmjax.io import writers
    from mmjax.trainer import workdir

    if FLAGS.report:  # before the evaluation: refused at once, not after minutes of work
        workdir.refuse_output_inside(FLAGS.report, "--report")
    result = checkpoint_metrics(FLAGS.workdir, split=FLAGS.split, step=FLAGS.step,
                                quantize=FLAGS.quantize, drop_modalities=FLAGS.drop,
                                corrupt=FLAGS.corrupt, attack=FLAGS.attack,
                                eps=_floats(FLAGS.eps), steps=FLAGS.steps,
                                step_size=FLAGS.step_size)
    if FLAGS.report:
        from mmjax.robust import report

        report.write(result, FLAGS.report)
    print(writers.json_line(result), flush=True)


if __name__ == "__main__":
    cli.run_main(main)
