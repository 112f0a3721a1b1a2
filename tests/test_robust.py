"""Robustness evaluation: corruptions against independent references, attacks on a tiny trained
model, the --drop batch contract, and the evaluate CLI's corrupt/attack/report output.

One tiny folder run (200 steps, in this process) serves the attack and CLI tests. Expected
values come from scipy, Pillow, simplejpeg, nltk or numpy, never from the code under test.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nltk
import numpy as np
import pytest
import scipy.ndimage
import scipy.special
import simplejpeg
from PIL import Image, ImageEnhance

from mmjax.data.tokenize import WordPieceTokenizer
from mmjax.inference import answer
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.modalities import image as image_modality
from mmjax.modalities import text as text_modality
from mmjax.robust import attacks, corruptions, drop, report
from mmjax.trainer import loop, runs
from tests.test_folder import _texture, make_dataset

ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int, size: int = 48) -> np.ndarray:
    return _texture(np.random.default_rng(seed), size).astype(np.uint8)


# --- image corruptions ------------------------------------------------------------------------


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_blur_matches_scipy_gaussian_filter(severity):
    img = _image(severity)[:40, :36]  # not square: height and width each blurred along its axis
    sigma = corruptions.parameter("gaussian_blur", severity)
    ref = scipy.ndimage.gaussian_filter(img / 255.0, sigma=(sigma, sigma, 0), mode="nearest",
                                        truncate=4.0)
    want = np.round(np.clip(ref, 0, 1) * 255).astype(int)
    got = image_modality.corrupt_image(img, "gaussian_blur", severity, np.random.default_rng(0))
    assert got.dtype == np.uint8 and got.shape == img.shape
    assert np.abs(got.astype(int) - want).max() <= 1  # float rounding at .5 only


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_jpeg_matches_another_encoder(severity):
    img = _image(10 + severity, 64)
    quality = int(corruptions.parameter("jpeg", severity))
    ref = simplejpeg.decode_jpeg(simplejpeg.encode_jpeg(
        img, quality=quality, colorspace="RGB", colorsubsampling="420"), colorspace="RGB")
    got = image_modality.corrupt_image(img, "jpeg", severity, np.random.default_rng(0))
    diff = np.abs(got.astype(int) - ref)
    # Two libjpeg encoders write slightly different streams: the same image up to rare pixels,
    # an order of magnitude below the corruption itself.
    assert diff.mean() < 1.0, diff.mean()
    assert np.abs(got.astype(int) - img).mean() > 5 * diff.mean()


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_contrast_matches_pillow_on_grey_images(severity):
    grey = _image(20 + severity)[..., :1].repeat(3, axis=-1)  # R = G = B: Pillow's mean is ours
    c = corruptions.parameter("contrast", severity)
    ref = np.asarray(ImageEnhance.Contrast(Image.fromarray(grey)).enhance(c)).astype(int)
    got = image_modality.corrupt_image(grey, "contrast", severity, np.random.default_rng(0))
    assert np.abs(got.astype(int) - ref).max() <= 1  # Pillow rounds the mean to an integer


@pytest.mark.parametrize("severity", (1, 2, 3))
def test_gaussian_noise_has_the_tables_std(severity):
    grey = np.full((96, 96, 3), 128, np.uint8)  # mid-grey: no clipping up to 2.8 sigma
    got = image_modality.corrupt_image(grey, "gaussian_noise", severity, np.random.default_rng(3))
    delta = (got.astype(float) - 128) / 255
    c = corruptions.parameter("gaussian_noise", severity)
    assert abs(delta.std() / c - 1) < 0.04 and abs(delta.mean()) < 0.01


@pytest.mark.parametrize("name", sorted(image_modality.TABLES))
def test_image_severities_are_monotone(name):
    img = _image(7, 64)
    errors = [np.abs(image_modality.corrupt_image(img, name, s, np.random.default_rng(0))
                     .astype(float) - img).mean() for s in corruptions.SEVERITIES]
    assert all(a < b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.5


def test_float_batches_are_corrupted_as_their_pixels():
    img = np.stack([_image(1, 16), _image(2, 16)])
    normalized = img.astype(np.float32) * (1.0 / 127.5) - 1.0  # the normalize op
    pixels, back = image_modality.image_pixels(normalized)
    assert np.array_equal(pixels, img) and np.array_equal(back(pixels), normalized)
    out = corruptions.corrupt_batch({"image": normalized}, "contrast", 2,
                                    np.random.default_rng(0))
    want = image_modality.corrupt_image(img[1], "contrast", 2, np.random.default_rng(0))
    assert np.array_equal(out["image"][1], want.astype(np.float32) * (1.0 / 127.5) - 1.0)
    with pytest.raises(corruptions.CorruptionError, match="normalize"):
        image_modality.image_pixels((img / 255.0).astype(np.float32))  # another scaling


def test_specs_parse_and_name_bad_items():
    assert corruptions.parse_specs("jpeg:2, typo:1-3") == [("jpeg", 2), ("typo", 1), ("typo", 2),
                                                            ("typo", 3)]
    with pytest.raises(corruptions.CorruptionError, match="'fog'"):
        corruptions.parse_specs("fog:1")
    with pytest.raises(corruptions.CorruptionError, match="severity 6"):
        corruptions.parse_specs("jpeg:6")
    with pytest.raises(corruptions.CorruptionError, match="NAME:SEVERITY"):
        corruptions.parse_specs("jpeg")


# --- text and audio ----------------------------------------------------------------------------


_WORDS = [f"w{i}x{'abcdefgh'[i % 8] * (i % 5 + 1)}" for i in range(40)]


def _corrupted(name: str, severity: int) -> list[str]:
    rng = np.random.default_rng(severity)
    return [text_modality.corrupt_text(" ".join(_WORDS), name, severity, rng) for _ in range(50)]


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_typos_edit_one_character_per_word_at_the_tables_rate(severity):
    outs = _corrupted("typo", severity)
    changed = 0
    for out in outs:
        words = out.split()
        assert len(words) == len(_WORDS)
        for a, b in zip(_WORDS, words, strict=True):
            d = nltk.edit_distance(a, b, transpositions=True)
            assert d <= 1, (a, b)
            changed += d
    rate = changed / (len(outs) * len(_WORDS))
    p = corruptions.parameter("typo", severity)
    assert abs(rate - p) < 0.06, (rate, p)  # ~2000 words; a substitution may rewrite a letter


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_word_drops_keep_order_at_the_tables_rate(severity):
    outs = _corrupted("word_drop", severity)
    kept = 0
    for out in outs:
        words = out.split()
        it = iter(_WORDS)
        assert all(w in it for w in words)  # an ordered subsequence
        kept += len(words)
    rate = 1 - kept / (len(outs) * len(_WORDS))
    assert abs(rate - corruptions.parameter("word_drop", severity)) < 0.05
    assert text_modality.corrupt_text("one", "word_drop", 5, np.random.default_rng(0)) == "one"


def test_word_shuffles_permute_more_with_severity():
    moved = []
    for severity in corruptions.SEVERITIES:
        outs = _corrupted("word_shuffle", severity)
        assert all(sorted(o.split()) == sorted(_WORDS) for o in outs)
        moved.append(np.mean([np.mean([a != b for a, b in zip(o.split(), _WORDS, strict=True)])
                              for o in outs]))
    assert all(a < b for a, b in itertools.pairwise(moved)), moved


def test_text_batches_keep_unknown_words_through_the_tokenizer():
    tok = WordPieceTokenizer.train(["is there a red disc ?", "is there a blue square ?"] * 20,
                                   vocab_size=60)
    ids, mask = tok.encode(["is there a zebra disc ?", "a xylo square", "is there"], 12)
    assert (ids == tok.UNK).sum() >= 2  # "zebra" and "xylo" are not in the vocabulary
    texts = text_modality.decode_keeping_unknown(tok, ids)
    assert np.array_equal(tok.encode(texts, 12)[0], ids)  # a plain decode would drop them
    out = corruptions.corrupt_batch({"text": {"ids": ids, "mask": mask}}, "word_shuffle", 5,
                                    np.random.default_rng(1), tokenizer=tok)["text"]
    assert out["ids"].dtype == ids.dtype and np.array_equal(out["mask"], mask)
    for a, b in zip(out["ids"], ids, strict=True):  # a shuffle keeps the tokens
        assert sorted(a.tolist()) == sorted(b.tolist())
    assert not np.array_equal(out["ids"], ids)


@pytest.mark.parametrize("severity", corruptions.SEVERITIES)
def test_audio_noise_is_at_the_tables_snr(severity):
    t = np.arange(16000) / 16000
    rng = np.random.default_rng(severity)
    wave = (np.stack([np.sin(2 * np.pi * 440 * t), 0.1 * rng.standard_normal(16000)])
            .astype(np.float32))
    noisy = corruptions.corrupt_batch({"audio": wave}, "audio_noise", severity,
                                      np.random.default_rng(0))["audio"]
    noise = noisy.astype(np.float64) - wave
    snr = 10 * np.log10((wave.astype(np.float64) ** 2).sum(-1) / (noise**2).sum(-1))
    np.testing.assert_allclose(snr, corruptions.parameter("audio_noise", severity), atol=1e-3)
    assert noisy.dtype == np.float32
    with pytest.raises(corruptions.CorruptionError, match="waveforms"):
        corruptions.corrupt_batch({"audio": np.zeros((2, 8, 4), np.float32)}, "audio_noise", 1,
                                  np.random.default_rng(0))


# --- a tiny trained model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(data, workdir) of configs/folder.py:tiny trained for 200 steps (≈70 % test accuracy on
    "is there a disc/square?")."""
    from configs import folder

    base = tmp_path_factory.mktemp("robust")
    data = make_dataset(base / "data", {"train": 256, "val": 32, "test": 96}, image_size=32)
    c = folder.get_config("tiny")
    c.data.path = str(data)
    c.total_steps, c.batch_size, c.eval_every, c.checkpoint_every = 200, 32, 200, 200
    c.optimizer.lr = 2e-3
    loop.train_and_evaluate(c, base / "run")
    return data, base / "run"


