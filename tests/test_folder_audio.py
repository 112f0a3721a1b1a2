"""Audio in folder and TFDS data: decoding and resampling against scipy, features against
transformers, bad clips named or skipped, records with any subset of the modalities (the
``present`` flags), towers fitted to the data (time series too).

Datasets are written at test time: handwritten digits, clips of beeps written with soundfile at
several rates (tests/realdata_audio.py), questions; and a tiny TFDS builder with an ``Audio``
feature (tests/tfds_audio_builder.py). Trained runs with audio and series records (predict,
evaluate --drop, export) are in tests/test_folder_audio_run.py.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import soundfile
from scipy import signal

from mmjax.data import folder, pipeline
from mmjax.pp import audio as audio_pp
from tests.realdata_audio import digits_beeps

REPO = Path(__file__).resolve().parents[1]
RATE, MELS, FRAMES = 16000, 32, 64


def _config(path: Path, **overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({
        "name": "folder", "path": str(path), "image_size": 16, "max_len": 16, "tokenizer": "",
        "vocab_size": 100, "skip_bad": False, "cache": True, "cache_mb": 64, "num_workers": 0,
        "pp_train": "decode|resize|normalize|tokenize|decode_audio|audio_features",
        "pp_eval": "decode|resize|normalize|tokenize|decode_audio|audio_features",
        "audio": {"front_end": "ast", "preprocessor": "", "sampling_rate": RATE,
                  "num_mel_bins": MELS, "max_frames": FRAMES},
    })
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio_folder")
    digits_beeps(root, image_size=16, num_val=12, num_test=8, num_train=24, train_questions=1)
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _records(root: Path, split: str) -> list[dict]:
    return [json.loads(x) for x in (root / f"{split}.jsonl").read_text().splitlines()]


def _write(root: Path, split: str, recs: list[dict]) -> None:
    (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


# --- decoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("rate,channels,fmt", [(22050, 2, "WAV"), (8000, 1, "FLAC"),
                                               (44100, 1, "OGG"), (16000, 2, "WAV")])
def test_decode_averages_channels_and_resamples_like_scipy(tmp_path, rate, channels, fmt):
    rng = np.random.default_rng([rate, channels])
    t = np.arange(int(rng.uniform(0.5, 0.9) * rate)) / rate
    mono = sum(rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t
                                              + rng.uniform(0, 6)) for _ in range(3))
    x = np.stack([mono * g for g in rng.uniform(0.6, 1.0, channels)], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, x, rate, format=fmt, **({} if fmt == "OGG" else {"subtype": "PCM_16"}))
    got = audio_pp.decode_audio(path.name, RATE, str(tmp_path))
    raw, r = soundfile.read(path, dtype="float64", always_2d=True)
    g = math.gcd(RATE, r)
    want = signal.resample_poly(raw.mean(axis=1), RATE // g, r // g)  # the reference resampler
    assert got.dtype == np.float32 and got.ndim == 1
    assert abs(len(got) - len(want)) <= 1
    n = min(len(got), len(want))
    # soxr and scipy's polyphase filter differ near Nyquist and at the edges; tones up to 3 kHz
    # agree within 1e-3 (measured <= 1.0e-3), so 2e-3 away from the first and last 200 samples.
    np.testing.assert_allclose(got[200:n - 200], want[200:n - 200], atol=2e-3)
    # Bytes and (int16 samples, rate) pairs decode to the same waveform as the file.
    np.testing.assert_array_equal(audio_pp.decode_audio(path.read_bytes(), RATE), got)
    if fmt != "OGG":
        pcm, _ = soundfile.read(path, dtype="int16", always_2d=True)
        np.testing.assert_allclose(audio_pp.decode_audio((pcm, rate), RATE), got, atol=1e-6)


def test_batch_features_equal_transformers_ast_extractor(dataset):
    from transformers import ASTFeatureExtractor

    cfg = _config(dataset)
    batch = next(iter(pipeline.eval_batches(cfg, "val", batch_size=4,
                                            tokenizer=pipeline.build_tokenizer(cfg))))
    assert batch["audio"].shape == (4, FRAMES, MELS) and batch["audio"].dtype == np.float32
    fe = ASTFeatureExtractor(sampling_rate=RATE, num_mel_bins=MELS, max_length=FRAMES)
    clips = [audio_pp.decode_audio(r["audio"], RATE, str(dataset))
             for r in _records(dataset, "val")[:4]]
    want = fe(clips, sampling_rate=RATE, return_tensors="np")["input_values"]
    np.testing.assert_allclose(batch["audio"], want, atol=2e-3)
    assert "present" not in batch  # every val record has all three modalities


def test_whisper_front_end_batches_match_transformers(dataset):
    from transformers import WhisperFeatureExtractor

    audio = {"front_end": "whisper", "preprocessor": "", "sampling_rate": RATE,
             "num_mel_bins": MELS, "max_frames": 100}
    cfg = _config(dataset, audio=audio)
    batch = next(iter(pipeline.eval_batches(cfg, "val", batch_size=4,
                                            tokenizer=pipeline.build_tokenizer(cfg))))
    assert batch["audio"].shape == (4, MELS, 100)  # [B, mels, frames]: the whisper layout
    fe = WhisperFeatureExtractor(feature_size=MELS, sampling_rate=RATE, hop_length=160,
                                 chunk_length=1, n_fft=400)
    clips = [audio_pp.decode_audio(r["audio"], RATE, str(dataset))
             for r in _records(dataset, "val")[:4]]
    want = fe(clips, sampling_rate=RATE, return_tensors="np")["input_features"]
    np.testing.assert_allclose(batch["audio"], want, atol=2e-3)


@pytest.mark.parametrize("front_end", ["ast", "whisper"])
def test_clips_longer_than_the_features_are_reported(dataset, tmp_path, caplog, front_end):
    """The val clips last 1.1-1.25 s (soundfile's own count): 64 frames (~0.65 s) cut every one
    of them and the log says so with the longest duration; 200 frames (2 s) cut none."""
    import logging

    seconds = [soundfile.info(dataset / r["audio"]).duration for r in _records(dataset, "val")]
    assert min(seconds) > 0.7 and max(seconds) < 1.9
    root = _copy(dataset, tmp_path / "copy")  # a new path: nothing cached from other tests
    for frames, cut in ((64, len(seconds)), (200, 0)):
        audio = {"front_end": front_end, "preprocessor": "", "sampling_rate": RATE,
                 "num_mel_bins": MELS, "max_frames": frames}
        cfg = _config(root, audio=audio)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmjax.data.records"):
            pipeline.dataset_info(cfg, pipeline.build_tokenizer(cfg))
        said = [r.getMessage() for r in caplog.records if "data val:" in r.getMessage()]
        if cut:
            assert len(said) == 1 and f"{cut} clips are longer" in said[0], said
            assert f"longest {max(seconds):.2f} s" in said[0] and "max_frames" in said[0]
        else:
            assert said == []


def test_spec_augment_masks_train_features_only(dataset):
    pp = "decode|resize|normalize|tokenize|decode_audio|audio_features"
    cfg = _config(dataset, pp_train=pp + "|spec_augment(1, 6, 1, 8)")
    tok = pipeline.build_tokenizer(cfg)
    train = next(pipeline.train_iterator(cfg, batch_size=8, seed=0, tokenizer=tok))["audio"]
    plain = next(pipeline.train_iterator(_config(dataset), batch_size=8, seed=0,
                                         tokenizer=tok))["audio"]
    masked = train != plain
    assert masked.any()
    assert np.all(train[masked] == 0.0)  # masked cells take the mask value, others unchanged
    # Masks span whole frames or whole mel bins.
    for row in masked:
        cols, rows = row.all(axis=0), row.all(axis=1)
        assert np.array_equal(row, cols[None, :] | rows[:, None])



@pytest.mark.slow
def test_worker_processes_give_the_same_audio_batches(dataset):
    """The audio ops travel to grain worker processes (pickled) and compute there what they
    compute in this process, spec_augment's random masks included."""
    pp = "decode|resize|normalize|tokenize|decode_audio|audio_features|spec_augment(1, 6, 1, 8)"
    cfg = _config(dataset, pp_train=pp)
    tok = pipeline.build_tokenizer(cfg)
    here = pipeline.train_iterator(cfg, batch_size=8, seed=3, tokenizer=tok)
    workers = pipeline.train_iterator(_config(dataset, pp_train=pp, num_workers=2),
                                      batch_size=8, seed=3, tokenizer=tok)
    for _ in range(2):
        want, got = next(here), next(workers)
        assert got.keys() == want.keys() and "audio" in want
        jax.tree.map(np.testing.assert_array_equal, got, want)

# --- bad clips ------------------------------------------------------------------------------


def _damage(case: str, root: Path) -> str:
    recs = _records(root, "val")
    clip = root / recs[3]["audio"]
    if case == "missing":
        clip.unlink()
        return f"val.jsonl:4: audio file {clip} not found"
    if case == "undecodable":
        clip.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(200)))
    elif case == "empty":
        soundfile.write(clip, np.zeros((0, 1)), 8000, format=clip.suffix[1:].upper())
    elif case == "nan":
        x = np.random.default_rng(0).normal(0, 0.1, 4000)
        x[100] = np.nan
        clip = clip.with_suffix(".nan.wav")
        soundfile.write(clip, x, 8000, subtype="FLOAT")
        recs[3]["audio"] = str(clip.relative_to(root))
        _write(root, "val", recs)
    why = {"undecodable": "", "empty": "no audio samples", "nan": "non-finite"}[case]
    return f"val.jsonl:4: cannot decode audio file {clip}: {why}"


