"""Train a model: python -m mmjax.train --config configs/X.py[:arg] --workdir DIR [--config.k=v].

Running the same command again on the same DIR resumes from the newest good checkpoint.
"""

from __future__ import annotations

from absl import flags

from mmjax import cli

flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl and events")
cli.define_config_flag()
FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/default.py)")
    from mmjax import trainer  # after flag parsing: keeps --help fast

    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run_main(main)
