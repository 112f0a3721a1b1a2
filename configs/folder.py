r"""The default fusion model on a folder dataset: DIR/{train,val,test}.jsonl + image files.

    python -m mmjax.train --config configs/folder.py --workdir /tmp/mmjax_folder \
        --config.data.path=DIR

Each JSONL line is ``{"image": "relative/path.png", "text": "...", "label": "yes"}``. Images
(any format Pillow reads) are resized to ``data.image_size``; the text goes through a word-piece
tokenizer trained on the train texts and saved in the workdir (or ``data.tokenizer=HF_FOLDER``);
the label vocabulary is built from train and saved in the workdir. Every record is validated
(and its image decoded and cached at the model's size) before training, so bad data stops the
run at once, naming the file and line; ``--config.data.skip_bad=True`` drops and counts them.

The model is the embedded default's (embedding-only towers fused by cross-attention) at 64 px
with patch 8, sized to learn a simple yes/no question about real images in a few minutes on
a 2-core CPU.

Arguments: ``tiny`` (few steps, for tests).
"""

from __future__ import annotations

import ml_collections

_ARGS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = [a for a in (arg or "").split(",") if a]
    for a in args:
        if a not in _ARGS:
            raise ValueError(f"unknown argument {a!r} of configs/folder.py; known: {_ARGS}")

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 800
    c.batch_size = 64
    c.eval_batch_size = 256
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200

    c.init_from = ""  # a training workdir or checkpoint to start from (#7); "" = fresh
    c.grad_accum_steps = 1
    c.parallel = ml_collections.ConfigDict({"mode": "pmap", "fsdp": 1})

    c.data = ml_collections.ConfigDict({
        "name": "folder",
        "path": "",  # required: --config.data.path=DIR
        "image_size": 64,
        "max_len": 16,
        "tokenizer": "",  # "" = word-piece trained on train texts; else an HF tokenizer folder
        "vocab_size": 2000,  # word-piece vocabulary target
        "pp_train": "decode|resize|flip|normalize|tokenize",
        "pp_eval": "decode|resize|normalize|tokenize",
        "skip_bad": False,
        "cache": True,  # keep decoded, resized pixels in memory (bounded by cache_mb)
        "cache_mb": 2048,
        "num_workers": 0,  # >0: decode/augment in grain worker processes
    })

    width = 64
    c.model = ml_collections.ConfigDict({
        "image": {
            "kind": "vit", "variant": "mu/8", "width": width, "depth": 0, "num_heads": 4,
            "init_from": "",  # HF folder or mmjax checkpoint/workdir
            "mlp_dim": 4 * width, "pool": "gap",
        },
        "text": {
            "kind": "text", "variant": "mu", "width": width, "depth": 0, "num_heads": 4,
            "init_from": "",  # HF folder or mmjax checkpoint/workdir
            "mlp_dim": 4 * width, "vocab_size": 0, "max_len": 16,  # vocab_size 0: from data
        },
        "fusion": {"kind": "cross_attention", "width": width, "depth": 2, "num_heads": 4},
        "heads": {"answer": {"kind": "classification", "num_classes": 0}},  # 0: from data
        "dropout": 0.0,
        "dtype": "float32",
        "remat": "",
        "scan_layers": False,  # one nn.scan over stacked layers (fewer arrays, faster dispatch)
        "scan_unroll": 0,  # with scan_layers: layers per loop iteration, 0 = all (no loop)
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0})

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
        c.total_steps = 12
        c.batch_size = 8
        c.eval_batch_size = 16
        c.log_every = 1
        c.eval_every = 6
        c.checkpoint_every = 6
        c.optimizer.warmup_steps = 2
        c.data.image_size = 32
    c.lock()
    return c
