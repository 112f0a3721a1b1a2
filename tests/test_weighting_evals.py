"""Loss weighting (fixed, schedules, Kendall uncertainty) and the evaluators' metrics.

The same features in real training runs: tests/test_pretrain_finetune.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mmjax import evaluators
from mmjax.evaluators import metrics
from mmjax.optim import weighting


def _cfg(losses: dict, weighting_cfg: dict | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({"losses": losses})
    if weighting_cfg is not None:
        c.loss_weighting = weighting_cfg
    return c


def test_schedules_match_their_formulas() -> None:
    rng = np.random.default_rng(0)
    spec = {"start_value": float(rng.uniform(0, 2)), "end_value": float(rng.uniform(0, 2)),
            "start_step": 30, "end_step": 130}
    w = weighting.from_config(_cfg({"a": 0.5, "b": 2.0, "c": 1.5}, {
        "kind": "fixed",
        "schedules": {"a": {"kind": "linear", **spec}, "b": {"kind": "cosine", **spec},
                      "c": {"kind": "step", **spec}},
    }))
    s0, s1 = spec["start_value"], spec["end_value"]
    for step in [0, 29, 30, *rng.integers(31, 129, 5).tolist(), 130, 400]:
        frac = min(max((step - 30) / 100, 0.0), 1.0)
        lin = s0 + (s1 - s0) * frac
        cos = s0 + (s1 - s0) * 0.5 * (1 - math.cos(math.pi * frac))
        stp = s0 if step < 30 else s1
        got = {k: float(v) for k, v in w.scheduled(step).items()}
        np.testing.assert_allclose(
            [got["a"], got["b"], got["c"]], [0.5 * lin, 2.0 * cos, 1.5 * stp], rtol=1e-6
        )


def test_fixed_weights_total() -> None:
    w = weighting.from_config(_cfg({"a": 0.3, "b": 1.7}))
    rng = np.random.default_rng(4)
    la, lb = (float(v) for v in rng.uniform(0.1, 3.0, 2))
    per_task = {"a": jnp.float32(la), "b": jnp.float32(lb)}
    total, eff = w.combine(per_task, 0, None)
    np.testing.assert_allclose(float(total), 0.3 * la + 1.7 * lb, rtol=1e-6)
    assert {k: float(v) for k, v in eff.items()} == pytest.approx({"a": 0.3, "b": 1.7})


def test_combine_takes_a_subset_of_the_tasks() -> None:
    """Gradient accumulation combines the batch-coupled and the per-example tasks apart: a subset
    of the tasks gives the subset's weighted sum, its schedules and (learned) weights."""
    sched = {"b": {"kind": "linear", "start_value": 1.0, "end_value": 0.0, "start_step": 0,
                   "end_step": 10}}
    fixed = weighting.from_config(_cfg({"a": 0.5, "b": 2.0, "c": 3.0}, {"schedules": sched}))
    rng = np.random.default_rng(5)
    lb, lc = (float(v) for v in rng.uniform(0.1, 3.0, 2))
    total, eff = fixed.combine({"b": jnp.float32(lb), "c": jnp.float32(lc)}, 4, None)
    np.testing.assert_allclose(float(total), 2.0 * 0.6 * lb + 3.0 * lc, rtol=1e-6)
    assert set(eff) == {"b", "c"}
    learned = weighting.from_config(_cfg({"a": 0.5, "b": 2.0}, {"kind": "uncertainty"}))
    s_b = float(rng.normal())
    params = {weighting.PARAMS_KEY: {"a": jnp.float32(rng.normal()), "b": jnp.float32(s_b)}}
    total, eff = learned.combine({"b": jnp.float32(lb)}, 0, params)
    np.testing.assert_allclose(float(total), 2.0 * (math.exp(-s_b) * lb + s_b), rtol=1e-5)
    assert set(eff) == {"b"}


