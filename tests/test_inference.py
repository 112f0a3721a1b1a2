"""Using a trained run: predict, evaluate, export (float and int8), across device layouts.

One tiny folder run is trained per module (the CLI, in a subprocess, so nothing the trainer
cached in this process helps inference); predict, evaluate and export then read it back from
its workdir alone. Expected values come from what training logged, from the raw files, from
numpy, or from the model applied to the checkpoint's params outside the inference code
(tests/model_answers.py): never from the code under test.
"""

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

from mmjax.data.folder import BadDataError
from mmjax.inference import export, predict, quantize
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.io.checkpoint import Checkpointer, saved_steps
from mmjax.trainer import loop, runs
from tests import model_answers
from tests.test_folder import make_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60  # of folder_run; checkpoints and val every 30


def _env(devices: int = 1) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    if devices > 1:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MMJAX_")},
            "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}


def _cli(module: str, *args: str, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(devices),
                          capture_output=True, text=True, timeout=600)


def _train(data: Path, workdir: Path, *extra: str, devices: int = 1) -> list[dict]:
    result = _cli("mmjax.train", "--config", "configs/folder.py:tiny", "--workdir", str(workdir),
                  f"--config.data.path={data}", *extra, devices=devices)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _logged(lines: list[dict], split: str, step: int | None = None) -> dict:
    return [r for r in lines if r["split"] == split and step in (None, r["step"])][-1]


def _gold(data: Path, split: str = "test") -> list[str]:
    return [str(json.loads(line)["label"]) for line in (data / f"{split}.jsonl").open()]


def _top1(path: Path) -> list[str]:
    return [json.loads(line)["predictions"][0]["label"] for line in path.open()]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """(data, workdir, metrics.jsonl lines) of configs/folder.py:tiny trained for 60 steps at
    lr 2e-3 (checkpoints and val at 30 and 60, 32 px), long enough for answers that differ
    between examples (the recipe's 12 steps answer "no" to everything); 40 px images (so
    preprocessing resizes) and 200 test examples, so one answer is half a point of accuracy."""
    base = tmp_path_factory.mktemp("inference")
    data = make_dataset(base / "data", {"train": 64, "val": 24, "test": 200}, image_size=40)
    return data, base / "run", _train(data, base / "run", f"--config.total_steps={STEPS}",
                                      "--config.eval_every=30", "--config.checkpoint_every=30",
                                      "--config.optimizer.lr=2e-3")


def _model_probs(data: Path, workdir: Path, step: int, split: str = "test",
                 rows: slice = slice(None)) -> np.ndarray:
    setup = loop.setup(model_answers.folder_config(data), workdir)
    batch = jax.tree.map(lambda x: x[rows], model_answers.split_batch(setup, split))
    return model_answers.class_probs(setup, model_answers.restored_params(workdir, step), batch)


def _close(got: dict, want: dict, keys: list[str]) -> None:
    for k in keys:
        assert abs(got[k] - want[k]) <= 1e-6, (k, got[k], want[k])


@pytest.mark.slow
def test_predict_evaluate_and_training_agree(folder_run, tmp_path):
    data, workdir, lines = folder_run
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    out = tmp_path / "pred.jsonl"
    summary = predict.predict(workdir, data / "test.jsonl", out, top_k=2, progress=False)
    assert summary["count"] == 200 and summary["skipped"] == 0 and summary["step"] == STEPS
    rows = [json.loads(line) for line in out.open()]
    assert [r["index"] for r in rows] == list(range(200))
    for r in rows:  # top 2 of the two classes, most probable first, probabilities summing to 1
        scores = [p["score"] for p in r["predictions"]]
        assert {p["label"] for p in r["predictions"]} == {"no", "yes"}
        assert scores[0] >= scores[1] and abs(sum(scores) - 1) < 1e-5
    gold = _gold(data)
    accuracy = float(np.mean([p == g for p, g in zip(_top1(out), gold, strict=True)]))
    # The scores are the model's softmax on the pipeline's preprocessing of the same files, and
    # the answers differ between examples (measured: 94 "yes" of 200, scores 0.10 to 0.87).
    want = _model_probs(data, workdir, STEPS)
    got = model_answers.predicted_scores(out, ["no", "yes"])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert 40 <= (want.argmax(1) == 1).sum() <= 160

    test = checkpoint_metrics(workdir, split="test")
    logged = _logged(lines, "test")
    assert test["step"] == STEPS and test["split"] == "test"
    assert accuracy == test["accuracy"] == logged["accuracy"]
    assert set(test) == set(logged)
    _close(test, logged, [k for k in logged if k not in ("step", "split")])
    val = checkpoint_metrics(workdir, split="val")
    _close(val, _logged(lines, "val", STEPS), ["accuracy", "loss", "answer_loss"])
    # Only read: the workdir holds exactly what training left.
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


