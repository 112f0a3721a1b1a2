r"""CLIP ViT-B/16 (open_clip's ``ViT-B-16`` architecture), for the #6 benchmark and training.

    python -m mmjax.benchmark --config configs/clip_vitb16.py --batch_size 256
    python -m mmjax.benchmark --config configs/clip_vitb16.py:tiny --steps 3   # CPU, seconds

Image tower: ViT-B/16 at 224 px (width 768, 12 layers, 12 heads, MLP 3072, GELU, LN eps 1e-5,
an LN before the transformer as open_clip's ``ln_pre``). Text tower: width 512, 8 heads,
12 layers, MLP 2048, vocabulary 49408, causal mask, pre-LN with a final LN, pooled at the
end-of-text token (the last valid one, ``pool="last"``). Head: 512-d projections of both pooled
features and a learnt temperature; loss: the symmetric contrastive loss (``infonce``).

Two deliberate departures from open_clip, both for cuDNN's fused attention (GUIDE §6, which
saw cuDNN refuse 197 tokens, and 77 tokens under a causal mask, on an H200):

* no class token, ``pool="gap"``: 196 patch tokens (even) instead of 197, pooled by their mean
  (big_vision's CLIP/SigLIP recipe) instead of open_clip's class token;
* the 77-token context is padded to 80 (``data.max_len``; 80 position embeddings): a text has at
  most 77 tokens and the mask marks the rest as padding. Under the causal mask no valid token
  attends to a later position, so the valid tokens and the pooled end-of-text feature are what a
  77-token model computes; the cost is 80/77 of the text tower's tokens (+0.2 GFLOP/sample).

``model.attn_implementation="auto"`` resolves per call to cuDNN on a GPU where the shapes allow
and to XLA elsewhere (mmjax/models/layers.py ``resolve_attention``), so this config runs as is on
a CPU. Data: ``shapes`` is a placeholder until real image-text data arrives with #4; the benchmark
never reads data, it builds synthetic batches of the configured shapes.

Arguments (comma-separated after the path):
  tiny   a narrow two-layer float32 model on 32-px images and 16 tokens that runs on a CPU in
         seconds
"""

from __future__ import annotations

import ml_collections

_ARGS = ("tiny",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = [a for a in (arg or "").split(",") if a]
    for a in args:
        if a not in _ARGS:
            raise ValueError(f"unknown argument {a!r} of configs/clip_vitb16.py; known: {_ARGS}")

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 10_000
    c.batch_size = 256
    c.eval_batch_size = 256
    c.log_every = 100
    c.eval_every = 1_000
    c.checkpoint_every = 1_000

    c.init_from = ""  # a training workdir or checkpoint to start from (#7); "" = fresh
    c.grad_accum_steps = 1
    c.parallel = ml_collections.ConfigDict({"mode": "pmap", "fsdp": 1})

    # Placeholder source until #4 brings image-text data; image_size and max_len are also the
    # shapes of the benchmark's synthetic batches.
    c.data = ml_collections.ConfigDict({
        "name": "shapes",
        "image_size": 224,
        "max_len": 80,  # CLIP's 77-token context padded to a multiple of 8 (see the docstring)
        "text": "question",
        "variant": "",
        "num_train": 50_000,
        "num_val": 2_000,
        "num_test": 2_000,
    })

    c.model = ml_collections.ConfigDict({
        "image": {
            "kind": "vit", "variant": "B/16", "class_token": False, "pool": "gap",
            "init_from": "",  # HF folder or mmjax checkpoint/workdir
            "embed_norm": True, "final_norm": True, "activation": "gelu",
            "layer_norm_eps": 1e-5,
        },
        "text": {
            "kind": "text", "variant": "M",  # width 512, 12 layers, MLP 2048, 8 heads
            "init_from": "",  # HF folder or mmjax checkpoint/workdir
            "vocab_size": 49_408, "max_len": 80, "type_vocab_size": 0,
            "pre_norm": True, "embed_norm": False, "final_norm": True, "causal": True,
            "pool": "last", "activation": "gelu", "layer_norm_eps": 1e-5,
            # "right": masks are right padding, given to attention as key lengths (cuDNN's own
            # padding mask, no [B, 1, T, T] bias); "mask": any 0/1 mask as a boolean mask.
            "padding": "right",
        },
        "fusion": {"kind": "none"},
        "heads": {"clip": {"kind": "contrastive", "embed_dim": 512}},
        "dropout": 0.0,
        "dtype": "bfloat16",
        "attn_implementation": "auto",
        "remat": "",
        # Layers stacked (~8x fewer state arrays: less host dispatch per step, half the GPU
        # kernels) and all unrolled (no loop, so no zero-filled activation stacks): compiled
        # for an H200, the same memory as unrolled (docs/performance.md §8).
        "scan_layers": True,
        "scan_unroll": 0,  # layers per loop iteration; 0 = all (no loop)
    })
    c.losses = ml_collections.ConfigDict({"clip": 1.0})

    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",
        "lr": 5e-4,
        "warmup_steps": 1_000,
        "decay": "cosine",
        "weight_decay": 0.2,
        "b1": 0.9,
        "b2": 0.98,
        "clip_norm": 1.0,
        "freeze": "",
        "mu_dtype": "",
    })

    if "tiny" in args:
        c.total_steps = 20
        c.batch_size = 8
        c.eval_batch_size = 8
        c.log_every = 5
        c.eval_every = 10
        c.checkpoint_every = 10
        c.optimizer.warmup_steps = 5
        # bf16 is emulated on a CPU and compiles slower there (14-17 s against 9-12 s for the
        # tiny CLIP step, measured in one process); --config.model.dtype=bfloat16 brings it back.
        c.model.dtype = "float32"
        c.data.image_size = 32
        c.data.max_len = 16
        c.data.num_train = 512
        c.data.num_val = 96
        c.data.num_test = 96
        c.model.image.update({"variant": "mu/8", "width": 32, "depth": 2, "num_heads": 2,
                              "mlp_dim": 64})
        c.model.text.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64,
                             "vocab_size": 256, "max_len": 16})
        c.model.heads.clip.embed_dim = 16
    c.lock()
    return c
