"""Mixtures of folders and shard sets: proportions, determinism, resume, merged vocabularies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmjax.data import folder, pipeline, records, shards
from tests.test_shards import _assert_same, data_config, make_folder

A_LABELS, B_LABELS = ("yes", "no", "maybe"), ("left", "right")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    make_folder(root / "a", {"train": 23, "val": 5, "test": 4}, seed=1, labels=A_LABELS)
    b = make_folder(root / "b", {"train": 11, "val": 3, "test": 3}, seed=2, labels=B_LABELS)
    shards.write(b, root / "b_shards", shard_mb=0.004)
    return root


def _mix(root, spec: dict) -> object:
    return data_config(root / "unused", mixture=json.dumps({str(root / k): w
                                                            for k, w in spec.items()}))


def test_a_3_to_1_mixture_draws_rows_in_those_proportions(parts):
    cfg = _mix(parts, {"a": 3, "b_shards": 1})
    tok = pipeline.build_tokenizer(cfg)
    vocab = records.labels(cfg, "")
    assert sorted(map(str, vocab)) == sorted(A_LABELS + B_LABELS)
    b_classes = {vocab.index(x) for x in B_LABELS}
    it = pipeline.train_iterator(cfg, batch_size=8, seed=5, tokenizer=tok)
    batches = [next(it) for _ in range(20)]  # 160 rows: A's 23 records seen ~5 times
    from_b = np.mean([int(c) in b_classes for b in batches for c in b["label"]])
    fractions = pipeline.source_fractions(cfg, batch_size=8, seed=5, start=0, stop=20)
    assert fractions == {"data/a_fraction": pytest.approx(1 - from_b),
                         "data/b_shards_fraction": pytest.approx(from_b)}
    assert abs(from_b - 0.25) <= 0.03
    assert set(batches[0]) >= {"image", "series", "text", "label", "present"}

    # Deterministic, resumable, and the same rows whatever the process count.
    again = pipeline.train_iterator(cfg, batch_size=8, seed=5, tokenizer=tok)
    for _ in range(7):
        next(again)
    state = again.get_state()
    resumed = pipeline.train_iterator(cfg, batch_size=8, seed=5, tokenizer=tok)
    resumed.set_state(json.loads(json.dumps(state)))
    _assert_same([next(resumed) for _ in range(13)], batches[7:])
    halves = [pipeline.train_iterator(cfg, batch_size=8, seed=5, process_index=i,
                                      process_count=2, tokenizer=tok) for i in range(2)]
    for want in batches[:3]:
        lo, hi = next(halves[0]), next(halves[1])
        np.testing.assert_array_equal(np.concatenate([lo["label"], hi["label"]]), want["label"])
        np.testing.assert_array_equal(np.concatenate([lo["image"], hi["image"]]), want["image"])
    # Every source's records are seen: B's 11 train records within 40 of its rows.
    seen_b = {tuple(row.ravel()[:32]) for b in batches for row, c in zip(b["image"], b["label"],
              strict=True) if int(c) in b_classes}
    assert len(seen_b) >= 8

    evals = list(pipeline.eval_batches(cfg, "val", batch_size=4, tokenizer=tok))
    assert sum(int(b["valid"].sum()) for b in evals) == 5 + 3


def test_mixture_refuses_disagreeing_label_types_and_bad_specs(parts, tmp_path):
    ints = make_folder(tmp_path / "ints", {"train": 6, "val": 2, "test": 2}, labels=(0, 1))
    cfg = data_config(tmp_path / "unused", mixture=json.dumps({str(parts / "a"): 1,
                                                               str(ints): 1}))
    with pytest.raises(folder.BadDataError, match="disagree on the label's type: ints has int"):
        records.labels(cfg, "")
    for spec, match in (("{", "not JSON"), ('{"x": 0}', "positive number"),
                        ("[1]", "must map dataset folders")):
        with pytest.raises(ValueError, match=match):
            records.labels(data_config(tmp_path, mixture=spec), "")


@pytest.mark.slow
def test_training_on_a_mixture_logs_each_sources_fraction_and_loss(parts, tmp_path):
    """configs/folder.py:tiny on a 3:1 mixture: train lines carry both sources' fractions (exact:
    the interleaving is fixed) and their losses."""
    from configs.folder import get_config
    from mmjax import trainer

    cfg = get_config("tiny")
    with cfg.unlocked():
        cfg.data.mixture = json.dumps({str(parts / "a"): 3, str(parts / "b_shards"): 1})
        cfg.data.pp_train = cfg.data.pp_eval = "decode|resize|normalize|tokenize|series(16, 2)"
        cfg.total_steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 6, 2, 6, 6
    trainer.train_and_evaluate(cfg, tmp_path / "w")
    lines = [json.loads(x) for x in (tmp_path / "w/metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == [2, 4, 6]
    for x in train:
        assert x["data/a_fraction"] == 0.75 and x["data/b_shards_fraction"] == 0.25
        assert np.isfinite(x["data/a_loss"]) and np.isfinite(x["data/b_shards_loss"])
    assert train[-1]["data/a_loss"] != train[-1]["data/b_shards_loss"]  # at first both log(5)
    assert {x["split"] for x in lines} == {"train", "val", "test"}
