"""Optimisation: the Optax optimizer and its schedules (``optimizers``), LoRA adapters
(``lora``), pretrained towers and earlier runs as a starting point (``transfer``), and how the
per-task losses are weighted (``weighting``)."""
