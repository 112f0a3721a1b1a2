"""Pieces every config file shares: argument parsing, the run keys, model options, the
optimizer, the embedded shapes data and the small fused model that learns it.

A config file (``configs/*.py``, or one of your own anywhere) imports this module
(``from mmjax import config``) and overrides what differs, so a recipe reads as its differences
from these defaults. A config file is Python: it runs with the rights of whoever trains with it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections


def parse_args(arg: str | None, known: tuple[str, ...], config: str) -> list[str]:
    """``"a,b"`` → ``["a", "b"]``; an unknown argument is an error naming ``config``."""
    args = [a for a in (arg or "").split(",") if a]
    for a in args:
        if a not in known:
            raise ValueError(f"unknown argument {a!r} of {config}; known: {known}")
    return args


def load_file(path: str | Path, name: str = "") -> ModuleType:
    """A config file as a module, read from ``path`` (a sibling config: ``Path(__file__)
    .with_name("folder.py")``). The import path is left as it is, so a file that happens to lie
    beside the config (an ``optax.py``) is never imported in its place."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or f"mmjax_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_modules(config: Any) -> list[str]:
    """Imports the modules ``config.imports`` names (a list, or names separated by commas):
    modules of your own that register parts (a modality, a tower, an op). Training and every
    command that reads a run back call it, so the parts are known wherever the run is used.
    Returns the names; a module that cannot be imported fails naming the key."""
    value = config.get("imports", "") if hasattr(config, "get") else ""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value or ())]
    for name in (n for n in names if n):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"config.imports names {name!r}, which cannot be imported: "
                              f"{e}") from e
    return [n for n in names if n]


def run(*, total_steps: int, batch_size: int, eval_batch_size: int, log_every: int = 50,
        eval_every: int = 200, checkpoint_every: int = 200) -> ml_collections.ConfigDict:
    """The keys every run has: seed, schedule of logs/evals/checkpoints, parallelism."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = total_steps
    c.batch_size = batch_size  # global, over all devices
    c.eval_batch_size = eval_batch_size
    c.log_every = log_every
    c.eval_every = eval_every
    c.checkpoint_every = checkpoint_every
    c.init_from = ""  # a training workdir or checkpoint to start from; "" = fresh
    c.init_subtrees = ""  # params subtrees taken from init_from; "" = all but heads
    c.imports = ""  # modules to import first, e.g. your own modality: "my_pkg.points"
    c.grad_accum_steps = 1
    # Knowledge distillation from a trained run (mmjax/trainer/distill.py): teacher = its
    # workdir ("" = off); the student's loss gets weight·T²·KL(teacher ‖ student) on the
    # classification head `task` ("" = the first); step: "" (newest), N or "best".
    c.distill = ml_collections.ConfigDict(
        {"teacher": "", "weight": 1.0, "temperature": 1.0, "step": "", "task": ""})
    # mode "pmap" or "mesh"; fsdp: size of the parameter-sharding mesh axis (mesh only)
    c.parallel = ml_collections.ConfigDict({"mode": "pmap", "fsdp": 1})
    return c


def model_options(**overrides: Any) -> dict[str, Any]:
    """``config.model``'s model-wide keys (``layers.Options``)."""
    return {
        "dropout": 0.0,  # the one dropout rate of the whole model
        "dtype": "float32",  # compute dtype; params stay float32
        "attn_implementation": "",  # "" = XLA; "auto" = cuDNN on a GPU where shapes allow
        "remat": "",  # a jax.checkpoint_policies name, e.g. "nothing_saveable"
        "scan_layers": False,  # each encoder's layers as one nn.scan over stacked params
        "scan_unroll": 0,  # with scan_layers: layers per loop iteration, 0 = all (no loop)
        "gpu_rewrites": False,  # opt-in GPU layout rewrites, same math (models/gpu_rewrites.py)
        # training only: drop each modality of an example with this probability (never all);
        # the fusion puts a learned token in its place
        "modality_dropout": 0.0,
        # with modality_dropout > 0: the loss on each example's complete input, added with
        # this weight beside the loss on its dropped view (0 = dropped view only)
        "complete_input_weight": 1.0,
        # with modality_dropout > 0: the fraction of total_steps trained on complete inputs
        # alone before dropped views enter the loss
        "modality_dropout_start": 0.5,
        **overrides,
    }


def optimizer(**overrides: Any) -> ml_collections.ConfigDict:
    """AdamW with linear warmup, cosine decay, decoupled weight decay and global-norm clipping."""
    return ml_collections.ConfigDict({
        "name": "adamw",
        "lr": 1e-3,
        "warmup_steps": 100,
        "decay": "cosine",
        "weight_decay": 1e-4,
        "b1": 0.9,
        "b2": 0.999,
        "clip_norm": 1.0,
        "freeze": "",  # regex of parameter paths that get no update, e.g. "^image/"
        "mu_dtype": "",  # "bfloat16": Adam's first moment in bf16
        "layer_decay": 0.0,  # layer-wise lr decay over tower layers, e.g. 0.75; 0 = off
        **overrides,
    })


def shapes_data(text: str = "question", variant: str = "") -> ml_collections.ConfigDict:
    """The embedded ``shapes`` data (mmjax/data/shapes.py), generated offline."""
    return ml_collections.ConfigDict({
        "name": "shapes",
        "image_size": 32,
        "max_len": 12,
        "text": text,  # "question" or "caption"
        "variant": variant,  # "", "image_only" or "text_only"
        "num_train": 50_000,
        "num_val": 2_000,
        "num_test": 2_000,
    })


def shapes_model(width: int = 64, *, text_pool: str = "cls") -> dict[str, Any]:
    """Embedding-only towers (a ViT patch embedding, patch 8, and token embeddings) fused by two
    cross-attention layers with the text as query: the model that learns the shapes questions.

    Depth 0 on purpose: on the shapes data, self-attention layers in the towers blend the two
    objects' features into every token at initialisation and the model sits on a plateau
    (question type learned, colour not bound to shape; docs/recipes.md, the learning tests).
    """
    return {
        "encoders": {
            "image": {
                "kind": "vit", "variant": "mu/8", "width": width, "depth": 0, "num_heads": 4,
                "mlp_dim": 4 * width, "pool": "gap",
                "init_from": "",  # a Hugging Face folder or an mmjax checkpoint/workdir
            },
            "text": {
                "kind": "text", "variant": "mu", "width": width, "depth": 0, "num_heads": 4,
                "mlp_dim": 4 * width, "vocab_size": 0, "max_len": 16, "pool": text_pool,
                "init_from": "",  # vocab_size 0: from the data's tokenizer
            },
        },
        "fusion": {"kind": "cross_attention", "width": width, "depth": 2, "num_heads": 4},
    }


def tiny(c: ml_collections.ConfigDict, *, total_steps: int = 20, batch_size: int = 16,
         eval_batch_size: int = 64, every: int = 10, num_train: int = 512,
         num_eval: int = 96) -> None:
    """Shrinks a run for tests: few steps, small batches, small embedded splits."""
    c.total_steps = total_steps
    c.batch_size = batch_size
    c.eval_batch_size = eval_batch_size
    c.log_every = max(every // 2, 1)
    c.eval_every = every
    c.checkpoint_every = every
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(total_steps // 4, 1))
    if c.data.name == "shapes":
        c.data.num_train = num_train
        c.data.num_val = num_eval
        c.data.num_test = num_eval
