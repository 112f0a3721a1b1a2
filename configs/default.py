r"""Embedded default: answer questions about generated shapes with a fused image+text model.

    python -m mmjax.train --config configs/default.py --workdir /tmp/mmjax_default

The ``shapes`` data (mmjax/data/shapes.py) is generated offline: 32-px images with two objects
(3 shapes x 6 colours, each in its own 8x8 cell) and questions such as "what colour is the
circle ?" or "what shape is the red one ?". The model is ``config.shapes_model``: embedding-only
towers fused by two cross-attention layers (text attends to image), classified from the fused
[CLS].

Arguments (comma-separated after the path, e.g. ``configs/default.py:image_only,tiny``):
  image_only  every question is one constant string: only the image is informative
  text_only   every image is blank: only the question is informative
  tiny        a few steps and small splits, for tests
Both ablations stay near chance, which shows that the task needs fusion.
"""

from __future__ import annotations

import ml_collections

from mmjax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, ("image_only", "text_only", "tiny"), "configs/default.py")
    variant = next((a for a in args if a in ("image_only", "text_only")), "")

    c = config.run(total_steps=800, batch_size=128, eval_batch_size=500)
    c.data = config.shapes_data(variant=variant)
    c.model = ml_collections.ConfigDict({
        **config.shapes_model(),
        "heads": {"answer": {"kind": "classification", "num_classes": 0}},  # 0: from data
        **config.model_options(),
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0})
    # lr 1e-3: with 2e-3 some seeds stay on the binding plateau at step 800 (docs/training.md).
    c.optimizer = config.optimizer(lr=1e-3)

    if "tiny" in args:
        config.tiny(c)
    c.lock()
    return c
