"""Using a trained run: read it back (``run``), answer new inputs (``predict``), evaluate a
checkpoint again (``evaluate``), ship it as a ``jax.export`` artifact (``export``), and compress
its weights to int8 (``quantize``). Nothing here writes to or locks the run's workdir."""
