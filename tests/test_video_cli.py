"""The README's commands on a video + text folder model, through their command-line entry points:
predict, evaluate with the video dropped, explain and export, each checked against the same
model run in this process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import folder as folder_config
from mmjax.data import pipeline, shapes_video
from mmjax.inference import answer, predict
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.models.multimodal import build_model
from mmjax.trainer import loop, runs
from tests.video_clips import write_clip

ROOT = Path(__file__).resolve().parents[1]


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, f"{p.args}: exit {p.returncode}\n{err[-3000:]}"
    return out


def _probs(model: object, variables: dict, batches: object, *, drop: bool = False) -> tuple:
    """The in-process model's class probabilities and labels over ``batches`` (real rows)."""
    fn = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)["answer"]["logits"]))
    probs, labels = [], []
    for batch in batches:
        keep = np.asarray(batch["valid"]) > 0
        inputs = answer.model_inputs(batch, ["video", "text"])
        if drop:
            inputs["present"] = {"video": np.zeros(len(keep), bool)}
        probs.append(np.asarray(fn(variables, inputs))[keep])
        labels.append(np.asarray(batch.get("label", np.zeros(len(keep), int)))[keep])
    return np.concatenate(probs), np.concatenate(labels)


def write_set(root: Path, sizes: dict[str, int]) -> Path:
    """``shapes_video`` examples as 16-frame H.264 clips with their JSONL records; frames of
    val and test are 48 x 32 (the 32-px clip on the left, a grey ramp on the right), so that
    square crops along their width differ."""
    (root / "clips").mkdir(parents=True)
    ramp = np.broadcast_to(np.linspace(0, 255, 16).astype(np.uint8)[None, None, :, None],
                           (16, 32, 16, 3))
    for split, n in sizes.items():
        lines = []
        for i in range(n):
            ex = shapes_video.make_example(split, i, frames=16)
            frames = ex["video"] if split == "train" else np.concatenate([ex["video"], ramp], 2)
            name = f"clips/{split}_{i}.mp4"
            write_clip(root / name, frames)
            lines.append(json.dumps({"video": name, "text": ex["question"],
                                     "label": shapes_video.DIRECTIONS[ex["label"]]}) + "\n")
        (root / f"{split}.jsonl").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The smallest video + text folder model (``configs/folder.py:tiny``), two steps."""
    base = tmp_path_factory.mktemp("video_cli")
    data = write_set(base / "data", {"train": 8, "val": 4, "test": 6})
    c = folder_config.get_config("tiny")
    c.data.path = str(data)
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 2, 2, 2
    c.optimizer.warmup_steps, c.optimizer.lr = 0, 5e-2  # two steps that move the answers
    c.batch_size, c.eval_batch_size = 4, 8
    c.evals = ml_collections.ConfigDict()  # the per-question-type evaluator: not needed here
    c.model.encoders.video.update(width=32, mlp_dim=64)
    loop.train_and_evaluate(c, base / "run")
    return data, base / "run"


@pytest.mark.slow
def test_predict_evaluate_explain_export_on_a_video_model(trained, tmp_path):
    data, work = trained
    procs = {
        "predict": _start("mmjax.predict", f"--workdir={work}", f"--input={data}/test.jsonl",
                          f"--output={tmp_path}/answers.jsonl", "--top_k=4"),
        "drop": _start("mmjax.evaluate", f"--workdir={work}", "--drop=video"),
        "explain": _start("mmjax.explain", f"--workdir={work}", "--split=test", "--limit=2",
                          "--images=2", f"--output={tmp_path}/explain"),
        "export": _start("mmjax.export", f"--workdir={work}", f"--output={tmp_path}/export"),
    }
    # the references, computed while the commands run
    run = runs.load(work)
    model = build_model(run.config.model)  # the plain model: no views in this run
    variables = run.variables()
    _, batches = pipeline.file_batches(run.config.data, data / "test.jsonl", batch_size=8,
                                       tokenizer=run.tokenizer)
    probs, _ = _probs(model, variables, batches)
    losses, accuracy = {}, {}
    for drop in (False, True):
        p, labels = _probs(model, variables, pipeline.eval_batches(
            run.config.data, "test", batch_size=8, tokenizer=run.tokenizer), drop=drop)
        losses[drop] = -np.log(p[np.arange(len(labels)), labels]).mean()
        accuracy[drop] = np.mean(p.argmax(1) == labels)
    outs = {name: _finish(p) for name, p in procs.items()}

    # predict: one answer per record, in order, scored with the model's probabilities
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a["index"] for a in answers] == list(range(6))
    for a, p in zip(answers, probs, strict=True):
        got = {x["label"]: x["score"] for x in a["predictions"]}
        want = dict(zip(run.label_names, p.tolist(), strict=True))
        assert list(got) == sorted(want, key=lambda k: -want[k])  # best first
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4)

    # evaluate --drop video: the metrics of the model with the video absent, as computed here,
    # not those of the complete input
    dropped = json.loads(outs["drop"].strip().splitlines()[-1])
    assert (dropped["split"], dropped["drop"]) == ("test", ["video"])
    assert dropped["accuracy"] == pytest.approx(accuracy[True], abs=1e-6)
    np.testing.assert_allclose(dropped["answer_loss"], losses[True], rtol=1e-5)
    assert abs(losses[True] / losses[False] - 1) > 1e-4  # far beyond the rtol: told apart

    # explain: per-frame maps stacked into one strip per example, shown in index.html
    rec = json.loads((tmp_path / "explain" / "explanations.jsonl").read_text().splitlines()[0])
    heat = np.asarray(rec["video"]["heatmap"])
    assert heat.shape == (4 * 4, 4) and np.isfinite(heat).all()  # 4 tubelets x 4 rows, 4 cols
    html = (tmp_path / "explain" / "index.html").read_text()
    strip = next(s.split('"')[0] for s in html.split('src="')[1:] if "_video.png" in s)
    with Image.open(tmp_path / "explain" / strip) as im:
        # the clip with its maps blended | a gap of 6 px | the maps: 8 square frames tall
        assert (im.height, im.width) == (160, 2 * 160 // 8 + 6)

    # export: uint8 clips [B, T, H, W, 3] in, the JAX model's probabilities out
    exported = jax.export.deserialize((tmp_path / "export" / "model.jaxexport").read_bytes())
    signature = json.loads((tmp_path / "export" / "signature.json").read_text())
    x = np.load(tmp_path / "export" / "example_inputs.npz")
    args = [x[f"arg{i}"] for i in range(len(x.files))]
    names = [i["name"] for i in signature["inputs"]]
    video = args[names.index("video")]
    assert video.dtype == np.uint8 and video.shape == (6, 8, 32, 32, 3)
    text = {k.split(".")[1]: args[names.index(k)] for k in names if k.startswith("text.")}
    want = jax.nn.softmax(model.apply(variables, {"video": video, "text": text})["answer"]
                          ["logits"])
    np.testing.assert_allclose(np.asarray(exported.call(*args)), np.asarray(want), atol=1e-4)


@pytest.mark.slow
def test_evaluate_and_predict_average_the_views(trained, tmp_path):
    """The run evaluated with 2 windows x 3 crops per clip (set in its config.json): the
    metrics and answers are those of the class probabilities averaged over the 6 views, each
    view answered alone by the plain model here."""
    data, work = trained
    shutil.copytree(work, tmp_path / "run")
    work = tmp_path / "run"
    config = json.loads((work / "config.json").read_text())
    config["data"]["video"].update(num_clips=2, num_crops=3)
    (work / "config.json").write_text(json.dumps(config))

    metrics = checkpoint_metrics(work, split="test")
    predict.predict(work, data / "test.jsonl", tmp_path / "answers.jsonl", top_k=4)

    run = runs.load(work)
    model = build_model(run.config.model)
    one = jax.jit(lambda x: jax.nn.softmax(model.apply(run.variables(), x)["answer"]["logits"]))
    batch = next(iter(pipeline.eval_batches(run.config.data, "test", batch_size=8,
                                            tokenizer=run.tokenizer)))
    assert batch["video"].shape == (8, 6, 8, 32, 32, 3)
    keep = np.asarray(batch["valid"]) > 0
    each = np.stack([np.asarray(one({"video": batch["video"][:, v], "text": batch["text"]}))
                     for v in range(6)])[:, keep]
    # the views are answered differently enough that averaging logits instead of
    # probabilities moves the loss beyond the tolerance below
    assert each.std(axis=0).max() > 1e-3
    probs, labels = each.mean(axis=0), np.asarray(batch["label"])[keep]
    assert metrics["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-6)
    nll = -np.log(probs[np.arange(len(labels)), labels]).mean()
    np.testing.assert_allclose(metrics["answer_loss"], nll, rtol=1e-5)
    centre = -np.log(each[0][np.arange(len(labels)), labels]).mean()
    assert abs(nll / centre - 1) > 1e-4  # not one view's answer

    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    got = np.asarray([[{x["label"]: x["score"] for x in a["predictions"]}[k]
                       for k in run.label_names] for a in answers])
    np.testing.assert_allclose(got, probs, rtol=1e-4)
