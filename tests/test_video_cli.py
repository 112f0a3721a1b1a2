"""The README's commands on a video + text folder model, through their command-line entry points:
predict, evaluate with the video dropped, explain and export, each checked against the same
model run in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import folder as folder_config
from mmjax.data import pipeline
from mmjax.inference import answer
from mmjax.models.multimodal import build_model
from mmjax.trainer import loop, runs
from tests.test_video_folder import write_set

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


@pytest.mark.slow
def test_predict_evaluate_explain_export_on_a_video_model(tmp_path):
    data = write_set(tmp_path / "data", {"train": 8, "val": 4, "test": 6})
    c = folder_config.get_config("tiny")
    c.data.path = str(data)
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 2, 2, 2, 2
    c.optimizer.warmup_steps, c.optimizer.lr = 0, 5e-3  # two steps that move the answers
    c.batch_size, c.eval_batch_size = 4, 8
    c.evals = ml_collections.ConfigDict()  # the per-question-type evaluator: not needed here
    c.model.encoders.video.update(width=32, mlp_dim=64)
    work = tmp_path / "run"
    loop.train_and_evaluate(c, work)

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
