r"""Fine-tune the question task from a `configs/shapes_pretrain.py` run, with a small budget.

    python -m mmjax.train --config configs/shapes_pretrain.py --workdir /tmp/mmjax_pretrain
    python -m mmjax.train --config configs/shapes_finetune.py --workdir /tmp/mmjax_finetune \
        --config.init_from=/tmp/mmjax_pretrain

The model is `configs/default.py`'s; ``init_from`` (a pretraining workdir, or one of its
``checkpoints/<step>`` folders) provides the ``image``, ``text`` and ``fusion`` params
(``init_subtrees``), the answer head starts fresh. The budget is ``total_steps`` = 200, a
quarter of the default's 800; the comparison the check makes is against the default trained
from scratch for the same 200 steps:

    python -m mmjax.train --config configs/default.py --workdir /tmp/mmjax_scratch200 \
        --config.total_steps=200

With ``init_from`` empty this config trains from scratch (and logs a warning), which is that
baseline with this config's schedule. Evaluator: question-answer accuracy by answer string,
overall and per question type.

Arguments (comma-separated after the path):
  lora   train LoRA adapters (rank 8) on the attention and MLP kernels plus the answer head
         instead of every parameter; the merged params are exported by
         ``mmjax.lora.merged_params_from_workdir``
  lit    freeze the image tower (LiT): only text, fusion and the head train
  tiny   a few steps on small splits, for tests
"""

from __future__ import annotations

import ml_collections

_ARGS = ("lora", "lit", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = [a for a in (arg or "").split(",") if a]
    for a in args:
        if a not in _ARGS:
            raise ValueError(
                f"unknown argument {a!r} of configs/shapes_finetune.py; known: {_ARGS}"
            )

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 200
    c.batch_size = 128
    c.eval_batch_size = 500
    c.log_every = 50
    c.eval_every = 100
    c.checkpoint_every = 100
    c.init_from = ""  # the pretraining workdir (or a checkpoint step folder of it)
    c.init_subtrees = "image,text,fusion"
    c.grad_accum_steps = 1
    c.parallel = ml_collections.ConfigDict({"mode": "pmap", "fsdp": 1})

    c.data = ml_collections.ConfigDict({
        "name": "shapes",
        "image_size": 32,
        "max_len": 12,
        "text": "question",
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
        },
        "fusion": {"kind": "cross_attention", "width": width, "depth": 2, "num_heads": 4},
        "heads": {"answer": {"kind": "classification", "num_classes": 0}},
        "dropout": 0.0,
        "dtype": "float32",
        "remat": "",
        "scan_layers": False,  # one nn.scan over stacked layers (fewer arrays, faster dispatch)
        "scan_unroll": 0,  # with scan_layers: layers per loop iteration, 0 = all (no loop)
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0})
    c.evals = ml_collections.ConfigDict({"qa": {"kind": "qa", "task": "answer"}})

    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",
        "lr": 2e-3,
        "warmup_steps": 20,
        "decay": "cosine",
        "weight_decay": 1e-4,
        "b1": 0.9,
        "b2": 0.999,
        "clip_norm": 1.0,
        "freeze": "",
        "mu_dtype": "",
        "layer_decay": 0.0,  # e.g. 0.75: layer-wise lr decay over tower layers; 0 = off
    })
    c.lora = ml_collections.ConfigDict({
        "rank": 0,  # 0 = off
        "alpha": 16.0,
        "targets": "",  # "" = attention q/k/v/out and MLP fc1/fc2 kernels
        "train": "^heads/",
    })

    if "lora" in args:
        c.lora.rank = 8
    if "lit" in args:
        c.optimizer.freeze = "^image/"
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