def test_uncertainty_weighting_value_and_gradient() -> None:
    w = weighting.from_config(_cfg({"a": 1.0, "b": 0.5}, {"kind": "uncertainty"}))
    rng = np.random.default_rng(1)
    s = {k: jnp.float32(rng.normal()) for k in "ab"}
    losses = {k: jnp.float32(rng.uniform(0.5, 3.0)) for k in "ab"}
    lam = {"a": 1.0, "b": 0.5}

    def total(log_var: dict) -> jax.Array:
        return w.combine(losses, 0, {weighting.PARAMS_KEY: log_var})[0]

    expect = sum(lam[k] * (math.exp(-float(s[k])) * float(losses[k]) + float(s[k])) for k in lam)
    np.testing.assert_allclose(float(total(s)), expect, rtol=1e-5)
    grads = jax.grad(total)(s)
    for k in lam:  # d/ds [λ(e^{-s}L + s)] = λ(1 - e^{-s}L)
        expect_g = lam[k] * (1 - math.exp(-float(s[k])) * float(losses[k]))
        np.testing.assert_allclose(float(grads[k]), expect_g, rtol=1e-5)
    assert set(w.init_params()) == {"a", "b"}


def test_bad_weighting_configs_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"loss_weighting\.kind"):
        weighting.from_config(_cfg({"a": 1.0}, {"kind": "magic"}))
    with pytest.raises(ValueError, match=r"schedules\.nope names no task"):
        weighting.from_config(_cfg({"a": 1.0}, {"schedules": {"nope": {"kind": "linear"}}}))
    with pytest.raises(ValueError, match="end_step"):
        weighting.from_config(_cfg({"a": 1.0}, {"schedules": {"a": {"kind": "linear"}}}))


def test_corpus_bleu_matches_nltk() -> None:
    from nltk.translate.bleu_score import corpus_bleu

    rng = np.random.default_rng(2)
    words = [f"w{i}" for i in range(6)]  # a small vocabulary, so n-grams do match
    hyps, refs = [], []
    for _ in range(40):
        ref = list(rng.choice(words, rng.integers(4, 10)))
        hyp = [w if rng.uniform() < 0.7 else str(rng.choice(words)) for w in ref]
        # At least 4 words: nltk counts a shorter hypothesis as one 4-gram (max(1, count)),
        # Papineni et al. and sacrebleu as none; with >= 4 words the two definitions agree.
        hyp = hyp[: rng.integers(4, len(hyp) + 1)]
        hyps.append(hyp)
        refs.append(ref)
    ours = metrics.corpus_bleu(hyps, refs)
    theirs = corpus_bleu([[r] for r in refs], hyps)
    assert 0.05 < ours < 0.95
    np.testing.assert_allclose(ours, theirs, rtol=1e-9)
    assert metrics.corpus_bleu([["a", "b", "c", "d"]], [["a", "b", "c", "d"]]) == 1.0


def test_recall_at_k_counts_duplicate_texts_as_hits() -> None:
    rng = np.random.default_rng(3)
    n = 50
    groups = rng.integers(0, 20, n)  # duplicated texts
    sim = rng.normal(size=(n, n))
    got = metrics.recall_at_k(sim, groups, groups, (1, 5, 10))
    for k in (1, 5, 10):  # brute force
        hits = [any(groups[j] == groups[i] for j in np.argsort(-sim[i])[:k]) for i in range(n)]
        assert got[k] == pytest.approx(np.mean(hits))
    ids = np.array([[2, 5, 3, 0], [2, 6, 3, 0], [2, 5, 3, 0]])
    g = metrics.row_groups(ids)
    assert g[0] == g[2] != g[1]


class Evaluator(evaluators.Evaluator):
    """An evaluator defined outside mmjax, loaded by its module path."""

    def __call__(self, variables, split):
        return {"split_length": float(len(split))}


def test_evaluators_load_by_module_name_and_bad_kinds_are_named() -> None:
    assert evaluators.get("qa").__module__ == "mmjax.evaluators.qa"
    assert evaluators.get(__name__) is Evaluator
    with pytest.raises(ValueError, match=r"evals\.x\.kind='nope': no module mmjax.evaluators"):
        evaluators.get("nope", "evals.x")
    with pytest.raises(ValueError, match="defines no Evaluator class"):
        evaluators.get("mmjax.evaluators.metrics")
