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

_ARGS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = [a for a in (arg or "").split(",") if a]
    for a in args:
        if a not in _ARGS:
            raise ValueError(
                f"unknown argument {a!r} of configs/shapes_pretrain.py; known: {_ARGS}"
            )

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1_000
    c.batch_size = 128
    c.eval_batch_size = 500
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.init_from = ""
    c.grad_accum_steps = 1
    c.parallel = ml_collections.ConfigDict({"mode": "pmap", "fsdp": 1})

    c.data = ml_collections.ConfigDict({
        "name": "shapes",
        "image_size": 32,
        "max_len": 12,
        "text": "caption",
        "variant": "",
        "num_train": 50_000,
        "num_val": 2_000,
        "num_test": 2_000,
    })

    width = 64
    c.model = ml_collections.ConfigDict({
        "image": {
            "kind": "vit", "variant": "mu/8", "width": width, "depth": 0, "num_heads": 4,
            "mlp_dim": 4 * width, "pool": "gap", "init_from": "",
        },
        "text": {
            "kind": "text", "variant": "mu", "width": width, "depth": 0, "num_heads": 4,
            "mlp_dim": 4 * width, "vocab_size": 0, "max_len": 16, "init_from": "",
            # Mean over tokens: with depth 0 the [CLS] feature is the same for every text, and
            # the contrastive head reads the pooled feature.
            "pool": "mean",
        },
        "fusion": {"kind": "cross_attention", "width": width, "depth": 2, "num_heads": 4},
        "heads": {
            "itc": {"kind": "contrastive", "embed_dim": 64},
            "itm": {"kind": "itm", "contrastive": "itc"},
            "mlm": {"kind": "mlm", "mask_prob": 0.25, "vocab_size": 0},
            "mim": {"kind": "mim", "mask_ratio": 0.5, "decoder_width": 64, "decoder_depth": 1,
                    "decoder_heads": 4},
        },
        "dropout": 0.0,
        "dtype": "float32",
        "remat": "",
        "scan_layers": False,  # one nn.scan over stacked layers (fewer arrays, faster dispatch)
        "scan_unroll": 0,  # with scan_layers: layers per loop iteration, 0 = all (no loop)
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

    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",
        "lr": 2e-3,
        "warmup_steps": 100,
        "decay": "cosine",
        "weight_decay": 1e-4,
        "b1": 0.9,
        "b2": 0.999,
        "clip_norm": 1.0,
        "freeze": "",
        "mu_dtype": "",
    })

    if "tiny" in args:
        c.total_steps = 10
        c.batch_size = 16
        c.eval_batch_size = 64
        c.log_every = 5
        c.eval_every = 10
        c.checkpoint_every = 10
        c.optimizer.warmup_steps = 2
        c.loss_weighting.schedules.mim.end_step = 10
        c.data.num_train = 256
        c.data.num_val = 64
        c.data.num_test = 64
    c.lock()
    return c
