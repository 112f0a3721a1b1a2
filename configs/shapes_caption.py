r"""Captioning on the embedded shapes data, with a locked (frozen) image tower, LiT-style.

    python -m mmjax.train --config configs/shapes_caption.py --workdir /tmp/mmjax_caption

Image tower: `configs/default.py`'s ViT stem (patch 8, width 64, depth 0), **frozen**
(``optimizer.freeze="^image/"``: its params get no update and no weight decay, so they are
bit-identical after training; with ``--config.init_from=<a shapes_pretrain workdir>`` it is the
pretrained stem, LiT proper, otherwise its random initialisation, which still keeps every patch
distinct). Two tasks on (image, caption) pairs such as "a red circle and a blue square":

* ``caption``: a text decoder (2 pre-LN layers of causal self-attention + cross-attention to the
  image tokens, width 64) trained with teacher forcing; the evaluator decodes greedily and reports
  exact match and corpus BLEU-4;
* ``itc``: a contrastive head between the image tower and a trainable text tower, for
  image↔text retrieval recall@1/5/10.

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
                f"unknown argument {a!r} of configs/shapes_caption.py; known: {_ARGS}"
            )

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 500
    c.batch_size = 128
    c.eval_batch_size = 500
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 250
    c.init_from = ""  # e.g. a shapes_pretrain workdir: its image tower (init_subtrees)
    c.init_subtrees = "image"
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
            "kind": "text", "variant": "mu", "width": width, "depth": 1, "num_heads": 4,
            "mlp_dim": 4 * width, "vocab_size": 0, "max_len": 16, "init_from": "",
        },
        "fusion": {"kind": "none"},
        "heads": {
            "caption": {"kind": "caption", "width": width, "depth": 2, "num_heads": 4,
                        "mlp_dim": 4 * width, "vocab_size": 0, "max_len": 16},
            "itc": {"kind": "contrastive", "embed_dim": 64},
        },
        "dropout": 0.0,
        "dtype": "float32",
        "remat": "",
        "scan_layers": False,  # one nn.scan over stacked layers (fewer arrays, faster dispatch)
        "scan_unroll": 0,  # with scan_layers: layers per loop iteration, 0 = all (no loop)
    })
    c.losses = ml_collections.ConfigDict({"caption": 1.0, "itc": 0.5})
    c.evals = ml_collections.ConfigDict({
        "greedy": {"kind": "caption", "task": "caption", "max_len": 12},
        "retrieval": {"kind": "retrieval", "task": "itc"},
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
        "freeze": "^image/",  # LiT: the image tower is locked
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
        c.data.num_train = 256
        c.data.num_val = 64
        c.data.num_test = 64
    c.lock()
    return c
