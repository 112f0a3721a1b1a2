r"""ViT-B/16 + BERT-base fused by two co-attention layers, with classification and contrastive
losses; the second benchmark workload.

    python -m mmjax.benchmark --config configs/fusion_vitb16_bert.py --batch_size 256
    python -m mmjax.benchmark --config configs/fusion_vitb16_bert.py:tiny --steps 3   # CPU

Image tower: ViT-B/16 at 224 px, 196 patch tokens without a class token (an even length that
cuDNN's fused attention accepts), mean-pooled. Text tower: BERT-base (width 768,
12 layers, 12 heads, MLP 3072, post-LN, embedding LN, tanh pooler on [CLS], vocabulary 30522,
512 position embeddings) on 64 tokens. Fusion: two ViLBERT-style co-attention layers of width
768 (each stream attends to itself and to the other); the fused feature is the two streams'
masked means, concatenated. Tasks: ``answer``, a classification over 3129 classes (the size of
VQAv2's usual answer vocabulary) from the fused feature, λ = 1; ``itc``, a 256-d contrastive
image-text loss on the towers' pooled features, λ = 0.5.

``model.attn_implementation="auto"``: cuDNN on a GPU where the shapes allow, XLA elsewhere.
Layers stacked and ``gpu_rewrites`` on, as in ``clip_vitb16.py``. The benchmark builds synthetic
batches of the configured shapes and never reads data.

Arguments (comma-separated after the path):
  tiny   a narrow two-layer float32 model on 32-px images and 16 tokens that runs on a CPU in
         seconds
"""

from __future__ import annotations

import ml_collections

from mmjax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, ("tiny",), "configs/fusion_vitb16_bert.py")

    c = config.run(total_steps=10_000, batch_size=256, eval_batch_size=256, log_every=100,
                   eval_every=1_000, checkpoint_every=1_000)
    c.data = config.shapes_data()  # the benchmark uses only the shapes below
    c.data.image_size = 224
    c.data.max_len = 64
    c.model = ml_collections.ConfigDict({
        "encoders": {
            "image": {
                "kind": "vit", "variant": "B/16", "class_token": False, "pool": "gap",
                "activation": "gelu", "layer_norm_eps": 1e-6, "init_from": "",
            },
            "text": {
                "kind": "text", "variant": "B", "vocab_size": 30_522, "max_len": 512,
                "type_vocab_size": 2, "pre_norm": False, "embed_norm": True, "final_norm": False,
                "causal": False, "pool": "cls", "pooler": True, "activation": "gelu",
                "layer_norm_eps": 1e-12, "init_from": "",
            },
        },
        "fusion": {"kind": "co_attention", "width": 768, "depth": 2, "num_heads": 12,
                   "mlp_dim": 3072},
        "heads": {
            "answer": {"kind": "classification", "num_classes": 3129},
            "itc": {"kind": "contrastive", "embed_dim": 256},
        },
        **config.model_options(dtype="bfloat16", attn_implementation="auto", scan_layers=True,
                               gpu_rewrites=True),
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0, "itc": 0.5})
    c.optimizer = config.optimizer(lr=1e-4, warmup_steps=1_000, weight_decay=0.01)

    if "tiny" in args:
        config.tiny(c, batch_size=8, eval_batch_size=8)
        c.model.dtype = "float32"  # bf16 is emulated on a CPU and compiles slower there
        c.data.image_size = 32
        c.data.max_len = 16
        c.model.encoders.image.update({"variant": "mu/8", "width": 32, "depth": 2,
                                       "num_heads": 2, "mlp_dim": 64})
        c.model.encoders.text.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64,
                                      "vocab_size": 256, "max_len": 16})
        c.model.fusion.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64})
        c.model.heads.answer.num_classes = 10
        c.model.heads.itc.embed_dim = 16
    c.lock()
    return c