@pytest.mark.slow
def test_evaluate_picks_the_step_asked_for(folder_run):
    _, workdir, lines = folder_run
    val = {r["step"]: r for r in lines if r["split"] == "val"}
    saved = saved_steps(workdir)  # each checkpoint keeps its val metrics
    assert sorted(saved) == sorted(val) == [30, STEPS]
    for step in saved:
        _close(saved[step], val[step], ["accuracy", "loss"])
    got = checkpoint_metrics(workdir, split="val", step=30)
    assert got["step"] == 30
    _close(got, val[30], ["accuracy", "loss"])
    best = max(val, key=lambda s: (val[s]["accuracy"], s))  # ties: the newer step
    got = checkpoint_metrics(workdir, split="val", step="best")
    assert got["step"] == best
    _close(got, val[best], ["accuracy", "loss"])


def test_best_step_from_saved_metrics_or_the_log(tmp_path):
    config = ml_collections.ConfigDict({
        "model": {"heads": {"answer": {"kind": "classification", "num_classes": 2}}},
        "losses": {"answer": 1.0}})
    accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.7, 5: 0.9}
    new, old = tmp_path / "new", tmp_path / "old"
    for workdir in (new, old):
        ckpt = Checkpointer(workdir, keep=10, asynchronous=False)
        for step, acc in accuracies.items():
            metrics = None if acc is None else {"accuracy": acc, "loss": 1 - acc}
            ckpt.save(step, {"params": {"w": np.full(3, step, np.float32)}}, {},
                      metrics if workdir == new else None)
        ckpt.close()
    assert saved_steps(new)[2] == {"accuracy": 0.9, "loss": pytest.approx(0.1)}
    assert set(saved_steps(old).values()) == {None}
    # A workdir from before checkpoints kept their metrics: "best" from metrics.jsonl.
    (old / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "split": "val", "accuracy": a}) + "\n"
        for s, a in accuracies.items() if a is not None) + '{"step": 4, "spl')
    for workdir in (new, old):
        assert runs.resolve_step(workdir, "best", config) == 5  # 2 and 5 tie: the newer
        assert runs.resolve_step(workdir, None, config) == 5
        assert runs.resolve_step(workdir, "3", config) == 3
        with pytest.raises(runs.RunError, match=r"no checkpoint step 7; saved steps"):
            runs.resolve_step(workdir, 7, config)


_RUN_EXPORTED = r"""
import json, sys
sys.modules["mmjax"] = None  # the artifact must not need mmjax
import jax, numpy as np
exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
x = np.load("example_inputs.npz")
args = [x[f"arg{i}"] for i in range(len(x.files))]
full = np.asarray(exported.call(*args))
three = np.asarray(exported.call(*[a[:3] for a in args]))  # the batch dimension is symbolic
print(json.dumps({"full": full.tolist(), "three": three.tolist(),
                  "platforms": list(exported.platforms)}))
"""


