"""A trained run's answers computed without mmjax's inference code, for tests to compare with.

The params are read from the checkpoint with Orbax itself, the model comes from the trainer's
``loop.setup`` on the run's config, the batch from the data pipeline, and the probabilities are
``jax.nn.softmax`` of the model's logits: predict, evaluate and export are never called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmjax.data import pipeline
from mmjax.trainer import loop


def folder_config(data: Path) -> ml_collections.ConfigDict:
    """``configs/folder.py:tiny`` on the folder dataset at ``data``."""
    from configs import folder

    c = folder.get_config("tiny")
    c.data.path = str(data)
    return c


def restored_params(workdir: Path, step: int) -> Any:
    """The params of checkpoint ``step`` as numpy arrays, read with Orbax alone."""
    path = (Path(workdir) / "checkpoints" / str(step) / "state").absolute()
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    # Restored onto this process's one device, whatever layout training saved from.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          tree, is_leaf=lambda m: hasattr(m, "shape"))
    state = ocp.StandardCheckpointer().restore(path, target)
    assert int(state["step"]) == step
    # No BatchNorm statistics, no LoRA adapters: the params alone are the model's variables.
    assert not state["model_state"] and state["adapters"] is None
    return jax.tree.map(np.asarray, state["params"])


def split_batch(setup: loop.Setup, split: str) -> dict[str, Any]:
    """All of ``split`` in one batch of the pipeline's eval preprocessing, no padding rows."""
    data = Path(setup.config.data.path)
    n = len((data / f"{split}.jsonl").read_text().splitlines())
    batch = next(iter(pipeline.eval_batches(setup.config.data, split, batch_size=n,
                                            tokenizer=setup.tokenizer)))
    assert batch.pop("valid").all()
    return batch


def class_probs(setup: loop.Setup, params: Any, batch: dict[str, Any],
                drop: tuple[str, ...] = ()) -> np.ndarray:
    """The ``answer`` head's class probabilities on ``batch``: softmax of its logits, with the
    modalities in ``drop`` marked absent in every row."""
    inputs = {k: v for k, v in batch.items() if k != "label"}
    rows = len(batch["label"])
    present = {m: np.asarray(v, bool) for m, v in batch.get("present", {}).items()}
    present.update({m: np.zeros(rows, bool) for m in drop})
    if present:
        inputs["present"] = present
    out = setup.model.apply({"params": params}, inputs)
    return np.asarray(jax.nn.softmax(np.asarray(out["answer"]["logits"], np.float32), axis=-1))


def predicted_scores(path: Path, labels: list[str]) -> np.ndarray:
    """``mmjax.predict``'s JSONL output as [N, classes], columns in ``labels`` order; every
    row must score every label (predict run with ``top_k`` = the number of classes)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    out = np.zeros((len(rows), len(labels)))
    for i, row in enumerate(rows):
        assert sorted(p["label"] for p in row["predictions"]) == sorted(labels), row
        for p in row["predictions"]:
            out[i, labels.index(p["label"])] = p["score"]
    return out


def xent(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of the true labels."""
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))
