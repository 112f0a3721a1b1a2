"""Explain a trained classifier: python -m mmjax.explain --workdir W --split S [--limit N]
[--method relevance|rollout|integrated_gradients|occlusion] [--step N|best] --output DIR
[--layers].

Writes DIR/explanations.jsonl (one line per example), PNG overlays and DIR/index.html
(docs/explain.md). Only reads the workdir.
"""

from __future__ import annotations

from absl import flags

from mmjax.runtime import cli

flags.DEFINE_string("workdir", None, "a training run's workdir")
flags.DEFINE_string("split", "test", "val, test (or train)")
flags.DEFINE_integer("limit", 0, "explain the first N examples (0: all)")
flags.DEFINE_enum("method", "relevance",
                  ["relevance", "rollout", "integrated_gradients", "occlusion"],
                  "explanation method")
flags.DEFINE_string("step", None, "checkpoint step, or 'best'; default: the newest")
flags.DEFINE_string("output", None, "folder to write")
flags.DEFINE_bool("layers", False, "also write per-layer views (PCA of token features, "
                  "attention entropy per head)")
flags.DEFINE_integer("batch_size", 100, "examples per jitted step")
flags.DEFINE_integer("steps", 32, "integrated gradients: quadrature nodes")
flags.DEFINE_integer("images", 50, "examples that get PNG overlays in index.html")
flags.DEFINE_string("task", "", "the classification head to explain (default: the first)")
FLAGS = flags.FLAGS


def main() -> None:
    for name in ("workdir", "output"):
        if not getattr(FLAGS, name):
            raise ValueError(f"--{name} is required")
    from mmjax.interpret.explain import explain

    result = explain(FLAGS.workdir, FLAGS.output, split=FLAGS.split, limit=FLAGS.limit,
                     method=FLAGS.method, step=FLAGS.step, layers=FLAGS.layers,
                     batch_size=FLAGS.batch_size, task=FLAGS.task, steps=FLAGS.steps,
                     images=FLAGS.images)
    print(f"done: {result['count']} examples of {result['split']} ({result['method']}), step "
          f"{result['step']}, {result['seconds']} s, output {result['output']}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
