"""Answer new inputs: python -m mmjax.predict --workdir DIR --input FILE.jsonl --output OUT.jsonl
[--top_k K] [--step N|best] [--batch_size B] [--skip_bad] [--task NAME] [--embed].

FILE.jsonl holds ``{"image": path, "text": str}`` per line (paths relative to FILE's folder,
``label`` optional and ignored); OUT.jsonl gets one line per input, in order (docs/inference.md).
"""

from __future__ import annotations

from absl import flags

from mmjax.runtime import cli

flags.DEFINE_string("workdir", None, "a training run's workdir")
flags.DEFINE_string("input", None, "JSONL file of inputs in the folder format")
flags.DEFINE_string("output", None, "JSONL file to write (with --embed: its .npz sibling)")
flags.DEFINE_integer("top_k", 5, "classes per input, most probable first")
flags.DEFINE_string("step", None, "checkpoint step, or 'best'; default: the newest")
flags.DEFINE_integer("batch_size", 0, "inputs per step (default: the run's eval_batch_size)")
flags.DEFINE_bool("skip_bad", False, "skip and count bad input lines instead of stopping")
flags.DEFINE_string("task", "", "the head that answers (default: the first classification, "
                    "else regression, else caption head; with --embed a contrastive head)")
flags.DEFINE_bool("embed", False, "write the contrastive embeddings to OUT.npz instead")
FLAGS = flags.FLAGS


def main() -> None:
    for name in ("workdir", "input", "output"):
        if not getattr(FLAGS, name):
            raise ValueError(f"--{name} is required")
    from mmjax.inference import predict

    result = predict.predict(
        FLAGS.workdir, FLAGS.input, FLAGS.output, top_k=FLAGS.top_k, step=FLAGS.step,
        batch_size=FLAGS.batch_size, skip_bad=FLAGS.skip_bad, task=FLAGS.task,
        embed=FLAGS.embed)
    print(f"done: {result['count']} inputs ({result['skipped']} bad lines skipped), task "
          f"{result['task']}, step {result['step']}, output {result['output']}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