@pytest.mark.parametrize("case", ["missing", "undecodable", "empty", "nan"])
def test_bad_audio_is_named_or_skipped(dataset, tmp_path, case):
    root = _copy(dataset, tmp_path / "copy")
    needle = _damage(case, root)
    cfg = _config(root)
    with pytest.raises(folder.BadDataError) as err:
        pipeline.dataset_info(cfg, pipeline.build_tokenizer(cfg))
    assert needle in str(err.value)
    cfg = _config(root, skip_bad=True)
    info = pipeline.dataset_info(cfg, pipeline.build_tokenizer(cfg))
    assert info["skipped_val"] == 1 and info["skipped_train"] == 0
    assert sum(b["valid"].sum() for b in pipeline.eval_batches(cfg, "val", batch_size=8)) == 11


# --- record subsets -------------------------------------------------------------------------


def test_records_with_some_modalities_get_placeholders_and_present_flags(dataset, tmp_path):
    root = _copy(dataset, tmp_path / "subset")
    recs = _records(root, "val")
    del recs[1]["audio"], recs[5]["audio"]
    del recs[2]["image"]
    recs[3] = {"audio": recs[3]["audio"], "label": recs[3]["label"]}  # audio only
    _write(root, "val", recs)
    cfg = _config(root)
    tok = pipeline.build_tokenizer(cfg)
    pipeline.dataset_info(cfg, tok)
    assert pipeline.modalities(cfg) == ("image", "audio", "text")
    batch = next(iter(pipeline.eval_batches(cfg, "val", batch_size=8, tokenizer=tok)))
    present = batch["present"]
    assert sorted(present) == ["audio", "image", "text"]
    want_audio = [i not in (1, 5) for i in range(8)]
    np.testing.assert_array_equal(present["audio"], want_audio)
    np.testing.assert_array_equal(present["image"], [i not in (2, 3) for i in range(8)])
    np.testing.assert_array_equal(present["text"], [i != 3 for i in range(8)])
    assert batch["audio"].shape == (8, FRAMES, MELS) and batch["audio"].dtype == np.float32
    assert batch["image"].shape == (8, 16, 16, 3) and batch["text"]["ids"].shape == (8, 16)
    # Present clips are the real features, whatever their neighbours lack.
    full = next(iter(pipeline.eval_batches(_config(dataset), "val", batch_size=8, tokenizer=tok)))
    np.testing.assert_array_equal(batch["audio"][want_audio], full["audio"][want_audio])
    # Train has every modality in every record: its batches carry no flags.
    assert "present" not in next(pipeline.train_iterator(cfg, batch_size=4, seed=0,
                                                         tokenizer=tok))


