r"""Self-supervised pretraining on the embedded shapes data: captions, no question labels.

    python -m mmjax.train --config configs/shapes_pretrain.py --workdir /tmp/mmjax_pretrain
    python -m mmjax.train --config configs/shapes_finetune.py --workdir /tmp/mmjax_finetune \
        --config.init_from=/tmp/mmjax_pretrain

The model is `configs/default.py`'s (a ViT patch-embedding stem and BERT-style token embeddings,
both depth 0, width 64, fused by two cross-attention layers with the text as query), trained on
(image, caption) pairs such as "a red circle and a blue square" with four weighted objectives,
L = Σᵢ λᵢ·Lᵢ:

* ``itc``: image-text contrastive (CLIP's softmax InfoNCE) on the towers' pooled features;
* ``itm``: image-text matching through the fusion, hard negatives drawn from ``itc``'s
  similarities (ALBEF);
* ``mlm``: masked language modelling of the caption through the fusion (so a masked colour or
  shape word must be read off the image: the binding the question task needs);
* ``mim``: MAE-style reconstruction of masked image patches from the visible ones.

``mim`` is ramped down from 1 to 0.25 of its λ over the run (``loss_weighting.schedules``): it
shapes the patch embedding early and then leaves capacity to the cross-modal objectives.
``--config.loss_weighting.kind=uncertainty`` learns the weights instead (Kendall et al.).
Evaluators: image↔text retrieval recall@1/5/10 and zero-shot object classification from the
prompts "a {colour} {shape}". ``configs/shapes_finetune.py`` then trains the question task
starting from this run's ``image``, ``text`` and ``fusion`` params.

Arguments (comma-separated after the path):
  tiny   a few steps on small splits, for tests
"""

from __future__ import annotations

import ml_collections

from mmjax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, ("tiny",), "configs/shapes_pretrain.py")

    c = config.run(total_steps=1_000, batch_size=128, eval_batch_size=500, eval_every=500,
                   checkpoint_every=500)
    c.data = config.shapes_data(text="caption")
    model = config.shapes_model(text_pool="mean")  # depth 0: [CLS] is the same for every text
    c.model = ml_collections.ConfigDict({
        **model,
        "heads": {
            "itc": {"kind": "contrastive", "embed_dim": 64},
            "itm": {"kind": "itm", "contrastive": "itc"},
            "mlm": {"kind": "mlm", "mask_prob": 0.25, "vocab_size": 0},
            "mim": {"kind": "mim", "mask_ratio": 0.5, "decoder_width": 64, "decoder_depth": 1,
                    "decoder_heads": 4},
        },
        **config.model_options(),
    })
    c.losses = ml_collections.ConfigDict({"itc": 1.0, "itm": 1.0, "mlm": 1.0, "mim": 1.0})
    c.loss_weighting = ml_collections.ConfigDict({
        "kind": "fixed",  # or "uncertainty" (Kendall et al. 2018)
        "init_log_var": 0.0,
        "schedules": {
            "mim": {"kind": "linear", "start_value": 1.0, "end_value": 0.25,
                    "start_step": 0, "end_step": 1_000},
        },
    })
    c.evals = ml_collections.ConfigDict({
        "retrieval": {"kind": "retrieval", "task": "itc"},
        "zeroshot": {"kind": "zeroshot", "task": "itc", "classes": "shapes_objects",
                     "prompt": "a {}"},
    })
    c.optimizer = config.optimizer(lr=2e-3)

    if "tiny" in args:
        config.tiny(c, total_steps=10, num_train=256, num_eval=64)
        c.loss_weighting.schedules.mim.end_step = 10
    c.lock()
    return c
