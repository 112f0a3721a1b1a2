"""Training learns: short runs of the shipped configs end far above what the data gives for free.

Each test trains a real config (only its size and step count overridden), then compares the
accuracy with two baselines computed from the data itself, on the same split: always answering
the train split's most common label, and answering each distinct question with its most common
train answer (the best a model can do that reads the text and ignores the image). A run whose
gradient is zero, whose labels are shuffled or whose image path is cut stays at or below these,
so each test fails when learning breaks (checked by hand with ``optimizer.lr=0``: see the
report in docs/recipes.md).
"""

from __future__ import annotations

import collections
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from configs import default as default_config
from configs import folder as folder_config
from mmjax import trainer
from mmjax.data import shapes
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from tests import realdata


def _override(config, overrides: dict) -> None:
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value


def baselines(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]]) -> dict:
    """Accuracy on ``test`` (text, label) pairs of the two image-blind answers fitted on train."""
    labels = collections.Counter(label for _, label in train)
    majority = labels.most_common(1)[0][0]
    per_text: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for text, label in train:
        per_text[text][label] += 1
    best = {text: c.most_common(1)[0][0] for text, c in per_text.items()}
    return {
        "majority": float(np.mean([label == majority for _, label in test])),
        "text_only": float(np.mean([label == best.get(text, majority) for text, label in test])),
    }


def _shapes_pairs(data, split: str) -> list[tuple[str, str]]:
    source = shapes.ShapesSource(
        split, int(data[f"num_{split}"]), image_size=int(data.image_size), variant=data.variant
    )
    batch = source.get_batch(np.arange(source.num_examples))
    return [(str(q), shapes.ANSWERS[int(a)])
            for q, a in zip(batch["question"], batch["label"], strict=True)]


def _folder_pairs(root: Path, split: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
    return [(r["text"], str(r["label"])) for r in rows]


@pytest.mark.slow
@pytest.mark.compute_bound
def test_embedded_default_learns_far_above_its_baselines(tmp_path):
    config = default_config.get_config("tiny")
    _override(config, {"total_steps": 300, "batch_size": 64, "eval_every": 300,
                       "checkpoint_every": 300, "log_every": 100, "optimizer.warmup_steps": 50,
                       "data.num_train": 4096, "data.num_val": 256, "data.num_test": 256})
    summary = trainer.train_and_evaluate(config, tmp_path)
    base = baselines(_shapes_pairs(config.data, "train"), _shapes_pairs(config.data, "val"))
    # Above the baselines (0.19 and 0.24 here) a run can stick where the question type is
    # learned and colour not bound to shape: measured 0.45 and 0.50 (seeds 0, 1) with two
    # attention layers per tower. The bar is above that and below what these settings reach
    # (measured: 0.74-1.00 over seeds 0-5; docs/recipes.md).
    bar = max(max(base.values()) + 0.2, 0.6)
    assert summary["val"]["accuracy"] >= bar, (summary["val"], base)
    assert summary["test"]["accuracy"] >= bar, (summary["test"], base)


def _folder_run(data: Path, workdir: Path, **overrides) -> dict:
    config = folder_config.get_config()
    _override(config, {"data.path": str(data), "total_steps": DIGIT_STEPS,
                       "eval_every": DIGIT_STEPS, "checkpoint_every": DIGIT_STEPS, **overrides})
    return trainer.train_and_evaluate(config, workdir)


DIGIT_STEPS = 400


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """``configs/folder.py`` trained on a 16-px digits_qa set: (data, workdir, summary)."""
    base = tmp_path_factory.mktemp("digits")
    root = base / "digits"
    realdata.digits_qa(root, image_size=16, num_val=200, num_test=200, balanced=False)
    return root, base / "work", _folder_run(root, base / "work")


@pytest.mark.slow
@pytest.mark.compute_bound
def test_folder_config_learns_real_digit_questions(digits_run):
    root, _, summary = digits_run
    base = baselines(_folder_pairs(root, "train"), _folder_pairs(root, "val"))
    floor = max(base.values())
    assert summary["val"]["accuracy"] >= floor + 0.15, (summary["val"], base)
    assert summary["test"]["accuracy"] >= floor + 0.15, (summary["test"], base)


@pytest.mark.slow
@pytest.mark.compute_bound
def test_distillation_from_a_clean_teacher_outlearns_noisy_labels(digits_run, tmp_path):
    """The run above teaches a student whose train answers are flipped with probability
    ``NOISE``: it ends well above the same student trained on those labels alone."""
    root, teacher, summary = digits_run
    noisy = tmp_path / "noisy"
    shutil.copytree(root, noisy)
    rows = [json.loads(x) for x in (noisy / "train.jsonl").read_text().splitlines()]
    flip = np.random.default_rng(0).uniform(size=len(rows)) < NOISE
    (noisy / "train.jsonl").write_text("".join(
        json.dumps({**r, "label": {"yes": "no", "no": "yes"}[r["label"]] if f else r["label"]})
        + "\n" for r, f in zip(rows, flip, strict=True)))
    alone = _folder_run(noisy, tmp_path / "alone")
    taught = _folder_run(noisy, tmp_path / "taught", **{"distill.teacher": str(teacher),
                                                        "distill.weight": DISTILL_WEIGHT})
    # Measured (docs/recipes.md): teacher 0.915, alone 0.585, taught 0.865 val. A student that
    # ignores the teacher (distill.weight=0) is the run alone.
    assert taught["val"]["accuracy"] >= alone["val"]["accuracy"] + 0.1, (taught, alone)
    assert taught["val"]["accuracy"] >= summary["val"]["accuracy"] - 0.1, (taught, summary)


NOISE, DISTILL_WEIGHT = 0.4, 1.0


@pytest.mark.slow
@pytest.mark.compute_bound
def test_modality_dropout_keeps_complete_input_accuracy(digits_run, tmp_path):
    """``model.modality_dropout=0.3`` (with its complete-input term, on by default) answers
    complete inputs about as well as the run without it, and without the image it answers
    what the question alone allows: the best answer per question text."""
    root, _, summary = digits_run
    # Measured with these settings (docs/recipes.md): 0.915 without modality dropout, 0.915
    # with it; without the image 0.695, against 0.685 for the best answer per question text.
    work = tmp_path / "dropout"
    dropped = _folder_run(root, work, **{"model.modality_dropout": 0.3})
    assert dropped["val"]["accuracy"] >= summary["val"]["accuracy"] - MODALITY_DROPOUT_GAP, (
        dropped["val"], summary["val"])
    blind = checkpoint_metrics(work, split="val", drop_modalities=("image",))
    base = baselines(_folder_pairs(root, "train"), _folder_pairs(root, "val"))
    assert blind["accuracy"] >= base["text_only"] - 0.05, (blind, base)


MODALITY_DROPOUT_GAP = 0.03
