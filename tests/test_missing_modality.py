"""Training for missing modalities: the complete-input term beside modality dropout.

With ``model.modality_dropout`` > 0 the train loss is the loss on every example's complete
input alone until ``model.modality_dropout_start`` of the run, then the loss on the dropped
view plus ``model.complete_input_weight`` times the complete-input loss. The tests
compute that second loss outside the train step (the model's logits with no modality dropped,
optax's cross-entropy) and check how the step adds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmjax import config
from mmjax.models.multimodal import MultimodalModel, build_model
from mmjax.optim import weighting
from mmjax.trainer import loop
from mmjax.trainer import step as step_lib
from mmjax.trainer.state import Task
from tests.test_modalities import _random_params

B, CLASSES = 8, 5


def _setup(p: float, w: float | None, lam: float = 1.0, **more):
    """A small image + text model with cross-attention fusion, a random batch with labels."""
    extra = {"modality_dropout": p, **more}
    if w is not None:
        extra["complete_input_weight"] = w
    model = build_model({
        "encoders": {
            "image": {"kind": "vit", "variant": "mu/8", "width": 16, "depth": 0, "num_heads": 2,
                      "mlp_dim": 32, "pool": "gap"},
            "text": {"kind": "text", "variant": "mu", "width": 16, "depth": 0, "num_heads": 2,
                     "mlp_dim": 32, "vocab_size": 40, "max_len": 6},
        },
        "fusion": {"kind": "cross_attention", "width": 16, "depth": 1, "num_heads": 2,
                   "mlp_dim": 32},
        "heads": {"answer": {"kind": "classification", "num_classes": CLASSES}},
        **extra,
    })
    rng = np.random.default_rng(1)
    batch = {"image": rng.normal(size=(B, 16, 16, 3)).astype(np.float32),
             "text": {"ids": rng.integers(5, 40, (B, 6)).astype(np.int32),
                      "mask": np.ones((B, 6), np.int32)},
             "label": rng.integers(0, CLASSES, B)}
    params = _random_params(model.clone(modality_dropout=0.0), batch)
    tasks = (Task("answer", "softmax_xent", lam,
                  {"kind": "classification", "num_classes": CLASSES}),)
    weights = weighting.from_config(ml_collections.ConfigDict({"losses": {"answer": lam}}))
    return model, batch, params, tasks, weights


def _complete_xent(model: MultimodalModel, params: dict, batch: dict) -> float:
    """Mean cross-entropy of the labels under the model with no modality dropped."""
    full = model.clone(modality_dropout=0.0)
    logits = full.apply({"params": params}, batch, train=True)["answer"]["logits"]
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean())


def _step_loss(model, batch, params, tasks, weights):
    rng = jax.random.PRNGKey(3)
    loss, (metrics, _) = step_lib.loss_fn(params, {}, batch, rng, jnp.int32(0), model=model,
                                          tasks=tasks, weights=weights, train=True)
    return float(loss), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("w, lam", [(1.0, 1.0), (0.4, 2.5)])
def test_complete_input_term_is_added_with_its_weight(w, lam):
    model, batch, params, tasks, weights = _setup(0.5, w, lam)
    loss, metrics = _step_loss(model, batch, params, tasks, weights)
    complete = _complete_xent(model, params, batch)
    np.testing.assert_allclose(metrics["complete_loss"], w * lam * complete, rtol=1e-5)
    # The dropped view is the usual weighted task loss; the total adds the two.
    np.testing.assert_allclose(loss, lam * metrics["answer_loss"] + w * lam * complete,
                               rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    # Modality dropout did drop something in this batch: the dropped view's loss differs.
    assert abs(metrics["answer_loss"] - complete) > 1e-3


def test_complete_input_term_is_on_by_default_and_off_at_zero():
    assert config.model_options()["complete_input_weight"] == 1.0
    model, batch, params, tasks, weights = _setup(0.5, None)
    loss, metrics = _step_loss(model, batch, params, tasks, weights)
    np.testing.assert_allclose(metrics["complete_loss"], _complete_xent(model, params, batch),
                               rtol=1e-5)
    model, batch, params, tasks, weights = _setup(0.5, 0.0)
    loss, metrics = _step_loss(model, batch, params, tasks, weights)
    assert "complete_loss" not in metrics
    np.testing.assert_allclose(loss, metrics["answer_loss"], rtol=1e-6)
    # Without modality dropout there is nothing to complete: no second pass.
    model, batch, params, tasks, weights = _setup(0.0, 1.0)
    loss, metrics = _step_loss(model, batch, params, tasks, weights)
    assert "complete_loss" not in metrics
    np.testing.assert_allclose(loss, _complete_xent(model, params, batch), rtol=1e-5)


@pytest.mark.slow
def test_complete_input_term_under_gradient_accumulation():
    """Two micro-batches carry the term too: its mean over them is the whole batch's."""
    model, batch, params, tasks, weights = _setup(0.5, 0.7)
    rng, step = jax.random.PRNGKey(5), jnp.int32(0)
    _, metrics, _ = step_lib.accumulated_grads(params, {}, batch, rng, step, model=model,
                                                 tasks=tasks, weights=weights, accum_steps=2)
    # The micro-batches draw their own modality dropout; the complete-input part is
    # deterministic (no other dropout in this model), so it compares exactly.
    full = model.clone(modality_dropout=0.0)

    def complete(prm, mb):
        logits = full.apply({"params": prm}, mb, train=True)["answer"]["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, mb["label"]).mean()

    want = 0.7 * complete(params, batch)
    np.testing.assert_allclose(metrics["complete_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], metrics["answer_loss"] + float(want), rtol=1e-5)


@pytest.mark.parametrize("w", [0.4, 0.0])
def test_dropped_view_enters_the_loss_from_its_start_step(w):
    """Before ``dropped_from`` the step trains on complete inputs alone (weight 1, whatever
    ``complete_input_weight``); from it on, on the dropped view plus w times the complete one."""
    model, batch, params, tasks, weights = _setup(0.5, w)
    complete = _complete_xent(model, params, batch)
    rng = jax.random.PRNGKey(3)

    def at(step: int) -> tuple[float, dict]:
        loss, (metrics, _) = step_lib.loss_fn(params, {}, batch, rng, jnp.int32(step),
                                              model=model, tasks=tasks, weights=weights,
                                              train=True, dropped_from=7)
        return float(loss), {k: float(v) for k, v in metrics.items()}

    before, m_before = at(6)
    np.testing.assert_allclose(before, complete, rtol=1e-5)
    np.testing.assert_allclose(m_before["complete_loss"], complete, rtol=1e-5)
    after, m_after = at(7)
    np.testing.assert_allclose(m_after["complete_loss"], w * complete, rtol=1e-5)
    np.testing.assert_allclose(after, m_after["answer_loss"] + w * complete, rtol=1e-5)
    # The dropped view differs from the complete one, so the two phases give different losses.
    assert abs(m_after["answer_loss"] - complete) > 1e-3


def test_dropout_start_is_a_fraction_of_the_run():
    cfg = ml_collections.ConfigDict({"total_steps": 3000, "model": config.model_options(
        modality_dropout=0.3)})
    assert config.model_options()["modality_dropout_start"] == 0.5
    assert loop._dropped_from(cfg) == 1500
    cfg.model.modality_dropout_start = 0.25
    assert loop._dropped_from(cfg) == 750
    cfg.model.modality_dropout = 0.0  # no modality dropout: nothing to delay
    assert loop._dropped_from(cfg) == 0
    with pytest.raises(ValueError, match=r"modality_dropout_start=1\.5"):
        _setup(0.3, None, modality_dropout_start=1.5)
