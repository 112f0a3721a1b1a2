"""How a trained model answers new inputs: the batch entries a head reads, and one traceable
function per head kind (class probabilities, regression values, caption ids, embeddings), so
that ``predict``, ``export`` and ``explain`` compute the same thing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import pipeline
from mmjax.inference import quantize as quantize_lib
from mmjax.models.heads import CONTRASTIVE_KINDS
from mmjax.models.multimodal import MultimodalModel
from mmjax.pp import video as video_pp
from mmjax.trainer.runs import Run, RunError


def input_names(model: MultimodalModel, task: str, kind: str) -> list[str]:
    """The batch entries (modalities) the answer of ``task`` reads: a caption head reads its
    image alone, every other head all the towers."""
    if kind == "caption":
        return [model.head(task).modality]
    if kind in CONTRASTIVE_KINDS:
        return [m for m in model.head(task).modalities if m in model.encoders]
    return list(model.encoders)


def output_fn(model: MultimodalModel, task: str, kind: str
              ) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, jax.Array]]:
    """``fn(variables, inputs) -> {name: array}``, traceable: class probabilities
    ``{"probs"}`` [B, C] (float32 softmax), regression ``{"values"}``, generated caption ids
    ``{"tokens"}`` [B, L], or the contrastive embeddings ``{"<modality>_embeds"}``. The model
    itself scales what the pipeline sends (uint8 pixels)."""

    def fn(variables: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, jax.Array]:
        variables = quantize_lib.dequantize(variables)
        out: Any
        if kind in CONTRASTIVE_KINDS:
            out = model.apply(variables, inputs, task=task, method="embed")
            return out
        if kind == "caption":
            out = model.apply(variables, inputs, task=task, method="generate")
            return {"tokens": out}
        out = model.apply(variables, inputs)
        out = out[task]
        if kind == "classification":
            return {"probs": jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)}
        return {"values": out["predictions"].astype(jnp.float32)}

    return fn


def model_inputs(batch: Mapping[str, Any], names: list[str], *,
                 present: bool = True) -> dict[str, Any]:
    """The entries of a pipeline batch that the model reads (labels and ``valid`` dropped),
    with ``batch["present"]`` for those of them that some examples lack (``present=False``
    leaves it out: an exported function takes the arrays alone)."""
    missing = [n for n in names if n not in batch]
    if missing:
        raise RunError(f"the inputs have no {missing[0]!r} (they hold {sorted(batch)})")
    out = {n: batch[n] for n in names}
    given = {m: v for m, v in (batch.get("present") or {}).items() if m in names}
    if present and given:
        out["present"] = given
    return out


def first_rows(run: Run, split: str, n: int) -> dict[str, Any]:
    """The first ``n`` examples of ``split`` (fewer if it is smaller), preprocessed as
    evaluation does with one view per example (an exported function takes one clip), without
    padding rows."""
    batch = next(iter(pipeline.eval_batches(video_pp.single_view(run.config.data), split,
                                            batch_size=n, tokenizer=run.tokenizer)))
    keep = np.asarray(batch.pop("valid")) > 0
    return jax.tree.map(lambda x: np.asarray(x)[keep], batch)
