"""Audio front ends against transformers' feature extractors, and SpecAugment.

Extractors are configured here (odd mel counts, lengths, normalisation constants), saved with
``save_pretrained`` and read back with ``mmjax.hf.load_feature_extractor``; the waveforms are
fresh random noise of odd lengths, some shorter and some longer than the padded length.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers

from mmjax import hf
from mmjax.pp import audio_features as audio

TOL = 2e-3  # the bar for front ends


def _waves(seed: int, *lengths: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # different loudness per row, so log-mel values span a wide range
    return [(rng.standard_normal(n) * 0.5 ** i).astype(np.float32) for i, n in enumerate(lengths)]


def _check(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape and ours.dtype == np.float32
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL, diff
    return diff


@pytest.mark.parametrize("kw,lengths", [
    ({}, (16000 + 77, 9999)),  # default: 128 mels, padded to 1024 frames
    ({"num_mel_bins": 37, "max_length": 61, "mean": -3.5, "std": 2.25},
     (16000 * 2 + 1, 5 * 160 + 401, 400)),  # truncated, padded, exactly one frame
    ({"num_mel_bins": 64, "max_length": 99, "do_normalize": False}, (12345, 88)),  # no frame
])
def test_ast_front_end_matches_transformers(tmp_path: Path, kw: dict, lengths: tuple) -> None:
    ext = transformers.ASTFeatureExtractor(**kw)
    ext.save_pretrained(tmp_path)
    fe = hf.load_feature_extractor(tmp_path)
    waves = _waves(len(lengths), *lengths)
    if lengths[-1] < 400:  # transformers' numpy path fails on a waveform shorter than a frame
        ref = ext(waves[:-1], sampling_rate=16000, return_tensors="np")["input_values"]
        pad = ext.normalize(np.zeros_like(ref[0])) if ext.do_normalize else ref[0] * 0
        ref = np.concatenate([ref, pad[None]])
    else:
        ref = ext(waves, sampling_rate=16000, return_tensors="np")["input_values"]
    _check(fe(waves, sampling_rate=16000), ref)
    assert ref.shape[1:] == (ext.max_length, ext.num_mel_bins)


@pytest.mark.parametrize("kw,lengths", [
    ({}, (16000 * 3 + 77, 480000 + 333)),  # 30 s: 3000 frames; the second row is truncated
    ({"feature_size": 128, "chunk_length": 2}, (12345, 40001)),  # large-v3's 128 mels
])
def test_whisper_front_end_matches_transformers(tmp_path: Path, kw: dict,
                                                lengths: tuple) -> None:
    ext = transformers.WhisperFeatureExtractor(**kw)
    ext.save_pretrained(tmp_path)
    fe = hf.load_feature_extractor(tmp_path)
    waves = _waves(7, *lengths)
    ref = ext(waves, sampling_rate=16000, return_tensors="np")["input_features"]
    _check(fe(waves, sampling_rate=16000), ref)
    assert ref.shape[1:] == (ext.feature_size, ext.nb_max_frames)


def test_front_end_errors_name_the_problem(tmp_path: Path) -> None:
    transformers.ASTFeatureExtractor().save_pretrained(tmp_path / "ast")
    fe = hf.load_feature_extractor(tmp_path / "ast")
    with pytest.raises(ValueError, match="8000 Hz"):
        fe(_waves(0, 800), sampling_rate=8000)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "preprocessor_config.json").write_text(
        '{"feature_extractor_type": "Wav2Vec2FeatureExtractor"}')
    with pytest.raises(hf.HFError, match=r"preprocessor_config\.json: feature_extractor_type"):
        hf.load_feature_extractor(tmp_path / "other")
    with pytest.raises(hf.HFError, match="not found"):
        hf.load_feature_extractor(tmp_path)


def _bands(masked: np.ndarray) -> list[tuple[int, int]]:
    """(start, width) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], masked.astype(int), [0]])))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("time_axis", [0, 1])
def test_spec_augment_is_deterministic_and_masks_bands(time_axis: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 20) if time_axis == 0 else (20, 50)).astype(np.float32) + 5
    kw = {"time_axis": time_axis, "freq_masks": 1, "freq_width": 4, "time_masks": 1,
          "time_width": 7, "value": -1.0}
    a = audio.spec_augment(x, np.random.default_rng(42), **kw)
    b = audio.spec_augment(x, np.random.default_rng(42), **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.any(x == -1.0)  # the input is untouched
    widths: dict[str, set[int]] = {"time": set(), "freq": set()}
    differs = False
    for seed in range(300):
        y = audio.spec_augment(x, np.random.default_rng(seed), **kw)
        differs |= not np.array_equal(y, a)
        masked = y == -1.0
        unmasked = ~masked
        np.testing.assert_array_equal(y[unmasked], x[unmasked])
        for name, axis in (("time", time_axis), ("freq", 1 - time_axis)):
            full = masked.all(axis=1 - axis)  # whole rows/columns set to the mask value
            bands = _bands(full)
            assert len(bands) <= 1, bands  # one mask per axis (overlap would merge, not split)
            widths[name].add(bands[0][1] if bands else 0)
        # every masked cell lies in a masked time or frequency band
        t_full, f_full = masked.all(axis=1 - time_axis), masked.all(axis=time_axis)
        rows = t_full[:, None] if time_axis == 0 else t_full[None, :]
        cols = f_full[None, :] if time_axis == 0 else f_full[:, None]
        assert np.all(masked <= (rows | cols))
    assert differs
    assert widths["time"] == set(range(8)) and widths["freq"] == set(range(5)), widths


def test_spec_augment_rejects_a_batch() -> None:
    with pytest.raises(ValueError, match="one"):
        audio.spec_augment(np.zeros((2, 3, 4)), np.random.default_rng(0))
