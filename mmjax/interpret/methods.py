"""The explanation methods on one batch: relevance, rollout, integrated gradients, occlusion.

Each returns ``{"probs" [B, C], "target" [B], "scores": {modality: array}}`` where a modality's
scores are per token ([B, T]: relevance, rollout, text occlusion), per pixel ([B, H, W]: image
integrated gradients, summed over channels), per input feature (audio) or per block, larger =
more evidence for the target class (the predicted one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax import modalities
from mmjax.interpret import capture, gradients, layout, relevance
from mmjax.models.multimodal import MultimodalModel

Array = jax.Array
METHODS = ("relevance", "rollout", "integrated_gradients", "occlusion")
TEXT_POINT = "token_embeddings"


def _by_tokens(model: MultimodalModel) -> list[str]:
    """The modalities explained per token, through the tower's token embeddings."""
    return [m for m in model.encoders if modalities.get(m).explained_as == "tokens"]


def attention_method(model: MultimodalModel, task: str, variables: Any, batch: Any,
                     perturb: Any, *, gradient: bool) -> dict[str, Any]:
    """Chefer relevance (``gradient=True``) or rollout scores of every modality's tokens."""
    cap = capture.capture(model, task, variables, batch, perturb)
    rules = relevance.Rules(cap["attention"], cap["grads"], gradient)
    towers: Any = model.apply(variables, batch, method="encode")
    b = cap["probs"].shape[0]
    sizes = {m: f["tokens"].shape[1] for m, f in towers.items()}
    rs = {m: relevance.tower(rules, m, sizes[m], b) for m in towers}
    rows = {m: layout.tower_rows(model, m, batch, sizes[m]) for m in towers}
    fuser = layout.fuser(model)
    frows = None if fuser is None else fuser.pool_rows(
        {m: f["mask"] for m, f in towers.items()}, sizes, b)
    scores = relevance.propagate(rules, fuser, rs, rows, frows)
    return {"probs": cap["probs"], "target": cap["target"], "scores": scores}


def _target_prob(model: MultimodalModel, task: str, variables: Any, target: Array):
    fn = capture.probs_fn(model, task)

    def prob(batch: Any, perturb: Any) -> Array:
        p = fn(variables, batch, perturb)
        return jnp.take_along_axis(p, target[:, None], axis=1)[:, 0]
    return prob


def _predict(model: MultimodalModel, task: str, variables: Any, batch: Any, perturb: Any
             ) -> tuple[Array, Array]:
    probs = capture.probs_fn(model, task)(variables, batch, perturb)
    return probs, jnp.argmax(probs, -1)


def integrated_gradients(model: MultimodalModel, task: str, variables: Any, batch: Any,
                         perturb: Any, *, steps: int = 32) -> dict[str, Any]:
    """Integrated gradients of the predicted class's probability on each modality's input
    (pixels, token embeddings, spectrogram), zero baselines, the others held at their values."""
    probs, target = _predict(model, task, variables, batch, perturb)
    prob = _target_prob(model, task, variables, target)
    scores = {}
    for m in model.encoders:
        if m in _by_tokens(model):
            emb = _embeddings(model, variables, batch, perturb, m)
            path = f"{m}/{TEXT_POINT}"
            on_tokens = lambda z, emb=emb, path=path: prob(
                batch, capture.with_perturbation(perturb, path, z - emb))
            scores[m] = gradients.integrated_gradients(on_tokens, emb, steps=steps).sum(-1)
        else:
            modality = modalities.get(m)
            on_input = lambda z, m=m, modality=modality: prob(
                {**batch, m: modality.with_explained(batch[m], z)}, perturb)
            attr = gradients.integrated_gradients(on_input, modality.explained_value(batch[m]),
                                                  steps=steps)
            scores[m] = attr.sum(-1) if attr.ndim == 4 else attr  # image: over channels
    return {"probs": probs, "target": target, "scores": scores}


def _embeddings(model: MultimodalModel, variables: Any, batch: Any, perturb: Any, m: str
                ) -> Array:
    """The text tower's token embeddings [B, L, D] (the integrated-gradients input)."""
    _, state = model.apply(variables, batch, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, name: mdl.name == "token_embedding")
    return state["intermediates"][m]["token_embedding"]["__call__"][0]


def occlusion(model: MultimodalModel, task: str, variables: Any, batch: Any, perturb: Any,
              *, patch: int = 8, block: tuple[int, int] = (16, 16)) -> dict[str, Any]:
    """Drop in the predicted class's probability when one part is replaced by zeros: image
    patches of ``patch`` pixels, single tokens of a modality explained per token (embedding set
    to zero), and blocks of ``block`` over the first two axes of any other input (an audio
    spectrogram as the batch lays it out, a series' [time, channels])."""
    probs, target = _predict(model, task, variables, batch, perturb)
    prob = _target_prob(model, task, variables, target)
    full = jnp.take_along_axis(probs, target[:, None], axis=1)[:, 0]
    scores = {}
    for m in model.encoders:
        if m in _by_tokens(model):
            emb = _embeddings(model, variables, batch, perturb, m)
            path = f"{m}/{TEXT_POINT}"
            length = emb.shape[1]

            def drop_token(i: Array, emb: Array = emb, path: str = path) -> Array:
                keep = (jnp.arange(emb.shape[1]) != i).astype(emb.dtype)[None, :, None]
                delta = emb * keep - emb
                return full - prob(batch, capture.with_perturbation(perturb, path, delta))
            scores[m] = jax.lax.map(drop_token, jnp.arange(length)).T
            continue
        modality = modalities.get(m)
        x = modality.explained_value(batch[m])
        ph, pw = (patch, patch) if x.ndim == 4 else block
        rows, cols = -(-x.shape[1] // ph), -(-x.shape[2] // pw)

        def drop_block(k: Array, x: Array = x, m: str = m, ph: int = ph, pw: int = pw,
                       cols: int = cols, modality: Any = modality) -> Array:
            r, c = k // cols, k % cols
            ii = jnp.arange(x.shape[1])[:, None]
            jj = jnp.arange(x.shape[2])[None, :]
            inside = (ii // ph == r) & (jj // pw == c)
            inside = inside.reshape(1, *inside.shape, *([1] * (x.ndim - 3)))
            dropped = modality.with_explained(batch[m], jnp.where(inside, 0.0, x))
            return full - prob({**batch, m: dropped}, perturb)
        scores[m] = jax.lax.map(drop_block, jnp.arange(rows * cols)).T.reshape(-1, rows, cols)
    return {"probs": probs, "target": target, "scores": scores}


def run_method(method: str, model: MultimodalModel, task: str, variables: Mapping[str, Any],
               batch: Mapping[str, Any], perturb: Any, **kwargs: Any) -> dict[str, Any]:
    if method in ("relevance", "rollout"):
        return attention_method(model, task, variables, batch, perturb,
                                gradient=method == "relevance")
    if method == "integrated_gradients":
        return integrated_gradients(model, task, variables, batch, perturb, **kwargs)
    if method == "occlusion":
        return occlusion(model, task, variables, batch, perturb, **kwargs)
    raise ValueError(f"unknown explanation method {method!r}; known: {METHODS}")
