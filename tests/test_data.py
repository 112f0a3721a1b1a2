"""Tests for the embedded shapes dataset, its tokenizer and the grain pipeline.

The label checks read the answer back from the *pixels* (cell colours and the silhouette of
each object), independently of the generator's own bookkeeping, because a task whose labels
disagree with its images would still train and quietly cap the demo's accuracy.
"""

import json
import time
import zlib

import grain
import ml_collections
import numpy as np
import pytest

from mmjax.data import pipeline, shapes
from mmjax.data.tokenize import WordTokenizer, shapes_tokenizer


def _config(**overrides):
    cfg = ml_collections.ConfigDict(
        {
            "name": "shapes",
            "image_size": 32,
            "max_len": 12,
            "num_train": 5000,
            "num_val": 300,
            "num_test": 300,
            "variant": "",
            "text": "question",
        }
    )
    cfg.update(overrides)
    cfg.lock()
    return cfg


@pytest.fixture
def rng(request):
    # Fresh but reproducible inputs per test: seeded from the test's name.
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def _indices(rng, n=64, high=10**6):
    return rng.choice(high, size=n, replace=False)


# --- reading a scene back from the pixels -------------------------------------------------


def _silhouette(cell_pixels: np.ndarray) -> str:
    """Circle, square or triangle from an object's binary mask, by row widths."""
    level = cell_pixels.astype(np.float32).sum(-1)
    on = level > 0.5 * level.max()
    widths = on.sum(1)
    widths = widths[widths > 0]
    top, bottom, widest = widths[0], widths[-1], widths.max()
    if top < bottom:
        return "triangle"
    if top == bottom == widest:
        return "square"
    assert top == bottom < widest, widths
    return "circle"


