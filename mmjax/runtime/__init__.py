"""The process around a run: command-line plumbing (``cli``), data-parallel execution over the
devices (``parallel``) and XLA flags set before JAX starts (``xla_flags``)."""
