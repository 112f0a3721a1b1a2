"""A video + text folder set (H.264 clips of moving squares, questions about one of them)
through ``configs/folder.py`` unchanged, then everything downstream: predict, evaluate with the
video dropped and with per-frame corruptions and frame drops, an attack on pixels, explain
(a strip of per-frame maps) and export (uint8 ``[B, T, H, W, 3]`` input). A clip named as both
``"video"`` and ``"audio"`` feeds two towers."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import folder as folder_config
from mmjax.data import shapes_video
from mmjax.inference import export, predict
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.interpret.explain import explain
from mmjax.trainer import loop
from tests.video_clips import write_clip


def write_set(root: Path, sizes: dict[str, int], *, audio: bool = False) -> Path:
    """``shapes_video`` examples as 16-frame H.264 mp4 files (a window of 8 frames every 2
    fits, and any window shows the motion) and their JSONL records; ``audio``: the clips
    carry an AAC track and each record names its clip as its audio too."""
    (root / "clips").mkdir(parents=True)
    for split, n in sizes.items():
        lines = []
        for i in range(n):
            ex = shapes_video.make_example(split, i, frames=16)
            name = f"clips/{split}_{i}.mp4"
            write_clip(root / name, ex["video"], audio_hz=440.0 + 40 * (i % 4) if audio else 0)
            rec = {"video": name, "text": ex["question"],
                   "label": shapes_video.DIRECTIONS[ex["label"]]}
            if audio:
                rec["audio"] = name
            lines.append(json.dumps(rec) + "\n")
        (root / f"{split}.jsonl").write_text("".join(lines))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("video_folder")
    data = write_set(base / "data", {"train": 24, "val": 8, "test": 8})
    c = folder_config.get_config("tiny")
    c.data.path = str(data)
    loop.train_and_evaluate(c, base / "run")
    return data, base / "run"


@pytest.mark.slow
def test_a_video_folder_trains_and_everything_downstream_works(trained, tmp_path):
    data, workdir = trained
    config = json.loads((workdir / "config.json").read_text())
    assert sorted(config["model"]["encoders"]) == ["text", "video"]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(x["split"] == "val" and "accuracy" in x for x in lines)

    full = checkpoint_metrics(workdir, split="test")
    dropped = checkpoint_metrics(workdir, split="test", drop_modalities=["video"])
    assert dropped["drop"] == ["video"] and 0 <= dropped["accuracy"] <= 1
    bad = checkpoint_metrics(workdir, split="test", corrupt="video_gaussian_noise:3,frame_drop:5",
                             attack="fgsm", eps=(0.03,))
    assert set(bad["corrupt"]) == {"video_gaussian_noise:3", "frame_drop:5"}, bad
    assert all(0 <= v["accuracy"] <= 1 for v in bad["corrupt"].values())
    attacked = [k for k in bad["attack"] if "video" in k]
    assert attacked and 0 <= bad["attack"][attacked[0]]["accuracy"] <= 1, bad["attack"]

    out = predict.predict(workdir, data / "test.jsonl", tmp_path / "answers.jsonl", top_k=2)
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert out["count"] == 8 == len(answers)
    assert all(len(a["predictions"]) == 2 for a in answers)
    hits = [a["predictions"][0]["label"] == json.loads(g)["label"] for a, g in
            zip(answers, (data / "test.jsonl").read_text().splitlines(), strict=True)]
    assert np.mean(hits) == pytest.approx(full["accuracy"], abs=1e-9)

    result = explain(workdir, tmp_path / "explain", split="test", limit=2, images=2)
    assert result["count"] == 2
    rec = json.loads((tmp_path / "explain" / "explanations.jsonl").read_text().splitlines()[0])
    heat = np.asarray(rec["video"]["heatmap"])
    assert heat.shape == (4 * 4, 4) and np.isfinite(heat).all()  # 4 tubelets x 4 rows, 4 cols
    assert "video" in rec["modalities"] and rec["text"]["tokens"]
    assert "_video.png" in (tmp_path / "explain" / "index.html").read_text()

    info = export.export(workdir, tmp_path / "export", platforms=("cpu",))
    exported = jax.export.deserialize((tmp_path / "export" / "model.jaxexport").read_bytes())
    x = np.load(tmp_path / "export" / "example_inputs.npz")
    args = [x[f"arg{i}"] for i in range(len(x.files))]
    video = [a for a in args if a.ndim == 5]
    assert len(video) == 1 and video[0].dtype == np.uint8 and video[0].shape[1:] == (8, 32,
                                                                                       32, 3)
    probs = exported.call(*args)
    want = np.load(tmp_path / "export" / "example_outputs.npz")["probs"]
    np.testing.assert_allclose(np.asarray(probs), want, atol=1e-5)
    assert "RGB frames [T, H, W, 3], uint8" in (tmp_path / "export" / "README.md").read_text()
    assert any(i.startswith("video") for i in info["inputs"])