def _read_scene(image: np.ndarray) -> list[tuple[int, str, str]]:
    """[(cell, colour, shape)] of the non-empty cells, in reading order."""
    cell = image.shape[0] // 4
    scene = []
    for c in range(16):
        r, q = divmod(c, 4)
        px = image[r * cell : (r + 1) * cell, q * cell : (q + 1) * cell]
        if not px.any():
            continue
        centre = px[cell // 2, cell // 2].astype(np.float32)
        dist = np.abs(shapes._RGB - centre).max(-1)
        assert dist.min() <= shapes.COLOUR_JITTER + 1, (centre, dist)
        scene.append((c, shapes.COLOURS[int(dist.argmin())], _silhouette(px)))
    return scene


def _answer(question: str, scene) -> str:
    words = question.split()
    if words[:3] == ["what", "colour", "is"]:
        (hit,) = [colour for _, colour, shape in scene if shape == words[4]]
        return hit
    assert words[:3] == ["what", "shape", "is"], question
    (hit,) = [shape for _, colour, shape in scene if colour == words[4]]
    return hit


# --- the dataset ----------------------------------------------------------------------------


def test_constants():
    assert shapes.ANSWERS == shapes.COLOURS + shapes.SHAPES
    assert len(shapes.ANSWERS) == 9
    assert len(set(shapes.SPLIT_SEEDS.values())) == 3


def test_examples_are_deterministic_and_splits_differ(rng):
    for i in _indices(rng, 5):
        a = shapes.make_example("train", int(i))
        b = shapes.make_example("train", int(i))
        assert a.keys() == {"image", "question", "caption", "label"}
        np.testing.assert_array_equal(a["image"], b["image"])
        assert (a["question"], a["caption"], a["label"]) == (
            b["question"],
            b["caption"],
            b["label"],
        )
    idx = _indices(rng, 32)
    batches = {s: shapes.make_batch(s, idx) for s in ("train", "val", "test")}
    batches["seed1"] = shapes.make_batch("train", idx, seed=1)
    names = list(batches)
    for x in range(len(names)):
        for y in range(x + 1, len(names)):
            same = [
                np.array_equal(p, q)
                for p, q in zip(batches[names[x]]["image"], batches[names[y]]["image"], strict=True)
            ]
            assert sum(same) <= 1, (names[x], names[y])


def test_batch_rows_equal_single_examples(rng):
    idx = _indices(rng, 16)
    batch = shapes.make_batch("val", idx, image_size=48)
    assert batch["image"].shape == (16, 48, 48, 3) and batch["image"].dtype == np.uint8
    for b, i in enumerate(idx):
        ex = shapes.make_example("val", int(i), image_size=48)
        np.testing.assert_array_equal(batch["image"][b], ex["image"])
        assert batch["question"][b] == ex["question"]
        assert batch["caption"][b] == ex["caption"]
        assert batch["label"][b] == ex["label"]


@pytest.mark.parametrize("image_size", [32, 64])
def test_labels_and_captions_match_the_pixels(rng, image_size):
    split = str(rng.choice(["train", "val", "test"]))
    idx = _indices(rng, 150)
    batch = shapes.make_batch(split, idx, image_size=image_size)
    for image, question, caption, label in zip(
        batch["image"], batch["question"], batch["caption"], batch["label"], strict=True
    ):
        scene = _read_scene(image)
        assert len(scene) == 2
        (_, c0, s0), (_, c1, s1) = scene
        assert c0 != c1 and s0 != s1
        assert caption == f"a {c0} {s0} and a {c1} {s1}"
        assert shapes.ANSWERS[label] == _answer(question, scene)


def test_objects_stay_inside_their_cells(rng):
    layout = shapes.sample_layout("train", _indices(rng, 200))
    image = shapes.render(layout, 32)
    occupied = np.zeros((200, 16), bool)
    occupied[np.arange(200)[:, None], layout.cells] = True
    per_cell = image.reshape(200, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(200, 16, -1)
    assert not per_cell[~occupied].any()
    assert per_cell[occupied].max(-1).min() > 150  # every occupied cell has a bright object


def test_question_types_balanced_and_all_answers_used(rng):
    batch = shapes.make_batch("train", _indices(rng, 600))
    asks_colour = np.array([q.startswith("what colour") for q in batch["question"]])
    assert 0.4 < asks_colour.mean() < 0.6
    labels = np.asarray(batch["label"])
    assert (labels[asks_colour] < len(shapes.COLOURS)).all()
    assert (labels[~asks_colour] >= len(shapes.COLOURS)).all()
    assert set(labels.tolist()) == set(range(len(shapes.ANSWERS)))


def test_variants(rng):
    idx = _indices(rng, 40)
    normal = shapes.make_batch("test", idx)
    image_only = shapes.make_batch("test", idx, variant="image_only")
    text_only = shapes.make_batch("test", idx, variant="text_only")
    assert len(set(image_only["question"])) == 1 and len(set(image_only["caption"])) == 1
    np.testing.assert_array_equal(image_only["image"], normal["image"])
    assert text_only["image"].shape == normal["image"].shape
    assert not text_only["image"].any()
    assert text_only["question"] == normal["question"]
    for v in (image_only, text_only):
        np.testing.assert_array_equal(v["label"], normal["label"])


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="bogus"):
        shapes.make_example("bogus", 0)
    with pytest.raises(ValueError, match="nope"):
        shapes.make_example("train", 0, variant="nope")
    with pytest.raises(ValueError, match="30"):
        shapes.make_example("train", 0, image_size=30)
    with pytest.raises(IndexError):
        shapes.ShapesSource("train", 10)[10]


def test_source_is_lazy_and_random_access(rng):
    src = shapes.ShapesSource("val", 10**7)
    assert len(src) == 10**7
    i = int(rng.integers(10**7))
    ex = src[i]
    np.testing.assert_array_equal(ex["image"], shapes.make_example("val", i)["image"])
    np.testing.assert_array_equal(src.get_batch([i, 3])["image"][0], ex["image"])
    via_grain = grain.MapDataset.source(src)[i]
    np.testing.assert_array_equal(via_grain["image"], ex["image"])
    assert via_grain["label"] == ex["label"]


# --- the tokenizer --------------------------------------------------------------------------


def test_tokenizer_round_trip_covers_all_texts(rng):
    tok = shapes_tokenizer()
    assert tok.vocab_size == len(tok.vocab) and tok.vocab[:5][0] == "[PAD]"
    batch = shapes.make_batch("train", _indices(rng, 200))
    texts = batch["question"] + batch["caption"] + [shapes.CONSTANT_TEXT]
    ids, mask = tok.encode(texts, 12)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(texts), 12)
    assert not (ids == WordTokenizer.UNK).any()
    assert tok.decode(ids) == texts
    np.testing.assert_array_equal(mask, (ids != WordTokenizer.PAD).astype(np.int32))


