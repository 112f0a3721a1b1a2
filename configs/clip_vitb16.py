r"""CLIP ViT-B/16 (open_clip's ``ViT-B-16`` architecture), for the benchmark and training.

    python -m mmjax.benchmark --config configs/clip_vitb16.py --batch_size 256
    python -m mmjax.benchmark --config configs/clip_vitb16.py:tiny --steps 3   # CPU, seconds

Image tower: ViT-B/16 at 224 px (width 768, 12 layers, 12 heads, MLP 3072, GELU, LN eps 1e-5,
an LN before the transformer as open_clip's ``ln_pre``). Text tower: width 512, 8 heads,
12 layers, MLP 2048, vocabulary 49408, causal mask, pre-LN with a final LN, pooled at the
end-of-text token (the last valid one, ``pool="last"``). Head: 512-d projections of both pooled
features and a learnt temperature; loss: the symmetric contrastive loss (``infonce``).

Two deliberate departures from open_clip, both for cuDNN's fused attention, which refused 197
tokens, and 77 tokens under a causal mask, on an H200 (docs/performance.md):

* no class token, ``pool="gap"``: 196 patch tokens (even) instead of 197, pooled by their mean
  (big_vision's CLIP/SigLIP recipe) instead of open_clip's class token;
* the 77-token context is padded to 80 (``data.max_len``; 80 position embeddings): a text has at
  most 77 tokens and the mask marks the rest as padding. Under the causal mask no valid token
  attends to a later position, so the valid tokens and the pooled end-of-text feature are what a
  77-token model computes; the cost is 80/77 of the text tower's tokens (+0.2 GFLOP/sample).

``model.attn_implementation="auto"`` resolves per call to cuDNN on a GPU where the shapes allow
and to XLA elsewhere (mmjax/models/layers.py ``resolve_attention``), so this config runs as is on
a CPU. Layers are stacked (``scan_layers``, no loop) and the opt-in ``gpu_rewrites`` are on: the
layout scripts/gpu_bench.sh times (docs/performance.md); train on your own image-text
folder with ``--config.data.name=folder --config.data.path=DIR``. The benchmark never reads data,
it builds synthetic batches of the configured shapes.

Arguments (comma-separated after the path):
  tiny   a narrow two-layer float32 model on 32-px images and 16 tokens that runs on a CPU in
         seconds
"""

from __future__ import annotations

import ml_collections

from mmjax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, ("tiny",), "configs/clip_vitb16.py")

    c = config.run(total_steps=10_000, batch_size=256, eval_batch_size=256, log_every=100,
                   eval_every=1_000, checkpoint_every=1_000)
    c.data = config.shapes_data(text="caption")  # the benchmark uses only the shapes below
    c.data.image_size = 224
    c.data.max_len = 80  # CLIP's 77-token context padded to a multiple of 8 (see above)
    c.model = ml_collections.ConfigDict({
        "encoders": {
            "image": {
                "kind": "vit", "variant": "B/16", "class_token": False, "pool": "gap",
                "embed_norm": True, "final_norm": True, "activation": "gelu",
                "layer_norm_eps": 1e-5, "init_from": "",
            },
            "text": {
                "kind": "text", "variant": "M",  # width 512, 12 layers, MLP 2048, 8 heads
                "vocab_size": 49_408, "max_len": 80, "type_vocab_size": 0,
                "pre_norm": True, "embed_norm": False, "final_norm": True, "causal": True,
                "pool": "last", "activation": "gelu", "layer_norm_eps": 1e-5, "init_from": "",
            },
        },
        "fusion": {"kind": "none"},
        "heads": {"clip": {"kind": "contrastive", "embed_dim": 512}},
        **config.model_options(dtype="bfloat16", attn_implementation="auto", scan_layers=True,
                               gpu_rewrites=True),
    })
    c.losses = ml_collections.ConfigDict({"clip": 1.0})
    c.optimizer = config.optimizer(lr=5e-4, warmup_steps=1_000, weight_decay=0.2, b2=0.98)

    if "tiny" in args:
        config.tiny(c, batch_size=8, eval_batch_size=8)
        c.model.dtype = "float32"  # bf16 is emulated on a CPU and compiles slower there
        c.data.image_size = 32
        c.data.max_len = 16
        c.model.encoders.image.update({"variant": "mu/8", "width": 32, "depth": 2,
                                       "num_heads": 2, "mlp_dim": 64})
        c.model.encoders.text.update({"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64,
                                      "vocab_size": 256, "max_len": 16})
        c.model.heads.clip.embed_dim = 16
    c.lock()
    return c
