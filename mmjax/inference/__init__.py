"""Using a trained run (read back by ``mmjax.trainer.runs``): how a head answers (``answer``),
new inputs answered (``predict``), a checkpoint's metrics again (``checkpoint_metrics``), the
run shipped as a ``jax.export`` artifact (``export``, ``artifact``), and its weights compressed
to int8 (``quantize``). Nothing here writes to or locks the run's workdir."""
