"""TFDS sources without TensorFlow: a real array_record build of the shapes builder, and mocks.

``tfds.testing.mock_data`` serves ``tfds.data_source`` without TensorFlow (random records
from the builder's feature spec), which covers the field mapping; the real tiny build of
``mmjax_shapes`` checks that the pixels and labels that reach a batch are the generator's.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import pipeline, shapes, shapes_tfds


def _config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "name": "tfds", "tfds_name": "mmjax_shapes/tiny", "data_dir": "", "image_key": "image",
        "text_key": "question", "label_key": "label", "text": "", "train_split": "train",
        "val_split": "val", "test_split": "test", "image_size": 32, "max_len": 12,
        "tokenizer": "", "vocab_size": 100, "pp_train": "decode|resize|flip|normalize|tokenize",
        "pp_eval": "decode|resize|normalize|tokenize", "skip_bad": False, "cache": True,
        "cache_mb": 64, "num_workers": 0,
    })
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes_tfds.build(data_dir, "tiny")
    return data_dir


def test_shapes_builder_round_trips_through_the_pipeline(built):
    cfg = _config(data_dir=built)
    tok = pipeline.build_tokenizer(cfg)
    info = pipeline.dataset_info(cfg, tok)
    assert info["num_classes"] == len(shapes.ANSWERS)
    batches = list(pipeline.eval_batches(cfg, "val", batch_size=8))
    assert len(batches) == 2 and all(b["valid"].all() for b in batches)
    got = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    want = shapes.make_batch("val", np.arange(16))
    # TFDS shuffles records when it writes them: match examples by their pixels.
    by_pixels = {
        im.tobytes(): (int(y), q)
        for im, y, q in zip(want["image"], want["label"], want["question"], strict=True)
    }
    texts = tok.decode(np.concatenate([b["text"]["ids"] for b in batches]))
    assert got.dtype == np.uint8  # records leave the host as uint8; the step scales them
    pixels = got
    assert len({p.tobytes() for p in pixels}) == 16
    for p, y, t in zip(pixels, labels, texts, strict=True):
        label, question = by_pixels[p.tobytes()]
        assert y == label and t == question.replace(" ?", "?")


def test_tfds_train_iterator_resumes(built):
    cfg = _config(data_dir=built)
    it = pipeline.train_iterator(cfg, batch_size=8, seed=3)
    next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    fresh = pipeline.train_iterator(cfg, batch_size=8, seed=3)
    fresh.set_state(state)
    for w in want:
        g = next(fresh)
        np.testing.assert_array_equal(g["image"], w["image"])
        np.testing.assert_array_equal(g["label"], w["label"])


def test_mock_data_maps_fields_without_tensorflow():
    cfg = _config(tfds_name="mnist", text_key="", text="what digit is this ?",
                  val_split="test", pp_train="decode|resize|normalize|tokenize")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        tok = pipeline.build_tokenizer(cfg)
        info = pipeline.dataset_info(cfg, tok)
        batch = next(pipeline.train_iterator(cfg, batch_size=4, seed=0))
    assert info["num_classes"] == 10
    assert batch["image"].shape == (4, 32, 32, 3)  # 28x28x1 → RGB at the config's size
    assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()
    assert tok.decode(batch["text"]["ids"][:1]) == ["what digit is this?"]


def test_missing_feature_is_named(built):
    cfg = _config(data_dir=built, text_key="answer_text")
    with pytest.raises(KeyError, match="answer_text"):
        pipeline.build_tokenizer(cfg)


@pytest.mark.slow
def test_tfds_config_trains_from_the_command_line(built, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config", "configs/tfds.py:tiny",
         "--workdir", str(tmp_path), "--config.data.tfds_name=mmjax_shapes/tiny",
         f"--config.data.data_dir={built}", "--config.data.text_key=question",
         "--config.data.val_split=val"],
        cwd=root, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    test = [x for x in lines if x["split"] == "test"]
    assert len(test) == 1 and test[0]["step"] == 12 and "qa_accuracy" in test[0]