def test_tokenizer_padding_truncation_and_unknowns():
    tok = WordTokenizer(["a", "b", "c"])
    assert tok.vocab_size == 8
    ids, mask = tok.encode(["a b", "A z c b a c"], 5)
    a, b, c = 5, 6, 7
    np.testing.assert_array_equal(ids[0], [tok.CLS, a, b, tok.SEP, tok.PAD])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0])
    # Truncation drops words but keeps [SEP] last; unknown words map to [UNK].
    np.testing.assert_array_equal(ids[1], [tok.CLS, a, tok.UNK, c, tok.SEP])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 1, 1])
    assert tok.decode(ids) == ["a b", "a [UNK] c"]
    assert tok.decode(ids[0]) == ["a b"]
    ids, _ = tok.encode([""], 2)
    np.testing.assert_array_equal(ids, [[tok.CLS, tok.SEP]])
    with pytest.raises(ValueError):
        tok.encode(["a"], 1)


# --- the pipeline ---------------------------------------------------------------------------


def test_train_batches_shapes_and_dtypes(rng):
    seed = int(rng.integers(2**31))
    t = time.perf_counter()
    it = pipeline.train_iterator(_config(), batch_size=32, seed=seed)
    batch = next(it)
    assert time.perf_counter() - t < 1.0  # start-up is part of the demo's time budget
    # uint8 pixels, scaled inside the model like the folder pipeline's
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["image"].min() == 0 and batch["image"].max() > 100  # black background
    assert batch["text"]["ids"].shape == (32, 12) and batch["text"]["ids"].dtype == np.int32
    assert batch["text"]["mask"].shape == (32, 12) and batch["text"]["mask"].dtype == np.int32
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert ((batch["label"] >= 0) & (batch["label"] < 9)).all()
    tok = pipeline.build_tokenizer(_config())
    assert all(t.startswith("what ") for t in tok.decode(batch["text"]["ids"]))