def _model_batch(workdir: Path, rows: int = 96):
    run = runs.load(workdir)
    model = run.build_model()
    return run, model, run.variables(), answer.first_rows(run, "test", rows)


@pytest.mark.slow
@pytest.mark.compute_bound
def test_token_embeds_entry_point_matches_ids(trained):
    _run, model, variables, batch = _model_batch(trained[1], 24)
    table = variables["params"]["text"]["token_embedding"]["embedding"]
    logits = jax.jit(lambda b: model.apply(variables, b)["answer"]["logits"])
    embeds = jnp.take(table, batch["text"]["ids"], axis=0)
    via_embeds = logits({**batch, "text": {**batch["text"], "token_embeds": embeds}})
    np.testing.assert_allclose(via_embeds, logits(batch), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.compute_bound
def test_attacks_reduce_accuracy_within_the_eps_ball(trained):
    # 24 rows and 5 PGD steps: the tests' XLA flags (no LLVM optimisation) make these
    # gradient loops slow to run.
    _run, model, variables, batch = _model_batch(trained[1], 24)
    names = attacks.targets(model.encoders)
    assert names == ["image", "text"]
    attack = jax.jit(lambda b, eps, method, steps: attacks.attack_batch(
        model, variables, b, task="answer", names=names, method=method, eps=eps, steps=steps),
        static_argnames=("method", "steps"))
    x0 = {"image": batch["image"] / 255.0,  # the pipeline's uint8 pixels on the [0, 1] scale
          "text": np.asarray(variables["params"]["text"]["token_embedding"]["embedding"])[
              batch["text"]["ids"]]}
    labels = batch["label"]
    logits_of = jax.jit(lambda b: model.apply(variables, b)["answer"]["logits"])
    logits = logits_of(batch)
    clean_acc = float(np.mean(np.argmax(logits, -1) == labels))

    # eps = 0: PGD changes nothing and robust accuracy is the clean accuracy.
    x, clean, robust = attack(batch, 0.0, "pgd", 5)
    np.testing.assert_allclose(x["image"], x0["image"], rtol=0, atol=1e-6)  # float32 vs 64
    assert np.array_equal(x["text"], x0["text"])
    assert float(clean.mean()) == clean_acc == float(robust.mean())

    eps = 8 / 255
    x_f, _, robust_f = attack(batch, eps, "fgsm", 1)
    x_p, _, robust_p = attack(batch, eps, "pgd", 5)
    assert float(robust_f.mean()) < clean_acc - 0.1, (float(robust_f.mean()), clean_acc)
    assert float(robust_p.mean()) <= float(robust_f.mean())
    # The reported accuracy is that of the model on the returned inputs (at most).
    adv = {**batch, "image": x_p["image"] * 2 - 1,
           "text": {**batch["text"], "token_embeds": x_p["text"]}}
    adv_acc = np.mean(np.argmax(logits_of(adv), -1) == labels)
    assert float(robust_p.mean()) <= adv_acc < clean_acc
    mask = batch["text"]["mask"][..., None].astype(bool)
    for x in (x_f, x_p):
        for m in ("image", "text"):
            assert np.abs(np.asarray(x[m]) - x0[m]).max() <= eps + 1e-6
        assert x["image"].min() >= 0 and x["image"].max() <= 1
        assert np.array_equal(np.where(mask, 0, x["text"]), np.where(mask, 0, x0["text"]))
    assert np.isclose(np.abs(np.asarray(x_f["image"]) - x0["image"]).max(), eps, atol=1e-6)


# --- --drop ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.compute_bound
def test_drop_hands_the_model_present_masks(trained, monkeypatch):
    seen = []
    compile_eval = loop.compile_eval

    def recording(s):
        fn = compile_eval(s)

        def wrapped(state, batch):
            seen.append(jax.device_get(batch))
            return fn(state, batch)

        return wrapped

    monkeypatch.setattr(loop, "compile_eval", recording)
    out = checkpoint_metrics(trained[1], drop_modalities="image")
    assert out["drop"] == ["image"] and "accuracy" in out and "qa_accuracy" not in out
    assert sum(int(b["valid"].sum()) for b in seen) == 96  # every test row went through
    for batch in seen:
        present = batch["present"]
        # (a pipeline that writes masks of its own keeps them: every example has its text)
        assert all(np.all(v) for k, v in present.items() if k != "image")
        assert present["image"].dtype == bool and not present["image"].any()
        assert present["image"].shape == batch["label"].shape
        # the placeholder: the entry in place, its usual dtype and per-row shape
        assert batch["image"].dtype == np.uint8  # pixels stay uint8 until the step
        assert batch["image"].shape[:present["image"].ndim] == present["image"].shape


@pytest.mark.slow
@pytest.mark.compute_bound
def test_dropping_the_image_changes_accuracy(trained):
    """"is there a disc/square?" cannot be answered without the image: marking it absent must
    move the accuracy (the model replaces it by its stand-in token)."""
    clean = checkpoint_metrics(trained[1])
    no_image = checkpoint_metrics(trained[1], drop_modalities="image")
    assert no_image["drop"] == ["image"]
    assert abs(no_image["accuracy"] - clean["accuracy"]) >= 0.05, (no_image, clean)


@pytest.mark.slow
@pytest.mark.compute_bound
def test_drop_of_an_unknown_modality_is_a_clear_error(trained):
    with pytest.raises(drop.DropError, match=r"'audio'.*modalities: \['image', 'text'\]"):
        checkpoint_metrics(trained[1], drop_modalities="image,audio")
    fn = drop.batch_drop(["text"])
    batch = {"label": np.zeros(3, np.int32), "present": {"image": np.array([1, 0, 1], bool)}}
    with pytest.raises(drop.DropError, match="no 'text' entry"):
        fn(batch)
    with_text = fn({**batch, "text": {"ids": np.ones((3, 4), np.int32)}})
    assert with_text["present"]["image"].tolist() == [True, False, True]
    assert with_text["present"]["text"].tolist() == [False] * 3


@pytest.mark.slow
@pytest.mark.compute_bound
def test_corrupted_metrics_equal_the_model_on_noisy_batches_made_here(trained):
    """gaussian_noise at severities 2 and 5, redone in numpy from the documented contract:
    ImageNet-C's std (0.12, 0.38 on the [0, 1] scale), batch ``i`` drawing from
    ``default_rng([seed, crc32(name), severity, i])``; the model applied here."""
    import zlib

    from mmjax.data import pipeline

    workdir = trained[1]
    got = checkpoint_metrics(workdir, corrupt="gaussian_noise:2,gaussian_noise:5")
    run = runs.load(workdir)
    model, variables = run.build_model(), run.variables()
    seed, n_dev = int(run.config.get("seed", 0)), jax.device_count()
    bs = max(n_dev, (run.config.get("eval_batch_size") or run.config.batch_size) // n_dev * n_dev)
    apply = jax.jit(lambda batch: model.apply(variables, batch)["answer"]["logits"])
    for severity, std in ((2, 0.12), (5, 0.38)):
        right, nll, count = 0, 0.0, 0
        batches = pipeline.eval_batches(run.config.data, "test", batch_size=bs,
                                        tokenizer=run.tokenizer)
        for i, batch in enumerate(batches):
            rng = np.random.default_rng([seed, zlib.crc32(b"gaussian_noise"), severity, i])
            x = batch["image"] / 255.0 + rng.normal(scale=std, size=batch["image"].shape)
            noisy = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
            logits = np.asarray(apply({**batch, "image": noisy}), np.float64)
            keep = np.asarray(batch["valid"]) > 0
            label = np.asarray(batch["label"])[keep]
            logp = logits[keep] - scipy.special.logsumexp(logits[keep], axis=1, keepdims=True)
            right += int((logits[keep].argmax(1) == label).sum())
            nll -= float(logp[np.arange(len(label)), label].sum())
            count += int(keep.sum())
        m = got["corrupt"][f"gaussian_noise:{severity}"]
        assert count == 96 and m["accuracy"] == right / count, (severity, m, right)
        assert m["loss"] == pytest.approx(nll / count, abs=1e-5), (severity, m)
    clean = checkpoint_metrics(workdir)
    assert got["corrupt"]["gaussian_noise:5"]["loss"] > clean["loss"] + 0.01, (got, clean)


# --- the CLI -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.compute_bound
def test_evaluate_cli_corrupt_attack_report(trained, tmp_path):
    _data, workdir = trained
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    test_line = [r for r in logged if r["split"] == "test"][-1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "mmjax.evaluate", "--workdir", str(workdir),
         "--corrupt", "gaussian_noise:1-2,word_drop:5", "--attack", "fgsm", "--eps", "0.03",
         "--report", str(tmp_path / "report")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for k in ("step", "split", "accuracy", "loss", "answer_accuracy", "qa_accuracy"):
        assert out[k] == test_line[k], k
    assert set(out["corrupt"]) == {"gaussian_noise:1", "gaussian_noise:2", "word_drop:5"}
    # The CLI's numbers are the library's (checked against numpy above); word_drop:5 (half the
    # words gone) changes what the model sees.
    lib = checkpoint_metrics(workdir, corrupt="gaussian_noise:1-2,word_drop:5")["corrupt"]
    for name, v in out["corrupt"].items():
        assert v["accuracy"] == lib[name]["accuracy"], name
        assert v["loss"] == pytest.approx(lib[name]["loss"], abs=1e-6), name
    assert abs(out["corrupt"]["word_drop:5"]["loss"] - out["loss"]) > 1e-3, out
    assert set(out["attack"]) == {f"fgsm:{m}:0.03" for m in ("image", "text", "image+text")}
    for v in out["attack"].values():
        assert v["clean_accuracy"] == pytest.approx(out["accuracy"], abs=1e-6)
        assert v["eps"] == 0.03 and v["steps"] == 1 and v["count"] == 96
    assert out["attack"]["fgsm:image:0.03"]["accuracy"] < out["accuracy"]

    rows = list(csv.DictReader((tmp_path / "report" / "robustness.csv").open()))
    assert len(rows) == 1 + 3 + 3 and rows[0]["name"] == "clean"
    assert float(rows[0]["accuracy"]) == pytest.approx(out["accuracy"])
    md = (tmp_path / "report" / "robustness.md").read_text()
    assert md.count("\n| corrupt |") == 3 and md.count("\n| attack |") == 3
    for name in ("corruptions.png", "attacks.png"):
        with Image.open(tmp_path / "report" / name) as im:
            assert im.format == "PNG" and min(im.size) >= 200
    assert [p.name for p in report.write(out, tmp_path / "again")] == list(report.FILES)