def _folder_config(root: Path, **overrides) -> ml_collections.ConfigDict:
    from configs import folder as folder_config

    c = folder_config.get_config("tiny")
    c.data.path = str(root)
    c.total_steps, c.eval_every, c.checkpoint_every, c.log_every = 4, 4, 4, 2
    with c.unlocked():
        c.model.fusion.update(overrides)
    return c


def _drop(root: Path, field: str) -> None:
    for split in ("train", "val", "test"):
        recs = _records(root, split)
        for r in recs:
            r.pop(field, None)
        _write(root, split, recs)


def test_setup_removes_towers_of_absent_modalities(dataset, tmp_path):
    from mmjax.trainer import loop

    root = _copy(dataset, tmp_path / "no_audio")
    _drop(root, "audio")
    c = _folder_config(root)
    s = loop.setup(c, tmp_path / "w")
    assert sorted(s.model.encoders) == ["image", "text"]
    assert "audio" not in c.model.encoders
    batch = next(iter(pipeline.eval_batches(c.data, "val", batch_size=2)))
    assert "audio" not in batch


def test_a_part_that_reads_an_absent_modality_is_named(dataset, tmp_path):
    from mmjax.trainer import loop

    root = _copy(dataset, tmp_path / "no_text")
    _drop(root, "text")
    with pytest.raises(ValueError, match=r"model\.fusion\.query='text'.*no 'text'"):
        loop.setup(_folder_config(root), tmp_path / "w")
    with pytest.raises(ValueError, match=r"evals\.qa\.kind='qa' \(it reads text\).*no 'text'"):
        loop.setup(_folder_config(root, query="image"), tmp_path / "w2")


