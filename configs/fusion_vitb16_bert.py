r"""ViT-B/16 + BERT-base fused by two co-attention layers, with classification and contrastive
losses; the second #6 benchmark workload.

    python -m mmjax.benchmark --config configs/fusion_vitb16_bert.py --batch_size 256
    python -m mmjax.benchmark --config configs/fusion_vitb16_bert.py:tiny --steps 3   # CPU

Image tower: ViT-B/16 at 224 px, 196 patch tokens without a class token (an even length that
cuDNN's fused attention accepts, GUIDE §6), mean-pooled. Text tower: BERT-base (width 768,
12 layers, 12 heads, MLP 3072, post-LN, embedding LN, tanh pooler on [CLS], vocabulary 30522,
512 position embeddings) on 64 tokens. Fusion: two ViLBERT-style co-attention layers of width
768 (each stream attends to itself and to the other); the fused feature is the two streams'
masked means, concatenated. Tasks: ``answer``, a classification over 3129 classes (the size of
VQAv2's usual answer vocabulary) from the fused feature, λ = 1; ``itc``, a 256-d contrastive
image-text loss on the towers' pooled features, λ = 0.5.

``model.attn_implementation="auto"``: cuDNN on a GPU where the shapes allow, XLA elsewhere.
Data: ``shapes`` is a placeholder until #4; the benchmark builds synthetic batches of the
configured shapes and never reads data.

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
            raise ValueError(
                f"unknown argument {a!r} of configs/fusion_vitb16_bert.py; known: {_ARGS}"
            )

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

    # Placeholder source until #4; image_size and max_len are the synthetic batches' shapes.
    c.data = ml_collections.ConfigDict({
        "name": "shapes",
        "image_size": 224,
        "max_len": 64,
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
            "activation": "gelu", "layer_norm_eps": 1e-6,
        },
        "text": {
            "kind": "text", "variant": "B", "vocab_size": 30_522, "max_len": 512,
            "init_from": "",  # HF folder or mmjax checkpoint/workdir
            "type_vocab_size": 2, "pre_norm": False, "embed_norm": True, "final_norm": False,
            "causal": False, "pool": "cls", "pooler": True, "activation": "gelu",
            "layer_norm_eps": 1e-12,
            # "right": masks are right padding, given to attention as key lengths (cuDNN's own
            # padding mask, no [B, 1, T, T] bias); "mask": any 0/1 mask as a boolean mask.
            "padding": "right",
        },
        "fusion": {"kind": "co_attention", "width": 768, "depth": 2, "num_heads": 12,
                   "mlp_dim": 3072},
        "heads": {
            "answer": {"kind": "classification", "num_classes": 3129},
            "itc": {"kind": "contrastive", "embed_dim": 256},
        },
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
    c.losses = ml_collections.ConfigDict({"answer": 1.0, "itc": 0.5})

    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",
        "lr": 1e-4,
        "warmup_steps": 1_000,
        "decay": "cosine",
        "weight_decay": 0.01,
        "b1": 0.9,
        "b2": 0.999,
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
        c.model.fusion.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64})
        c.model.heads.answer.num_classes = 10
        c.model.heads.itc.embed_dim = 16
    c.lock()
    return c
