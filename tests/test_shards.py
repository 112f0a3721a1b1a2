"""Shard sets: written from a folder, read back as the same batches, trained to the same losses.

The folder is written at test time from random pixels, random series and random words, with
records that lack some modality, so the comparison covers images (PNG and JPEG), ``.npy``
series, texts and absent inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmjax.data import folder, pipeline, records, shards

WORDS = ("red", "blue", "green", "left", "right", "small", "big", "is", "it", "a")


def make_folder(root: Path, sizes: dict[str, int], *, seed: int = 0,
                labels: tuple = ("yes", "no", "maybe")) -> Path:
    """``root/{split}.jsonl`` with random images, series and texts; every fifth record has no
    series, every seventh no image."""
    (root / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                rec: dict = {"text": " ".join(rng.choice(WORDS, int(rng.integers(2, 6)))),
                             "label": labels[int(rng.integers(len(labels)))]}
                if i % 7:
                    ext = "png" if i % 2 else "jpg"
                    size = int(rng.integers(24, 48))
                    pixels = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / "media" / f"{split}{i}.{ext}", quality=90)
                    rec["image"] = f"media/{split}{i}.{ext}"
                if i % 5:
                    np.save(root / "media" / f"{split}{i}.npy",
                            rng.normal(size=(int(rng.integers(5, 30)), 2)).astype(np.float32))
                    rec["series"] = f"media/{split}{i}.npy"
                f.write(json.dumps(rec) + "\n")
    return root


def data_config(path: Path, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "name": "folder", "path": str(path), "image_size": 16, "max_len": 8, "tokenizer": "",
        "vocab_size": 60, "skip_bad": False, "cache": True, "cache_mb": 64, "num_workers": 0,
        "pp_train": "decode|random_crop|flip|normalize|tokenize|series(16, 2)",
        "pp_eval": "decode|resize|normalize|tokenize|series(16, 2)",
    })
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shards")
    src = make_folder(root / "folder", {"train": 30, "val": 9, "test": 7})
    shards.write(src, root / "shards", shard_mb=0.004)  # several shards per split
    return src, root / "shards"


def _batches(cfg: ml_collections.ConfigDict, steps: int, tok) -> list[dict]:
    it = pipeline.train_iterator(cfg, batch_size=8, seed=3, tokenizer=tok)
    out = [next(it) for _ in range(steps)]
    out += list(pipeline.eval_batches(cfg, "val", batch_size=4, tokenizer=tok))
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert jax.tree.structure(x) == jax.tree.structure(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("overrides", [{}, {"cache": False}, {"cache_mb": 0}],
                         ids=["cached", "uncached", "cache_full"])
def test_shards_give_the_folder_batches(sets, overrides):
    src, out = sets
    manifest = shards.read_manifest(out)
    assert [len(manifest["splits"][s]["files"]) > 1 for s in ("train", "val")] == [True, True]
    assert manifest["labels"] == ["maybe", "no", "yes"]
    a_cfg, b_cfg = data_config(src, **overrides), data_config(out, **overrides)
    records._SPLIT_CACHE.clear()  # its key leaves out data.cache_mb
    assert records.train_texts(a_cfg) == records.train_texts(b_cfg)
    a_tok, b_tok = pipeline.build_tokenizer(a_cfg), pipeline.build_tokenizer(b_cfg)
    a, b = _batches(a_cfg, 6, a_tok), _batches(b_cfg, 6, b_tok)  # 48 rows: past an epoch
    assert set(a[0]) >= {"image", "series", "text", "label", "present"}
    assert not a[0]["present"]["series"].all() or not a[1]["present"]["series"].all()
    _assert_same(a, b)
    assert pipeline.modalities(a_cfg) == pipeline.modalities(b_cfg) == ("image", "series", "text")
    assert records.labels(b_cfg, "") == records.labels(a_cfg, "")
    a_cache, b_cache = (records.split_data(c, "train").cache for c in (a_cfg, b_cfg))
    assert {m: sorted(c) for m, c in a_cache.items()} == {m: sorted(c) for m, c in b_cache.items()}
    if overrides.get("cache_mb") == 0:  # the cache stops at its budget: at most one record
        assert sum(len(c) for c in b_cache.values()) <= 2


def test_shard_set_reads_its_own_records_only_when_asked(sets):
    """Opening a split reads the index, not the media: the records are read on demand."""
    _, out = sets
    source = shards.ShardSource(out, "train")
    assert len(source) == 30 and source.lines[:3] == [1, 2, 3]
    rec = source[1]
    assert isinstance(rec["image"], bytes) and isinstance(rec["series"], bytes)
    assert rec["text"] == source.records[1]["text"] and rec["label"] == source.records[1]["label"]


def test_writer_names_bad_records_and_skips_them(sets, tmp_path):
    src, _ = sets
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    lines = (bad / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"image": "media/nowhere.png", "label": "yes"})
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    with open(bad / "val.jsonl", "a") as f:
        f.write(json.dumps({"text": "red", "label": "unheard"}) + "\n")
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:3: image file .*nowhere\.png"):
        shards.write(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    val_only = tmp_path / "val_only"
    shutil.copytree(src, val_only)
    shutil.copy(bad / "val.jsonl", val_only / "val.jsonl")
    with pytest.raises(folder.BadDataError, match=r"val\.jsonl:10: label 'unheard' does not"):
        shards.write(val_only, tmp_path / "out")
    manifest = shards.write(bad, tmp_path / "out", skip_bad=True)
    assert manifest["splits"]["train"]["skipped"] == 1
    assert manifest["splits"]["val"]["skipped"] == 1
    assert manifest["splits"]["train"]["records"] == 29
    with pytest.raises(FileExistsError, match="not an empty folder"):  # nothing overwritten
        shards.write(src, tmp_path / "out")
    assert shards.read_manifest(tmp_path / "out")["splits"]["train"]["records"] == 29


def test_memory_stays_flat_on_a_set_larger_than_the_cache(tmp_path):
    """40 images of 160x160 (3 MB decoded) under a 1 MB cache: the cache stops at its budget
    and three epochs of reading from the shards hold no more memory than the first."""
    import tracemalloc

    rng = np.random.default_rng(0)
    root = tmp_path / "big"
    (root / "media").mkdir(parents=True)
    for split, n in (("train", 40), ("val", 2), ("test", 2)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                pixels = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "media" / f"{split}{i}.png")
                f.write(json.dumps({"image": f"media/{split}{i}.png", "label": "a"}) + "\n")
    shards.write(root, tmp_path / "big_shards")
    cfg = data_config(tmp_path / "big_shards", cache_mb=1, pp_train="decode|flip|normalize")
    it = pipeline.train_iterator(cfg, batch_size=8, seed=0, tokenizer=None)
    data = records.split_data(cfg, "train")
    assert 2**20 < data._cached_bytes <= 2**20 + 160 * 160 * 3 and len(data.cache["image"]) < 40
    tracemalloc.start()
    try:
        for _ in range(5):  # one epoch
            next(it)
        after_one = tracemalloc.get_traced_memory()[0]
        for _ in range(10):
            next(it)
        growth = tracemalloc.get_traced_memory()[0] - after_one
    finally:
        tracemalloc.stop()
    assert growth < 160 * 160 * 3 * 4, growth  # a leak of the uncached records would be 2.2 MB