def _call_exported(directory: Path) -> dict:
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", _RUN_EXPORTED], cwd=directory, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_runs_without_mmjax_and_int8_is_smaller(folder_run, tmp_path):
    data, workdir, _ = folder_run
    setup = loop.setup(model_answers.folder_config(data), workdir)
    test = model_answers.split_batch(setup, "test")
    params = model_answers.restored_params(workdir, STEPS)
    model = {mode: model_answers.class_probs(setup, p, test) for mode, p in
             [("", params), ("int8", quantize.dequantize(quantize.quantize(params)))]}
    sizes = {}
    for mode in ("", "int8"):
        out = tmp_path / (mode or "float")
        result = export.export(workdir, out, quantize=mode, num_examples=5)
        sizes[mode] = (out / "model.jaxexport").stat().st_size
        assert result["inputs"] == ["image", "text.ids", "text.mask"]
        got = _call_exported(out)
        assert got["platforms"] == ["cpu", "cuda"]
        want = np.load(out / "example_outputs.npz")["probs"]
        assert want.shape == (5, 2)
        # The model's softmax on the first five test rows, on int8 weights through dequantize.
        np.testing.assert_allclose(want, model[mode][:5], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["full"], want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["three"], want[:3], atol=1e-5, rtol=0)
        labels = json.loads((out / "labels.json").read_text())
        assert labels == ["no", "yes"]
        if not mode:  # predict reads the raw files: the artifact's rows are their first five
            pred = tmp_path / "pred.jsonl"
            predict.predict(workdir, data / "test.jsonl", pred, top_k=1, progress=False)
            assert [labels[i] for i in np.argmax(got["full"], axis=1)] == _top1(pred)[:5]
    # The README's preprocessing, redone with Pillow, numpy and the tokenizers library.
    x = np.load(tmp_path / "float" / "example_inputs.npz")
    records = [json.loads(line) for line in (data / "test.jsonl").open()][:5]
    pixels = np.stack([np.asarray(Image.open(data / r["image"]).convert("RGB").resize(
        (32, 32), Image.BILINEAR)) for r in records])
    # uint8 pixels: the exported function scales them itself, as its README says.
    assert x["arg0"].dtype == np.uint8
    np.testing.assert_array_equal(x["arg0"], pixels)
    readme = (tmp_path / "float" / "README.md").read_text()
    assert "uint8 [0, 255]: the function itself converts them" in readme
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "float" / "tokenizer.json"))
    for row, ids, mask in zip(records, x["arg1"], x["arg2"], strict=True):
        pieces = tok.encode(row["text"], add_special_tokens=False).ids
        want = [2, *pieces, 3] + [0] * (16 - len(pieces) - 2)
        assert ids.tolist() == want and mask.tolist() == [int(i != 0) for i in want]
    readme = (tmp_path / "int8" / "README.md").read_text()
    assert "`text.mask`" in readme and "x / 127.5 - 1" in readme and "int8" in readme
    # int8: a file at least 2.5x smaller; on the 200 test examples its probabilities move
    # (measured: by up to 0.022) but stay within 0.03 of float32's, its answers within 1%.
    assert sizes[""] / sizes["int8"] >= 2.5, sizes
    moved = np.abs(model["int8"] - model[""]).max()
    assert 1e-5 < moved < 0.03, moved
    assert np.mean(model["int8"].argmax(1) == model[""].argmax(1)) >= 0.99
    int8_test = checkpoint_metrics(workdir, split="test", quantize="int8")
    assert int8_test["quantize"] == "int8"
    assert int8_test["accuracy"] == np.mean(model["int8"].argmax(1) == test["label"])
    assert abs(int8_test["loss"] - model_answers.xent(model["int8"], test["label"])) <= 1e-5


_RUN_ONNX = r"""
import json, sys
sys.modules["mmjax"] = None
sys.modules["jax"] = None  # an ONNX runtime is all it needs
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
x = np.load("example_inputs.npz")
names = [i.name for i in session.get_inputs()]
args = {n: x[f"arg{i}"] for i, n in enumerate(names)}
full = session.run(None, args)[0]
three = session.run(None, {n: a[:3] for n, a in args.items()})[0]
print(json.dumps({"names": names, "full": full.tolist(), "three": three.tolist()}))
"""


@pytest.mark.slow
def test_onnx_export_runs_in_onnxruntime(folder_run, tmp_path):
    _, workdir, _ = folder_run
    out = tmp_path / "onnx"
    result = export.export(workdir, out, quantize="int8", num_examples=5, fmt="onnx")
    assert result["file"] == "model.onnx" and not (out / "model.jaxexport").exists()
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-I", "-c", _RUN_ONNX], cwd=out, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["names"] == ["image", "text.ids", "text.mask"]
    want = np.load(out / "example_outputs.npz")["probs"]
    np.testing.assert_allclose(got["full"], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["three"], want[:3], atol=1e-5, rtol=0)
    assert "onnxruntime.InferenceSession" in (out / "README.md").read_text()


