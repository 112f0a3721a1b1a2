r"""Embedded three-modality demo: "is the <shape> the colour you hear ?" over image, sound, text.

    python -m mmjax.train --config configs/shapes_audio.py --workdir /tmp/mmjax_shapes_audio

The ``shapes_audio`` data (mmjax/data/shapes_audio.py) is generated offline: a shapes image
(two objects), a 0.34 s clip whose pitch names a colour, and a question naming a shape; the
answer ("yes" or "no, it is <colour>") needs all three, and no two do better than 50%. The clip
enters as a 16-mel, 32-frame Kaldi fbank (``ASTFeatureExtractor``'s features at a small size).
Towers: the shapes ViT patch embedding and text embeddings (``config.shapes_model``) and a small
AST (16x16 patches over the whole spectrum: 2 patches); the text attends to the image and audio
tokens together in the cross-attention fusion; one classification head.

Arguments (comma-separated after the path, e.g. ``configs/shapes_audio.py:no_audio,tiny``):
  no_image  every image is blank
  no_audio  every clip is the same noise
  no_text   every question is one constant string
  tiny      a few steps and small splits, for tests
Each ablation stays near chance (0.5); docs/training.md has the measurements.
"""

from __future__ import annotations

import ml_collections

from mmjax import config

_VARIANTS = ("no_image", "no_audio", "no_text")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, (*_VARIANTS, "tiny"), "configs/shapes_audio.py")
    variant = next((a for a in args if a in _VARIANTS), "")

    c = config.run(total_steps=1_000, batch_size=128, eval_batch_size=500, eval_every=200,
                   checkpoint_every=200)
    c.data = config.shapes_data(variant=variant)
    c.data.name = "shapes_audio"
    model = config.shapes_model()
    # 16 mels x 32 frames in 16x16 patches: 2 patches, each seeing the whole spectrum (a tone
    # is one frequency band: a patch that sees all bands finds it at once), plus [CLS] and
    # distillation.
    model["encoders"]["audio"] = {
        "kind": "ast", "variant": "mu", "width": 64, "depth": 1, "num_heads": 4,
        "mlp_dim": 256, "patch_size": 16, "frequency_stride": 16, "time_stride": 16,
        "pool": "cls_dist", "init_from": "",
    }
    c.model = ml_collections.ConfigDict({
        **model,
        "heads": {"answer": {"kind": "classification", "num_classes": 0}},  # 0: from data
        **config.model_options(),
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0})
    c.optimizer = config.optimizer(lr=1e-3)

    if "tiny" in args:
        config.tiny(c)
        c.data.num_train, c.data.num_val, c.data.num_test = 512, 96, 96
    c.lock()
    return c
