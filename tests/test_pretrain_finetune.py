"""Pretraining and transfer end to end on the embedded data: pretrain → fine-tune, and
captioning with a locked tower.

Short real runs of the shipped configs' ``:tiny`` variants (10 steps each): they check wiring
(every objective trains, weights and evaluator metrics reach ``metrics.jsonl``, ``init_from``
loads the pretrained subtrees, a frozen tower stays bit-identical), not accuracy; the accuracy
claims are measured with the full configs and recorded in the README.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from configs import shapes_caption, shapes_finetune, shapes_pretrain
from mmjax import trainer
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.io.checkpoint import checkpoint_state_dir, read_checkpoint_params, read_state
from mmjax.optim import weighting
from mmjax.trainer import loop

N_EVAL = 64  # examples in each tiny eval split (one eval batch of 64: no padding)


def _lines(workdir, split: str) -> list[dict]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _count_of(value: float, n: int, tol: float = 1e-4) -> int:
    """``value`` is a fraction k/n of n examples (a mean over the split's examples, nothing
    else): returns k."""
    k = round(value * n)
    assert 0 <= k <= n and abs(value * n - k) < tol * n, (value, n)
    return k


def _check_recalls(row: dict, prefix: str) -> None:
    """Recall@k is a fraction of the split's queries and cannot fall as k grows."""
    for way in ("i2t", "t2i"):
        hits = [_count_of(row[f"{prefix}_{way}_recall@{k}"], N_EVAL) for k in (1, 5, 10)]
        assert hits == sorted(hits), (way, hits)


@pytest.mark.slow
def test_pretrain_then_finetune_from_its_workdir(tmp_path, caplog) -> None:
    pre_dir, fine_dir = tmp_path / "pretrain", tmp_path / "finetune"
    c = shapes_pretrain.get_config("tiny")
    c.unlock()
    c.loss_weighting.kind = "uncertainty"  # learned weights, with mim's schedule on top
    trainer.train_and_evaluate(c, pre_dir)

    tasks = ("itc", "itm", "mlm", "mim")
    train = _lines(pre_dir, "train")
    for row in train:
        for t in tasks:
            assert np.isfinite(row[f"{t}_loss"]) and row[f"{t}_weight"] > 0
    # The learned weights moved away from λ·schedule (exp(-s) with s trained from 0).
    sched = weighting.from_config(c).scheduled(train[-1]["step"] - 1)
    moved = [abs(train[-1][f"{t}_weight"] - float(sched[t])) for t in tasks]
    assert max(moved) > 1e-4
    val = _lines(pre_dir, "val")[-1]
    _check_recalls(val, "retrieval")
    _count_of(val["zeroshot_accuracy"], N_EVAL)
    _count_of(val["itm_accuracy"], 3 * N_EVAL)  # one positive and two negatives per example
    assert np.isfinite(val["mlm_accuracy"]) and np.isfinite(val["mim_loss"])
    saved = read_state(checkpoint_state_dir(pre_dir), ("params", "loss_weights"))
    # The learned weights are a field of the state beside the model's params, not inside them.
    assert set(saved["loss_weights"]) == set(tasks) and "loss_weights" not in saved["params"]
    # Evaluating the run again with a modality dropped (two evaluators, which --drop leaves out)
    # gives the per-batch metrics, and the same line as training without --drop.
    again = checkpoint_metrics(pre_dir, split="val")
    assert again["itc_loss"] == pytest.approx(val["itc_loss"], rel=1e-6)
    dropped = checkpoint_metrics(pre_dir, split="val", drop_modalities=["text"])
    assert dropped["drop"] == ["text"] and "retrieval_mean_recall" not in dropped
    assert np.isfinite(dropped["itm_loss"]) and dropped["itm_loss"] != again["itm_loss"]

    f = shapes_finetune.get_config("tiny")
    f.unlock()
    f.init_from = str(pre_dir)
    f.total_steps = 1  # only the loading is under test here; accuracy is measured in full runs
    f.optimizer.warmup_steps = 0
    f.eval_every = 1
    with caplog.at_level(logging.INFO, logger="mmjax.trainer"):
        out = trainer.train_and_evaluate(f, fine_dir)
    report = [r.getMessage() for r in caplog.records if "init_from=" in r.getMessage()]
    assert report and "0 missing" in report[-1] and "0 unexpected" in report[-1], report
    val = out["val"]
    assert val["qa_accuracy"] == pytest.approx(val["accuracy"], abs=1e-6)
    by_type = {k: v for k, v in val.items() if k.startswith("qa_accuracy_")}
    assert set(by_type) == {"qa_accuracy_what_colour", "qa_accuracy_what_shape"}
    # The overall accuracy is a fraction of the split and the count-weighted mean of the two
    # question types' accuracies, so it lies between them.
    _count_of(val["qa_accuracy"], N_EVAL)
    assert min(by_type.values()) - 1e-9 <= val["qa_accuracy"] <= max(by_type.values()) + 1e-9


@pytest.mark.slow
def test_caption_run_keeps_the_locked_tower_bit_identical(tmp_path) -> None:
    c = shapes_caption.get_config("tiny")
    fresh = jax.device_get(loop.initial_state(trainer.setup(c, tmp_path))[0].params)
    out = trainer.train_and_evaluate(c, tmp_path)
    final = read_checkpoint_params(tmp_path)
    for a, b in zip(jax.tree.leaves(fresh["image"]), jax.tree.leaves(final["image"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(fresh["heads"]["caption"]), jax.tree.leaves(final["heads"]["caption"]),
        strict=True)]
    assert any(changed)  # the decoder did train
    val = out["val"]
    # The caption evaluator's pair is also reported unprefixed; greedy exact match and the
    # teacher-forced one are fractions of the split's captions.
    assert val["exact_match"] == val["greedy_exact_match"] and val["bleu"] == val["greedy_bleu"]
    _count_of(val["greedy_exact_match"], N_EVAL)
    _count_of(val["caption_exact_match"], N_EVAL)
    _check_recalls(val, "retrieval")
    assert np.isfinite(val["caption_accuracy"]) and np.isfinite(val["bleu"])
