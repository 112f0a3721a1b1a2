r"""Embedded video demo: "which way does the <colour> square move ?" over clips and text.

    python -m mmjax.train --config configs/shapes_video.py --workdir /tmp/mmjax_shapes_video

The ``shapes_video`` data (mmjax/data/shapes_video.py) is generated offline: 8 frames of 32 px
in which two squares of different colours move in different directions, wrapping around the
edges, and a question naming one square's colour; the answer is its direction (4 classes). The
video alone can only guess which of the two motions is asked (50%), the question alone nothing
(25%), and a single frame shows no motion. Towers: a ViViT (tubelets of 2 frames x 8x8 pixels,
one joint space-time attention layer; ``mmjax.models.video``) and the shapes text embeddings;
the question attends to the tubelets in two cross-attention fusion layers.

Arguments (comma-separated after the path, e.g. ``configs/shapes_video.py:no_text,tiny``):
  no_video   every clip is black
  no_text    every question is one constant string
  one_frame  every clip is its first frame, repeated
  factorised the factorised encoder (spatial, then temporal) instead of joint attention
  tiny       a few steps and small splits, for tests
docs/video.md has what each reaches.
"""

from __future__ import annotations

import ml_collections

from mmjax import config

_VARIANTS = ("no_video", "no_text", "one_frame")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, (*_VARIANTS, "factorised", "tiny"), "configs/shapes_video.py")
    variant = next((a for a in args if a in _VARIANTS), "")

    c = config.run(total_steps=2_000, batch_size=64, eval_batch_size=500, eval_every=250,
                   checkpoint_every=500)
    c.data = config.shapes_data(variant=variant)
    c.data.name = "shapes_video"
    c.data.num_train, c.data.num_val, c.data.num_test = 20_000, 1_000, 1_000
    model = config.shapes_model()
    del model["encoders"]["image"]
    model["encoders"]["video"] = {
        "kind": "vivit", "variant": "mu/8", "width": 64, "depth": int("factorised" in args),
        "num_heads": 4, "mlp_dim": 256, "tubelet": 2,
        "attention": "factorised" if "factorised" in args else "joint", "temporal_depth": 1,
        "pos_embedding_std": 0.02, "pool": "gap",
        "init_from": "",
    }
    c.model = ml_collections.ConfigDict({
        **model,
        "heads": {"answer": {"kind": "classification", "num_classes": 0}},  # 0: from data
        **config.model_options(),
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0})
    c.optimizer = config.optimizer(lr=2e-3)

    if "tiny" in args:
        config.tiny(c)
        c.data.num_train, c.data.num_val, c.data.num_test = 256, 64, 64
    c.lock()
    return c
