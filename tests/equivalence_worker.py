"""Runs the tiny default for a few steps under given parallel settings; prints per-step losses.

Used by tests/test_parallel.py in subprocesses, because the device count (XLA_FLAGS) and
jax.distributed must be fixed before JAX starts. Prints one line: ``LOSSES <mode> <json list>``.
"""

from __future__ import annotations

import json
import os
import sys

from mmjax.runtime import parallel


def main() -> None:
    parallel.maybe_initialize_distributed()
    import jax

    from configs.default import get_config
    from mmjax import trainer

    for spec in sys.argv[1:]:  # e.g. "pmap", "mesh:1", "mesh:4", "pmap:accum4"
        mode, _, extra = spec.partition(":")
        config = get_config("tiny")
        config.total_steps = 5
        config.log_every = 1
        config.eval_every = 1000
        config.checkpoint_every = 1000
        config.model.dropout = 0.0
        config.parallel.mode = mode
        if extra.isdigit():
            config.parallel.fsdp = int(extra)
        if extra.startswith("accum"):
            config.grad_accum_steps = int(extra[len("accum"):])
        # every process must name the same directory: checkpoints are written collectively
        workdir = os.path.join(os.environ["MMJAX_EQ_DIR"], spec.replace(":", "_"))
        trainer.train_and_evaluate(config, workdir)
        if jax.process_index() == 0:
            with open(f"{workdir}/metrics.jsonl") as f:
                losses = [json.loads(line)["loss"] for line in f if '"train"' in line]
            print("LOSSES", spec, json.dumps(losses), flush=True)


if __name__ == "__main__":
    main()