# --- TFDS -------------------------------------------------------------------------------------


def test_tfds_audio_feature_becomes_the_audio_modality(tmp_path):
    from tests import tfds_audio_builder

    cfg = ml_collections.ConfigDict({
        "name": "tfds", "tfds_name": "mmjax_beeps/tiny", "data_dir": str(tmp_path),
        "image_key": "image", "audio_key": "audio", "text_key": "", "text": "how many beeps?",
        "label_key": "label", "train_split": "train", "val_split": "val", "test_split": "test",
        "max_len": 8, "tokenizer": "", "vocab_size": 50,
        "pp_train": "tokenize|decode_audio|audio_features",
        "pp_eval": "tokenize|decode_audio|audio_features", "cache": True,
        "audio": {"front_end": "ast", "preprocessor": "", "sampling_rate": RATE,
                  "num_mel_bins": MELS, "max_frames": FRAMES},
    })
    with tfds_audio_builder.without_tensorflow():
        tfds_audio_builder.build(str(tmp_path))
        import tensorflow_datasets as tfds

        raw = tfds.data_source("mmjax_beeps/tiny", split="val", data_dir=str(tmp_path))
        tok = pipeline.build_tokenizer(cfg)
        info = pipeline.dataset_info(cfg, tok)
        assert info["num_classes"] == 3 and pipeline.modalities(cfg) == ("audio", "text")
        batch = next(iter(pipeline.eval_batches(cfg, "val", batch_size=8, tokenizer=tok)))
    assert "image" not in batch and batch["audio"].shape == (8, FRAMES, MELS)
    import soxr
    from transformers import ASTFeatureExtractor

    fe = ASTFeatureExtractor(sampling_rate=RATE, num_mel_bins=MELS, max_length=FRAMES)
    for i in range(8):
        # 16-bit PCM at the 8 kHz the feature declares, resampled to 16 kHz (the resampler
        # itself is checked against scipy above).
        pcm = raw[i]["audio"].astype(np.float32) / 32768.0
        wave = soxr.resample(pcm, 8000, RATE, quality="HQ")
        want = fe(wave, sampling_rate=RATE, return_tensors="np")["input_values"][0]
        np.testing.assert_allclose(batch["audio"][i], want, atol=2e-3)
        assert int(batch["label"][i]) == int(raw[i]["label"])