def test_caption_text_and_variants_reach_the_batch(rng):
    tok = shapes_tokenizer()
    seed = int(rng.integers(2**31))
    batch = next(pipeline.train_iterator(_config(text="caption"), batch_size=8, seed=seed))
    assert all(t.startswith("a ") and " and a " in t for t in tok.decode(batch["text"]["ids"]))
    batch = next(pipeline.train_iterator(_config(variant="text_only"), batch_size=8, seed=seed))
    assert (batch["image"] == 0).all()
    batch = next(pipeline.train_iterator(_config(variant="image_only"), batch_size=8, seed=seed))
    assert len({tuple(r) for r in batch["text"]["ids"].tolist()}) == 1


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["text"]["ids"], y["text"]["ids"])
        np.testing.assert_array_equal(x["text"]["mask"], y["text"]["mask"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_train_iterator_is_deterministic_in_seed(rng):
    seed = int(rng.integers(2**31))
    cfg = _config()
    _assert_same(
        _take(pipeline.train_iterator(cfg, batch_size=16, seed=seed), 3),
        _take(pipeline.train_iterator(cfg, batch_size=16, seed=seed), 3),
    )
    a = next(pipeline.train_iterator(cfg, batch_size=16, seed=seed))
    b = next(pipeline.train_iterator(cfg, batch_size=16, seed=seed + 1))
    assert not np.array_equal(a["image"], b["image"])


def test_state_round_trip(rng):
    cfg = _config()
    seed = int(rng.integers(2**31))
    it = pipeline.train_iterator(cfg, batch_size=16, seed=seed)
    _take(it, int(rng.integers(1, 20)))
    state = json.loads(json.dumps(it.get_state()))  # must survive orbax's JsonSave
    expected = _take(it, 4)
    fresh = pipeline.train_iterator(cfg, batch_size=16, seed=seed)
    next(fresh)
    fresh.set_state(state)
    _assert_same(_take(fresh, 4), expected)


def _image_ids(images: np.ndarray) -> list[bytes]:
    return [np.asarray(im, np.uint8).tobytes() for im in images]


def test_each_epoch_is_a_fresh_permutation(rng):
    n, bs = 24, 8
    cfg = _config(num_train=n)
    every = shapes.make_batch("train", np.arange(n))["image"]
    all_ids = [im.tobytes() for im in every]
    assert len(set(all_ids)) == n
    it = pipeline.train_iterator(cfg, batch_size=bs, seed=int(rng.integers(2**31)))
    epochs = []
    for _ in range(3):
        ids = []
        for b in _take(it, n // bs):
            ids += _image_ids(b["image"])
        assert sorted(ids) == sorted(all_ids)  # each example exactly once per epoch
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_make_the_global_batch(rng, count):
    cfg = _config()
    seed = int(rng.integers(2**31))
    whole = _take(pipeline.train_iterator(cfg, batch_size=16, seed=seed), 3)
    parts = [
        _take(
            pipeline.train_iterator(
                cfg, batch_size=16, seed=seed, process_index=p, process_count=count
            ),
            3,
        )
        for p in range(count)
    ]
    for step, batch in enumerate(whole):
        assert parts[0][step]["image"].shape[0] == 16 // count
        np.testing.assert_array_equal(
            np.concatenate([p[step]["image"] for p in parts]), batch["image"]
        )
        np.testing.assert_array_equal(
            np.concatenate([p[step]["text"]["ids"] for p in parts]), batch["text"]["ids"]
        )
        np.testing.assert_array_equal(
            np.concatenate([p[step]["label"] for p in parts]), batch["label"]
        )
    with pytest.raises(ValueError, match="multiple"):
        pipeline.train_iterator(cfg, batch_size=15, seed=seed, process_count=2)


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_batches_cover_the_split_in_order_with_padding(rng, split):
    n = int(rng.integers(20, 40))
    bs = 8 if n % 8 else 7
    cfg = _config(**{f"num_{split}": n})
    batches = list(pipeline.eval_batches(cfg, split, batch_size=bs))
    assert len(batches) == -(-n // bs)
    for b in batches:
        assert b["image"].shape == (bs, 32, 32, 3) and b["valid"].dtype == np.float32
        assert b["label"].shape == (bs,) and b["text"]["ids"].shape == (bs, 12)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == n and (valid[:n] == 1).all() and (valid[n:] == 0).all()
    labels = np.concatenate([b["label"] for b in batches])[:n]
    np.testing.assert_array_equal(labels, shapes.make_batch(split, np.arange(n))["label"])
    images = np.concatenate([b["image"] for b in batches])[:n]
    np.testing.assert_array_equal(images, shapes.make_batch(split, np.arange(n))["image"])
    # Padding rows are real inputs (never an all-padding text row).
    assert (batches[-1]["text"]["mask"].sum(-1) > 2).all()


def test_pipeline_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="coco"):
        pipeline.build_tokenizer(_config(name="coco"))
    with pytest.raises(ValueError, match="coco"):
        pipeline.train_iterator(_config(name="coco"), batch_size=8, seed=0)
    with pytest.raises(ValueError, match="weird"):
        pipeline.train_iterator(_config(variant="weird"), batch_size=8, seed=0)
    with pytest.raises(ValueError, match="answer"):
        pipeline.train_iterator(_config(text="answer"), batch_size=8, seed=0)
    with pytest.raises(ValueError, match="dev"):
        pipeline.eval_batches(_config(), "dev", batch_size=8)
