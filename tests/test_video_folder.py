"""A video + text folder set (H.264 clips of moving squares, questions about one of them)
through ``configs/folder.py`` unchanged, evaluated with per-frame corruptions, frame drops and
an attack on pixels; a 720p clip with an AAC track named as both ``"video"`` and ``"audio"``
feeds two towers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from configs import folder as folder_config
from mmjax.data import pipeline, shapes_video
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.trainer import loop, runs
from tests.video_clips import write_clip


def write_set(root: Path, sizes: dict[str, int]) -> Path:
    """``shapes_video`` examples as 16-frame H.264 mp4 files (a window of 8 frames every 2
    fits, and any window shows the motion) and their JSONL records."""
    (root / "clips").mkdir(parents=True)
    for split, n in sizes.items():
        lines = []
        for i in range(n):
            ex = shapes_video.make_example(split, i, frames=16)
            name = f"clips/{split}_{i}.mp4"
            write_clip(root / name, ex["video"])
            rec = {"video": name, "text": ex["question"],
                   "label": shapes_video.DIRECTIONS[ex["label"]]}
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
@pytest.mark.compute_bound
def test_a_video_folder_trains_and_is_evaluated_under_corruptions_and_attacks(trained):
    """(predict, ``--drop video``, explain and export on a video model: tests/test_video_cli.py)"""
    _, workdir = trained
    config = json.loads((workdir / "config.json").read_text())
    assert sorted(config["model"]["encoders"]) == ["text", "video"]
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(x["split"] == "val" and "accuracy" in x for x in lines)

    full = checkpoint_metrics(workdir, split="test")
    bad = checkpoint_metrics(workdir, split="test", corrupt="video_gaussian_noise:3,frame_drop:5",
                             attack="fgsm", eps=(0.03,))
    assert set(bad["corrupt"]) == {"video_gaussian_noise:3", "frame_drop:5"}, bad
    # each corruption reached the model's input: the loss moved (the same input gives the
    # same loss bit for bit; this short run's answers are near uniform, so it moves little)
    for name, m in bad["corrupt"].items():
        assert m["loss"] != full["loss"], (name, m, full)
    attacked = [k for k in bad["attack"] if "video" in k]
    assert attacked, bad["attack"]
    entry = bad["attack"][attacked[0]]
    assert entry["clean_accuracy"] == pytest.approx(full["accuracy"], abs=1e-9)
    assert entry["accuracy"] <= entry["clean_accuracy"]


@pytest.mark.slow
@pytest.mark.compute_bound
def test_a_720p_clip_with_sound_feeds_the_video_and_audio_towers(tmp_path):
    """One H.264 + AAC file named as both "video" and "audio" of each record: three towers."""
    root = tmp_path / "data"
    (root / "clips").mkdir(parents=True)
    ramp = np.linspace(0, 255, 1280).astype(np.uint8)[None, None, :, None]
    for split, n in {"train": 2, "val": 2, "test": 1}.items():
        lines = []
        for i in range(n):
            name = f"clips/{split}_{i}.mp4"
            frames = np.broadcast_to(ramp, (16, 720, 1280, 3)) // (i + 1)
            write_clip(root / name, frames, audio_hz=300.0 + 200 * i)
            lines.append(json.dumps({"video": name, "audio": name, "text": "is it high ?",
                                     "label": "yes" if i % 2 else "no"}) + "\n")
        (root / f"{split}.jsonl").write_text("".join(lines))
    c = folder_config.get_config("tiny")
    c.data.path = str(root)
    c.total_steps = c.eval_every = c.checkpoint_every = 2
    c.batch_size, c.optimizer.warmup_steps = 2, 1
    loop.train_and_evaluate(c, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert sorted(config["model"]["encoders"]) == ["audio", "text", "video"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "val"] == [2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # the soundtrack is what the audio tower read: two tones give two different features
    run = runs.load(tmp_path / "run")
    batch = next(iter(pipeline.eval_batches(run.config.data, "val", batch_size=2,
                                            tokenizer=run.tokenizer)))
    audio = np.asarray(batch["audio"])
    assert audio.shape[0] == 2 and np.abs(audio[0] - audio[1]).max() > 0.1
