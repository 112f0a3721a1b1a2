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

from mmjax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, ("tiny",), "configs/shapes_caption.py")

    c = config.run(total_steps=500, batch_size=128, eval_batch_size=500, eval_every=250,
                   checkpoint_every=250)
    c.init_subtrees = "image"  # init_from: e.g. a shapes_pretrain workdir's image tower
    c.data = config.shapes_data(text="caption")
    width = 64
    model = config.shapes_model(width)
    model["encoders"]["text"]["depth"] = 1
    c.model = ml_collections.ConfigDict({
        "encoders": model["encoders"],
        "fusion": {"kind": "none"},
        "heads": {
            "caption": {"kind": "caption", "width": width, "depth": 2, "num_heads": 4,
                        "mlp_dim": 4 * width, "vocab_size": 0, "max_len": 16},
            "itc": {"kind": "contrastive", "embed_dim": 64},
        },
        **config.model_options(),
    })
    c.losses = ml_collections.ConfigDict({"caption": 1.0, "itc": 0.5})
    c.evals = ml_collections.ConfigDict({
        "greedy": {"kind": "caption", "task": "caption", "max_len": 12},
        "retrieval": {"kind": "retrieval", "task": "itc"},
    })
    c.optimizer = config.optimizer(lr=2e-3, freeze="^image/")  # LiT: the image tower is locked

    if "tiny" in args:
        config.tiny(c, total_steps=10, num_train=256, num_eval=64)
    c.lock()
    return c
