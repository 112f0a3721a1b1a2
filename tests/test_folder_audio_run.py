"""Folder runs with audio and time-series records, end to end: trained (real Orbax checkpoints),
then predicted, evaluated with a modality dropped and exported, each read back from the workdir.

Two runs of ``configs/folder.py:tiny`` (8 steps) on handwritten digits, clips of beeps and
questions (tests/realdata_audio.py), one per module fixture: ``audio_run`` (image, text, audio)
and ``series_run`` (the same plus a random-walk series per record; val records 2 and 5 have no
series, so their batches carry ``present`` flags). Expected values come from
tests/model_answers.py (the checkpoint's params read with Orbax, the model applied to the
pipeline's batches, ``jax.nn.softmax``): never from the inference code under test.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from mmjax.inference import export, predict
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.trainer import loop
from tests import model_answers
from tests.realdata_audio import digits_beeps
from tests.test_folder_audio import _add_series, _folder_config
from tests.test_inference import _call_exported, _cli

STEPS = 8
NO_SERIES = (2, 5)  # val records of the series run without a series


@dataclasses.dataclass(frozen=True)
class Trained:
    data: Path
    workdir: Path
    summary: dict[str, Any]
    lines: list[dict]  # metrics.jsonl
    setup: loop.Setup  # rebuilt from a fresh config on the workdir (its tokenizer and labels)
    initial: dict[str, Any]  # the params a fresh state of the same config and seed starts from
    params: dict[str, Any]  # the last checkpoint's, read with Orbax
    labels: list[str]  # labels.json

    def logged(self, split: str) -> dict:
        return [r for r in self.lines if r["split"] == split][-1]


def _config(data: Path) -> ml_collections.ConfigDict:
    c = _folder_config(data)
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = STEPS, 4, 4, 1
    c.optimizer.lr = 2e-3  # 8 steps at the recipe's 5e-4 lower the train loss by 0.006 only
    return c


def _train(data: Path, workdir: Path) -> Trained:
    summary = loop.train_and_evaluate(_config(data), workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    s = loop.setup(_config(data), workdir)
    initial, _ = loop.initial_state(s)
    params = model_answers.restored_params(workdir, STEPS)
    labels = json.loads((workdir / "labels.json").read_text())
    return Trained(data, workdir, summary, lines, s, jax.tree.map(np.asarray, initial.params),
                   params, labels)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio_run_data")
    digits_beeps(root, image_size=16, num_val=12, num_test=8, num_train=24, train_questions=1)
    return root


@pytest.fixture(scope="module")
def audio_run(data, tmp_path_factory) -> Trained:
    return _train(data, tmp_path_factory.mktemp("audio_run") / "w")


@pytest.fixture(scope="module")
def series_run(data, tmp_path_factory) -> Trained:
    base = tmp_path_factory.mktemp("series_run")
    root = shutil.copytree(data, base / "data")
    _add_series(root, skip=NO_SERIES)
    return _train(root, base / "w")


def _run(request, name: str) -> Trained:
    return request.getfixturevalue(f"{name}_run")


def _batch(r: Trained, split: str) -> dict[str, Any]:
    return model_answers.split_batch(r.setup, split)


def _probs(r: Trained, batch: dict[str, Any], params: Any = None,
           drop: tuple[str, ...] = ()) -> np.ndarray:
    return model_answers.class_probs(r.setup, r.params if params is None else params, batch, drop)


# --- training -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,towers", [("audio", ["audio", "image", "text"]),
                                         ("series", ["audio", "image", "series", "text"])])
def test_folder_run_trains_every_tower(request, name, towers):
    r = _run(request, name)
    assert r.summary["step"] == STEPS
    saved = json.loads((r.workdir / "config.json").read_text())
    assert sorted(saved["model"]["encoders"]) == towers
    assert sorted(r.setup.model.encoders) == towers
    assert r.summary["last_checkpoint"] == STEPS
    steps = sorted(int(p.name) for p in (r.workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, STEPS]
    lines = r.lines
    assert {x["split"] for x in lines} == {"train", "val", "test"}
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == list(range(1, STEPS + 1))
    assert all(np.isfinite(x["loss"]) for x in train)
    # Every tower learned: Adam moves a weight by up to lr (2e-3) a step (measured: the largest
    # change of a typical leaf is 6e-3 after 8 steps), decoupled weight decay alone by
    # lr * 1e-4 * |w| (about 1e-7): a tower without gradients stays far below 1e-3.
    for tower in towers:
        moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                             r.params[tower], r.initial[tower]))
        assert np.median(moved) > 1e-3, (tower, np.median(moved), len(moved))
    # The checkpoint is the model that was evaluated: the logged val loss and accuracy are the
    # cross-entropy and accuracy of its softmax on val, computed here.
    val = _batch(r, "val")
    probs = _probs(r, val)
    logged = r.logged("val")
    assert logged["step"] == STEPS
    assert abs(model_answers.xent(probs, val["label"]) - logged["answer_loss"]) <= 1e-5
    assert np.mean(probs.argmax(1) == val["label"]) == logged["accuracy"]
    # And training lowered the train loss (the model's own, on all 24 train records).
    train_batch = _batch(r, "train")
    before = model_answers.xent(_probs(r, train_batch, r.initial), train_batch["label"])
    after = model_answers.xent(_probs(r, train_batch), train_batch["label"])
    assert after < before - 0.005, (before, after)  # measured: 0.693 -> 0.678


# --- predict ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["audio", "series"])
def test_predict_scores_are_the_models_softmax(request, name, tmp_path):
    r = _run(request, name)
    out = tmp_path / "pred.jsonl"
    summary = predict.predict(r.workdir, r.data / "val.jsonl", out, top_k=len(r.labels),
                              progress=False)
    val = _batch(r, "val")
    want = _probs(r, val)
    n = len(val["label"])
    assert summary["count"] == n and summary["step"] == STEPS and summary["skipped"] == 0
    if name == "series":  # the records without a series are answered as such
        np.testing.assert_array_equal(val["present"]["series"],
                                      [i not in NO_SERIES for i in range(n)])
    rows = [json.loads(line) for line in out.open()]
    assert [row["index"] for row in rows] == list(range(n))
    got = model_answers.predicted_scores(out, r.labels)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# --- evaluate --drop --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["audio", "series"])
def test_evaluate_drop_is_the_model_without_that_modality(request, name):
    r = _run(request, name)
    plain = checkpoint_metrics(r.workdir, split="val")
    assert plain["step"] == STEPS and "drop" not in plain
    logged = r.logged("val")
    for k in ("loss", "answer_loss", "accuracy"):
        assert abs(plain[k] - logged[k]) <= 1e-6, (k, plain[k], logged[k])
    dropped = checkpoint_metrics(r.workdir, split="val", drop_modalities=[name])
    assert dropped["drop"] == [name]
    val = _batch(r, "val")
    want = _probs(r, val, drop=(name,))
    assert abs(dropped["loss"] - model_answers.xent(want, val["label"])) <= 1e-5
    assert dropped["accuracy"] == np.mean(want.argmax(1) == val["label"])
    assert abs(dropped["loss"] - plain["loss"]) > 1e-4, (dropped["loss"], plain["loss"])
    if name == "audio":  # the command line: its last stdout line is the same evaluation
        result = _cli("mmjax.evaluate", "--workdir", str(r.workdir), "--split", "val",
                      "--drop", "audio")
        assert result.returncode == 0, result.stderr[-3000:]
        line = json.loads(result.stdout.strip().splitlines()[-1])
        assert line["step"] == STEPS and line["split"] == "val" and line["drop"] == ["audio"]
        for k in ("loss", "answer_loss", "accuracy"):
            assert abs(line[k] - dropped[k]) <= 1e-6, (k, line[k], dropped[k])


# --- export -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name,inputs", [
    ("audio", ["audio", "image", "text.ids", "text.mask"]),
    ("series", ["audio", "image", "series.mask", "series.values", "text.ids", "text.mask"])])
def test_export_takes_every_input_and_answers_as_the_model(request, name, inputs, tmp_path):
    r = _run(request, name)
    out = tmp_path / "export"
    if name == "audio":  # the command line
        result = _cli("mmjax.export", "--workdir", str(r.workdir), "--output", str(out),
                      "--num_examples", "5")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "done: " in result.stdout
    else:
        export.export(r.workdir, out, num_examples=5)
    signature = json.loads((out / "signature.json").read_text())
    names = [x["name"] for x in signature["inputs"]]
    assert sorted(names) == inputs
    test = _batch(r, "test")
    assert "present" not in test  # every test record has every modality
    arrays = np.load(out / "example_inputs.npz")
    for x in signature["inputs"]:  # the first five test rows, as the pipeline makes them
        key = x["name"]
        want = test
        for part in key.split("."):
            want = want[part]
        np.testing.assert_array_equal(arrays[f"arg{x['arg']}"], np.asarray(want)[:5],
                                      err_msg=key)
    got = _call_exported(out)  # in a process where mmjax cannot be imported
    want = _probs(r, test)[:5]
    saved = np.load(out / "example_outputs.npz")["probs"]
    assert saved.shape == want.shape == (5, len(r.labels))
    np.testing.assert_allclose(saved, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["full"], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["three"], want[:3], atol=1e-5, rtol=0)
