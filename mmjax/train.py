"""Train a model: python -m mmjax.train --config configs/X.py[:arg] --workdir DIR [--config.k=v].

Running the same command again on the same DIR resumes from the newest good checkpoint.
"""

from __future__ import annotations

from absl import flags

from mmjax.runtime import cli

flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl and events")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-process runs "
                    "(else MMJAX_COORDINATOR, or what SLURM / TPU pods provide)")
flags.DEFINE_integer("num_processes", 0, "number of processes (with --coordinator_address)")
flags.DEFINE_integer("process_id", -1, "this process's index (with --coordinator_address)")
cli.define_config_flag()
FLAGS = flags.FLAGS


def main() -> None:
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/default.py)")
    from mmjax.runtime import xla_flags

    xla_flags.apply_default_flags()  # before JAX starts its backend; user XLA_FLAGS win
    from mmjax import trainer  # after flag parsing: keeps --help fast
    from mmjax.runtime import parallel

    parallel.maybe_initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run_main(main)