@pytest.mark.slow
def test_bad_input_lines_are_named_or_skipped(folder_run, tmp_path):
    data, workdir, _ = folder_run
    good = [json.loads(line) for line in (data / "test.jsonl").open()][:4]
    lines = [
        json.dumps({"image": str(data / good[0]["image"]), "text": good[0]["text"]}),
        json.dumps({"image": str(data / good[1]["image"]), "text": good[1]["text"], "x": 1}),
        "{not json",
        "",
        json.dumps({"image": "missing.png", "text": "is there a disc ?"}),
        json.dumps({"image": str(data / good[3]["image"]), "text": good[3]["text"]}),
    ]
    file = tmp_path / "in.jsonl"
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadDataError, match=rf"{file}:3: malformed JSON"):
        predict.predict(workdir, file, tmp_path / "out.jsonl", progress=False)
    assert not (tmp_path / "out.jsonl").exists()
    result = _cli("mmjax.predict", "--workdir", str(workdir), "--input", str(file),
                  "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"{file}:3" in last, last

    summary = predict.predict(workdir, file, tmp_path / "out.jsonl", skip_bad=True,
                              progress=False)
    assert summary["skipped"] == 2 and summary["count"] == 3
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").open()]
    assert [r["index"] for r in rows] == [0, 1, 4]  # positions among the non-blank lines


@pytest.mark.slow
def test_checkpoint_of_8_devices_mesh_fsdp_predicts_on_1(folder_run, tmp_path):
    data, _, _ = folder_run
    workdir = tmp_path / "mesh"
    lines = _train(data, workdir, "--config.parallel.mode=mesh", "--config.parallel.fsdp=2",
                   "--config.total_steps=4", devices=8)
    out = tmp_path / "pred.jsonl"
    result = _cli("mmjax.predict", "--workdir", str(workdir), "--input",
                  str(data / "test.jsonl"), "--output", str(out), "--top_k", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 200 inputs" in result.stdout
    accuracy = float(np.mean([p == g for p, g in zip(_top1(out), _gold(data), strict=True)]))
    assert accuracy == _logged(lines, "test")["accuracy"]
    # The sharded checkpoint, read onto one device by Orbax here, gives the same scores.
    got = model_answers.predicted_scores(out, ["no", "yes"])
    np.testing.assert_allclose(got, _model_probs(data, workdir, 4), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_caption_and_embed_answers_match_the_model(tmp_path):
    """A caption + contrastive model (configs/shapes_caption.py, initialised, not trained):
    predict's captions and --embed's embeddings of PNG files equal the model's own on the
    pipeline's batch of the same examples."""
    import jax

    from configs.shapes_caption import get_config
    from mmjax import trainer
    from mmjax.data import pipeline, shapes
    from mmjax.trainer import loop

    config = get_config("tiny")
    workdir = tmp_path / "run"
    s = trainer.setup(config, workdir)
    state, _ = loop.initial_state(s)
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    ckpt = Checkpointer(workdir, best_metric=None, asynchronous=False)
    ckpt.save(1, state, {})
    ckpt.close()

    n = 12
    batch = next(iter(pipeline.eval_batches(config.data, "test", batch_size=n)))
    raw = shapes.ShapesSource("test", n, image_size=32).get_batch(np.arange(n))
    lines = []
    for i in range(n):
        Image.fromarray(raw["image"][i]).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "text": raw["caption"][i]}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")

    variables = {"params": state.params}
    tokens = s.model.apply(variables, {"image": batch["image"]}, task="caption",
                           method="generate")
    want_text = s.tokenizer.decode(np.asarray(tokens))
    want = jax.tree.map(np.asarray, s.model.apply(
        variables, {"image": batch["image"], "text": batch["text"]}, task="itc", method="embed"))

    out = tmp_path / "captions.jsonl"
    summary = predict.predict(workdir, tmp_path / "in.jsonl", out, batch_size=8, progress=False)
    assert summary["task"] == "caption"
    rows = [json.loads(line) for line in out.open()]
    assert [r["index"] for r in rows] == list(range(n))
    assert [r["text"] for r in rows] == want_text

    summary = predict.predict(workdir, tmp_path / "in.jsonl", out, embed=True, progress=False)
    assert summary["task"] == "itc" and summary["output"] == str(tmp_path / "captions.npz")
    got = np.load(tmp_path / "captions.npz")
    assert got["index"].tolist() == list(range(n))
    for key in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0)


def test_the_answering_head_is_chosen_by_kind():
    def config(heads: dict, losses: list[str]) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({"model": {"heads": {
            t: {"kind": k} for t, k in heads.items()}}, "losses": {t: 1.0 for t in losses}})

    c = config({"itc": "contrastive", "cap": "caption", "score": "regression",
                "answer": "classification"}, ["itc", "cap", "score", "answer"])
    assert runs.output_task(c) == ("answer", "classification")
    assert runs.output_task(c, "cap") == ("cap", "caption")
    assert runs.output_task(c, embed=True) == ("itc", "contrastive")
    c = config({"cap": "caption", "score": "regression"}, ["cap"])  # score: a head, no loss
    assert runs.output_task(c) == ("score", "regression")
    with pytest.raises(runs.RunError, match="--embed"):
        runs.output_task(config({"itc": "siglip"}, ["itc"]), "itc")
    with pytest.raises(runs.RunError, match="no head named 'nope'"):
        runs.output_task(c, "nope")
    with pytest.raises(runs.RunError, match=r"no head of kind \['contrastive', 'siglip'\]"):
        runs.output_task(c, embed=True)
