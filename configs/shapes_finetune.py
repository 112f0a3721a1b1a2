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

With ``init_from`` empty this config trains from scratch, which is that
baseline with this config's schedule. Evaluator: question-answer accuracy by answer string,
overall and per question type.

Arguments (comma-separated after the path):
  lora   train LoRA adapters (rank 8) on the attention and MLP kernels plus the answer head
         instead of every parameter; the merged params are exported by
         ``mmjax.optim.lora.merged_params_from_workdir``
  lit    freeze the image tower (LiT): only text, fusion and the head train
  tiny   a few steps on small splits, for tests
"""

from __future__ import annotations

import ml_collections

from mmjax import config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config.parse_args(arg, ("lora", "lit", "tiny"), "configs/shapes_finetune.py")

    c = config.run(total_steps=200, batch_size=128, eval_batch_size=500, eval_every=100,
                   checkpoint_every=100)
    c.init_subtrees = "image,text,fusion"  # init_from: the pretraining workdir
    c.data = config.shapes_data()
    c.model = ml_collections.ConfigDict({
        **config.shapes_model(),
        "heads": {"answer": {"kind": "classification", "num_classes": 0}},
        **config.model_options(),
    })
    c.losses = ml_collections.ConfigDict({"answer": 1.0})
    c.evals = ml_collections.ConfigDict({"qa": {"kind": "qa", "task": "answer"}})
    c.optimizer = config.optimizer(lr=2e-3, warmup_steps=20)
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
        config.tiny(c, total_steps=10, num_train=256, num_eval=64)
    c.lock()
    return c