def test_inspect_benchmark_measures_audio_beside_transformers(dataset, capsys):
    from mmjax.data import inspect as data_inspect

    config = ml_collections.ConfigDict({"seed": 0, "batch_size": 4,
                                        "data": _config(dataset).to_dict()})
    result = data_inspect.benchmark(config, 2)
    out = capsys.readouterr().out
    assert "pipeline: " in out and " images/s " in out
    assert "audio: ast features (64, 32) of 8 clips" in out and "ASTFeatureExtractor" in out
    assert result["mmjax_clips_per_s"] > 0 and result["hf_clips_per_s"] > 0
    assert result["max_abs_diff"] <= 2e-3  # the same features as transformers'


# --- time series ------------------------------------------------------------------------------


def _add_series(root: Path, skip: tuple[int, ...] = ()) -> dict[int, np.ndarray]:
    """Gives val records a random-walk series [40..90 steps, 3 channels] (not those in
    ``skip``); returns them by record index."""
    rng = np.random.default_rng(7)
    (root / "series").mkdir(exist_ok=True)
    written = {}
    for split in ("train", "val", "test"):
        recs = _records(root, split)
        for i, r in enumerate(recs):
            if split == "val" and i in skip:
                continue
            x = np.cumsum(rng.normal(size=(int(rng.integers(40, 90)), 3)), axis=0)
            r["series"] = f"series/{split}_{i}.npy"
            np.save(root / r["series"], x)
            if split == "val":
                written[i] = x
        _write(root, split, recs)
    return written


def test_series_records_are_fitted_flagged_and_validated(dataset, tmp_path):
    root = _copy(dataset, tmp_path / "series")
    written = _add_series(root, skip=(2,))
    cfg = _config(root, pp_eval=_config(root).pp_eval + "|series(64, 3)",
                  pp_train=_config(root).pp_train + "|series(64, 3)")
    tok = pipeline.build_tokenizer(cfg)
    pipeline.dataset_info(cfg, tok)
    assert pipeline.modalities(cfg) == ("image", "audio", "series", "text")
    batch = next(iter(pipeline.eval_batches(cfg, "val", batch_size=4, tokenizer=tok)))
    values, mask = batch["series"]["values"], batch["series"]["mask"]
    assert values.shape == (4, 64, 3) and values.dtype == np.float32 and mask.shape == (4, 64)
    np.testing.assert_array_equal(batch["present"]["series"], [True, True, False, True])
    for i in (0, 1, 3):
        x = written[i][:64]
        np.testing.assert_allclose(values[i][: len(x)], x, rtol=1e-6)
        assert not values[i][len(x):].any()  # zero padding after the series, masked out
        np.testing.assert_array_equal(mask[i], np.arange(64) < len(x))
    assert mask[2].all() and not values[2].any()  # the placeholder: finite, never read
    bad = _records(root, "val")
    x = written[0].copy()
    x[5, 1] = np.nan
    np.save(root / bad[0]["series"], x)
    with pytest.raises(folder.BadDataError, match=r"val\.jsonl:1: cannot decode series file .*"
                                                  r"non-finite"):
        folder.FolderSource(root, "val")


@pytest.mark.slow
def test_series_tower_is_built_for_series_records(dataset, tmp_path):
    import jax

    from mmjax.trainer import loop

    root = _copy(dataset, tmp_path / "series_run")
    _add_series(root)
    c = _folder_config(root)
    s = loop.setup(c, tmp_path / "w")
    assert sorted(s.model.encoders) == ["audio", "image", "series", "text"]
    batch = next(iter(pipeline.eval_batches(c.data, "val", batch_size=2)))
    batch = {k: v for k, v in batch.items() if k != "valid"}
    variables = s.model.init(jax.random.PRNGKey(0), batch)
    assert "series" in variables["params"]
    towers = s.model.apply(variables, batch, method="encode")
    assert towers["series"]["tokens"].shape == (2, 8, 64)  # 64 steps in patches of 8
