"""#7 end to end on the embedded data: pretrain → fine-tune, and captioning with a locked tower.

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
from mmjax import trainer, transfer, weighting


def _lines(workdir, split: str) -> list[dict]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


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
    for key in ("retrieval_i2t_recall@1", "retrieval_t2i_recall@10", "zeroshot_accuracy",
                "itm_accuracy", "mlm_accuracy"):
        assert 0.0 <= val[key] <= 1.0, key
    pretrained = transfer.read_checkpoint_params(pre_dir)
    assert set(pretrained[weighting.PARAMS_KEY]) == set(tasks)

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
    assert 0.0 <= out["val"]["qa_accuracy"] <= 1.0
    assert out["val"]["qa_accuracy"] == pytest.approx(out["val"]["accuracy"], abs=1e-6)
    assert {k for k in out["val"] if k.startswith("qa_accuracy_")} == {
        "qa_accuracy_what_colour", "qa_accuracy_what_shape"}


@pytest.mark.slow
def test_caption_run_keeps_the_locked_tower_bit_identical(tmp_path) -> None:
    c = shapes_caption.get_config("tiny")
    run = trainer.Trainer(c, tmp_path)
    fresh = jax.device_get(run.init_state().params)
    out = run.run()
    final = transfer.read_checkpoint_params(tmp_path)
    for a, b in zip(jax.tree.leaves(fresh["image"]), jax.tree.leaves(final["image"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree.leaves(fresh["heads"]["caption"]), jax.tree.leaves(final["heads"]["caption"]),
        strict=True)]
    assert any(changed)  # the decoder did train
    val = out["val"]
    for key in ("exact_match", "bleu", "greedy_exact_match", "retrieval_i2t_recall@1",
                "retrieval_t2i_recall@5", "caption_accuracy"):
        assert 0.0 <= val[key] <= 1.0, key
