"""Folder datasets end to end: real image files, validation of bad data, vocabularies, batches.

Datasets are written at test time with Pillow (PNG and JPEG) from random textures with or
without a bright disc or square, so the task ("is there a disc ?") is learnable and labels can
be checked against the pixels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import folder, pipeline, records
from mmjax.data.tokenize import WordPieceTokenizer
from mmjax.modalities import image as image_modality
from mmjax.pp import image as image_pp
from mmjax.pp import ops

REPO = Path(__file__).resolve().parents[1]
OBJECTS = ("disc", "square")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field with noise: photograph-like clutter, no sharp objects."""
    coarse = rng.uniform(30, 170, size=(4, 4, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255)


def _draw(image: np.ndarray, rng: np.random.Generator, kind: str) -> None:
    size = image.shape[0]
    r = rng.uniform(0.12, 0.2) * size
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    yy, xx = np.mgrid[:size, :size]
    if kind == "disc":
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    else:
        inside = (np.abs(yy - cy) <= r * 0.9) & (np.abs(xx - cx) <= r * 0.9)
    image[inside] = rng.uniform(215, 255, size=3)


def make_example(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    """(uint8 image, question, "yes"/"no"): either object may be present; the question picks one."""
    image = _texture(rng, size)
    present = {k: bool(rng.uniform() < 0.5) for k in OBJECTS}
    for k in OBJECTS:
        if present[k]:
            _draw(image, rng, k)
    asked = str(rng.choice(OBJECTS))
    return image.astype(np.uint8), f"is there a {asked} ?", "yes" if present[asked] else "no"


def make_dataset(
    root: str | Path, sizes: dict[str, int], *, image_size: int = 48, seed: int = 0
) -> Path:
    """Writes ``root/{split}.jsonl`` and images (PNG and JPEG alternately); returns root."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                image, text, label = make_example(rng, image_size)
                ext = "png" if i % 2 == 0 else "jpg"
                name = f"img/{split}_{i}.{ext}"
                Image.fromarray(image).save(root / name, quality=95)
                f.write(json.dumps({"image": name, "text": text, "label": label}) + "\n")
    return root


def _config(path: Path, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "name": "folder", "path": str(path), "image_size": 32, "max_len": 8, "tokenizer": "",
        "vocab_size": 100, "pp_train": "decode|resize|flip|normalize|tokenize",
        "pp_eval": "decode|resize|normalize|tokenize", "skip_bad": False, "cache": True,
        "cache_mb": 64, "num_workers": 0,
    })
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("folder"), {"train": 40, "val": 12, "test": 10})


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- ops ------------------------------------------------------------------------------------


def test_ops_parse_and_run():
    chain = ops.parse("decode|resize(16)|random_crop(0.5)|flip(1.0)|normalize('host')",
                      ops.Context())
    assert [o.name for o in chain] == ["decode", "resize", "random_crop", "flip", "normalize"]
    assert ops.cacheable_prefix(chain, "image") == [0, 1]
    image = np.zeros((20, 30, 3), np.uint8)
    image[:, :15] = 255
    out = ops.apply(chain[:2] + chain[3:], {"image": image}, np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
    assert out["image"][:, 0].max() == -1.0 and out["image"][:, -1].min() == 1.0  # flipped
    a = ops.apply(chain, {"image": image}, np.random.default_rng(3))["image"]
    b = ops.apply(chain, {"image": image}, np.random.default_rng(3))["image"]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="blur"):
        ops.parse("decode|blur", ops.Context())
    with pytest.raises(ValueError, match="resize"):
        ops.parse("resize(", ops.Context())


def test_pad_truncate_and_tokenize():
    tok = WordPieceTokenizer.train(["is there a disc ?", "is there a square ?"] * 5, 60)
    chain = ops.parse("tokenize(6)|pad_truncate(8)", ops.Context(tokenizer=tok))
    out = ops.apply(chain, {"text": "is there a disc ?"}, None)
    assert out["text"]["ids"].shape == (8,) and out["text"]["mask"].tolist() == [1] * 6 + [0] * 2


# --- the source and its validation ----------------------------------------------------------


def test_wordpiece_trained_saved_and_reloaded(dataset, tmp_path):
    cfg = _config(dataset)
    tok = pipeline.build_tokenizer(cfg, workdir=tmp_path)
    assert (tmp_path / records.TOKENIZER_FILE).exists()
    again = WordPieceTokenizer.load(tmp_path / records.TOKENIZER_FILE)
    texts = ["is there a disc ?", "is there a zebra ?"]
    for a, b in zip(tok.encode(texts, 8), again.encode(texts, 8), strict=True):
        np.testing.assert_array_equal(a, b)
    ids, mask = tok.encode(texts, 8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 8)
    assert ids[0, 0] == tok.CLS and tok.SEP in ids[0]
    assert tok.decode(ids[:1]) == ["is there a disc?"]


def test_labels_saved_and_batches_match_files(dataset, tmp_path):
    cfg = _config(dataset)
    tok = pipeline.build_tokenizer(cfg, workdir=tmp_path)
    info = pipeline.dataset_info(cfg, tok, workdir=tmp_path)
    assert info["num_classes"] == 2 and info["skipped_train"] == 0
    assert json.loads((tmp_path / folder.LABELS_FILE).read_text()) == ["no", "yes"]
    batches = list(pipeline.eval_batches(cfg, "val", batch_size=8))
    assert len(batches) == 2 and batches[1]["valid"].sum() == 4
    b = batches[0]
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8  # step scales
    assert b["text"]["ids"].shape == (8, 8) and b["label"].dtype == np.int32
    lines = [json.loads(x) for x in (dataset / "val.jsonl").read_text().splitlines()]
    expected = [["no", "yes"].index(r["label"]) for r in lines[:8]]
    assert b["label"].tolist() == expected
    pixels = image_pp.decode_image(str(dataset / lines[0]["image"]))
    want = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR), np.float32)
    scaled = np.asarray(image_modality.to_model(b["image"])[0])
    np.testing.assert_allclose(scaled, want / 127.5 - 1.0, atol=1e-6)


def test_int_labels_sort_numerically():
    assert folder.build_label_vocab([10, 2, 2, 1]) == [1, 2, 10]
    assert folder.build_label_vocab(["b", "a", 3]) == [3, "a", "b"]


def test_train_iterator_resumes_exactly_and_slices(dataset):
    cfg = _config(dataset)
    it = pipeline.train_iterator(cfg, batch_size=8, seed=5)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]  # crosses an epoch boundary (40 / 8 = 5 steps)
    fresh = pipeline.train_iterator(cfg, batch_size=8, seed=5)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["text"]["ids"], want["text"]["ids"])
        np.testing.assert_array_equal(got["label"], want["label"])
    halves = [
        next(pipeline.train_iterator(cfg, batch_size=8, seed=5, process_index=p, process_count=2))
        for p in range(2)
    ]
    whole = next(pipeline.train_iterator(cfg, batch_size=8, seed=5))
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), whole["image"])


def _damage(case: str, root: Path) -> tuple[str, str]:
    """Damages a copy in one way; returns (the split hit, the text the error must contain)."""
    lines = (root / "val.jsonl").read_text().splitlines()
    rec = json.loads(lines[3])
    if case == "missing_image":
        os.remove(root / rec["image"])
        return "val", f"{root / rec['image']}"
    if case == "truncated_png":
        png = json.loads(lines[2])["image"]  # even lines are PNG
        data = (root / png).read_bytes()
        (root / png).write_bytes(data[: len(data) // 2])
        return "val", f"val.jsonl:3: cannot decode image file {root / png}"
    if case == "broken_line":
        lines[3] = lines[3][:-5]
    elif case == "missing_field":  # a record may lack a modality, never its label
        del rec["label"]
        lines[3] = json.dumps(rec)
    elif case == "unknown_label":
        rec["label"] = "maybe"
        lines[3] = json.dumps(rec)
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    return "val", "val.jsonl:4"


CASES = ("missing_image", "truncated_png", "broken_line", "missing_field", "unknown_label")


@pytest.mark.parametrize("case", CASES)
def test_bad_data_is_named_or_skipped(dataset, tmp_path, case):
    root = _copy(dataset, tmp_path / "copy")
    _, needle = _damage(case, root)
    tok = pipeline.build_tokenizer(_config(root))
    with pytest.raises(folder.BadDataError) as err:
        pipeline.dataset_info(_config(root), tok)
    assert needle in str(err.value)
    if case == "missing_image":
        assert "val.jsonl:4" in str(err.value)
    cfg = _config(root, skip_bad=True)
    info = pipeline.dataset_info(cfg, pipeline.build_tokenizer(cfg))
    assert info["skipped_val"] == 1 and info["skipped_train"] == 0
    n = sum(b["valid"].sum() for b in pipeline.eval_batches(cfg, "val", batch_size=8))
    assert n == 11


def test_cli_stops_before_training_naming_the_line(dataset, tmp_path):
    root = _copy(dataset, tmp_path / "copy")
    lines = (root / "train.jsonl").read_text().splitlines()
    lines[6] = "{not json"
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config", "configs/folder.py:tiny",
         "--workdir", str(tmp_path / "w"), f"--config.data.path={root}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "train.jsonl:7" in last, last
    assert not (tmp_path / "w" / "checkpoints").exists() or not any(
        (tmp_path / "w" / "checkpoints").iterdir()
    )


@pytest.mark.slow
def test_folder_config_trains_end_to_end(dataset, tmp_path):
    work = tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config", "configs/folder.py:tiny",
         "--workdir", str(work), f"--config.data.path={dataset}"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    assert all(np.isfinite(r["loss"]) for r in records if r["split"] == "train")


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(dataset):
    ref = pipeline.train_iterator(_config(dataset), batch_size=8, seed=2)
    want = [next(ref) for _ in range(4)]
    cfg = _config(dataset, num_workers=2)
    it = pipeline.train_iterator(cfg, batch_size=8, seed=2)
    np.testing.assert_array_equal(next(it)["image"], want[0]["image"])
    np.testing.assert_array_equal(next(it)["image"], want[1]["image"])
    state = json.loads(json.dumps(it.get_state()))
    fresh = pipeline.train_iterator(cfg, batch_size=8, seed=2)
    fresh.set_state(state)
    for w in want[2:]:
        np.testing.assert_array_equal(next(fresh)["image"], w["image"])


def test_inspect_prints_examples_writes_a_grid_and_benchmarks(dataset, tmp_path, capsys):
    from mmjax.data import inspect as data_inspect

    config = ml_collections.ConfigDict(
        {"seed": 0, "batch_size": 8, "data": _config(dataset).to_dict()}
    )
    out = tmp_path / "grid.png"
    lines = data_inspect.show(config, "val", 4, str(out))
    assert len(lines) == 4 and "is there a" in lines[0]
    assert "label 'yes'" in lines[0] or "label 'no'" in lines[0]
    with Image.open(out) as im:
        assert im.size == (4 * 160, 160 + 48)
    result = data_inspect.benchmark(config, 3)
    assert result["images_per_s"] > 0
    assert "images/s" in capsys.readouterr().out


def test_hf_tokenizer_folder(dataset, tmp_path):
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "is", "there", "a", "disc", "square"]
    words.append("?")
    vocab = {w: i for i, w in enumerate(words)}
    BertTokenizerFast(vocab=vocab).save_pretrained(tmp_path / "tok")
    cfg = _config(dataset, tokenizer=str(tmp_path / "tok"))
    tok = pipeline.build_tokenizer(cfg)
    assert tok.vocab_size == len(words)
    batch = next(pipeline.train_iterator(cfg, batch_size=4, seed=0))
    ids = batch["text"]["ids"]
    assert ids.dtype == np.int32 and ids.shape == (4, 8)
    assert (ids[:, 0] == 2).all() and not (ids == 1).any()  # [CLS] first, no unknown words
