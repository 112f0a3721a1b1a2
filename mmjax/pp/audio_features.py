"""Audio front ends as pure numpy functions: waveform → log-mel features, and SpecAugment.

Two front ends reproduce Hugging Face's feature extractors, so a pretrained audio tower sees
the features it was trained on:

- :func:`kaldi_fbank` / :func:`ast_features`: the Kaldi-compatible filterbank of
  ``torchaudio.compliance.kaldi.fbank`` as ``ASTFeatureExtractor`` calls it (25 ms frames, 10 ms
  hop, DC removal, pre-emphasis 0.97, a symmetric Hann ("hanning") or "povey" window, a 512-point
  FFT, mel triangles on the Kaldi mel scale, natural log), padded/truncated to ``max_length``
  frames and normalised with the AudioSet mean and std: ``[frames, mels]``;
- :func:`whisper_log_mel`: Whisper's log-mel (the waveform padded/truncated to 30 s, a periodic
  Hann, reflect-centred STFT, Slaney mel filters, log10, clamp at max - 8, (x + 4) / 4):
  ``[mels, frames]``.

``FrontEnd.from_config`` builds either from an HF ``preprocessor_config.json`` dict
(``mmjax.hf.load_feature_extractor`` reads the file). :func:`spec_augment` masks time and
frequency bands for training, deterministically given its ``np.random.Generator``. Everything is
float64 inside and float32 out; nothing here imports torch or jax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

KALDI_EPS = float(np.finfo(np.float32).eps)  # torchaudio's log floor


def _triangles(points: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """[bins, filters] triangles with corners at consecutive ``edges``, sampled at ``points``."""
    slopes = edges[None, :] - points[:, None]
    down = -slopes[:, :-2] / np.diff(edges)[:-1]
    up = slopes[:, 2:] / np.diff(edges)[1:]
    return np.maximum(0.0, np.minimum(down, up))


def kaldi_mel_filters(num_bins: int, fft_length: int, sampling_rate: float,
                      low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's mel filters ``[fft_length // 2 + 1, num_bins]``, triangular on the mel scale
    1127·ln(1 + f/700) (``high_freq <= 0`` counts down from Nyquist, as in Kaldi)."""
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)
    high = high_freq if high_freq > 0 else sampling_rate / 2 + high_freq
    edges = np.linspace(mel(low_freq), mel(high), num_bins + 2)
    bins = mel(sampling_rate / fft_length * np.arange(fft_length // 2 + 1))
    return _triangles(bins, edges)


def slaney_mel_filters(num_bins: int, fft_length: int, sampling_rate: float,
                       low_freq: float = 0.0, high_freq: float = 8000.0) -> np.ndarray:
    """Slaney-scale, area-normalised mel filters ``[fft_length // 2 + 1, num_bins]``, as
    ``librosa.filters.mel(norm="slaney")`` and transformers' ``mel_filter_bank`` make them."""
    def to_mel(f: np.ndarray | float) -> np.ndarray:
        f = np.asarray(f, np.float64)
        log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
        return np.where(f >= 1000.0, log, 3.0 * f / 200.0)

    def to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)),
                        200.0 * m / 3.0)

    edges = to_hz(np.linspace(to_mel(low_freq), to_mel(high_freq), num_bins + 2))
    filters = _triangles(np.linspace(0, sampling_rate // 2, fft_length // 2 + 1), edges)
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    """[n, size] frames starting every ``hop`` samples (only whole frames)."""
    n = 1 + (len(x) - size) // hop if len(x) >= size else 0
    if n == 0:
        return np.zeros((0, size), x.dtype)
    return np.lib.stride_tricks.sliding_window_view(x, size)[::hop][:n]


def _window(name: str, size: int, periodic: bool) -> np.ndarray:
    n = np.arange(size)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (size if periodic else size - 1))
    if name in ("hann", "hanning"):
        return hann
    if name == "povey":
        return hann**0.85
    if name == "hamming":
        return 0.54 - 0.46 * np.cos(2 * np.pi * n / (size if periodic else size - 1))
    raise ValueError(f"unknown window {name!r}; use hanning, povey or hamming")


def kaldi_fbank(waveform: np.ndarray, *, sampling_rate: int = 16000, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                window: str = "hanning", preemphasis: float = 0.97, low_freq: float = 20.0,
                high_freq: float = 0.0, remove_dc_offset: bool = True) -> np.ndarray:
    """Log mel filterbank ``[frames, num_mel_bins]`` of ``torchaudio.compliance.kaldi.fbank``
    with its defaults (snip_edges, power spectrum, FFT size the next power of two, no dither).

    The waveform is used as given (AST feeds floats in [-1, 1], not 16-bit integers). Fewer
    samples than one frame give zero frames.
    """
    x = np.asarray(waveform, np.float64).reshape(-1)
    size = int(sampling_rate * frame_length_ms * 0.001)
    hop = int(sampling_rate * frame_shift_ms * 0.001)
    fft = 1 << (size - 1).bit_length()
    frames = _frames(x, size, hop).copy()
    if remove_dc_offset:
        frames -= frames.mean(axis=1, keepdims=True)
    if preemphasis:
        previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames -= preemphasis * previous
    power = np.abs(np.fft.rfft(frames * _window(window, size, False), n=fft)) ** 2
    mel = power @ kaldi_mel_filters(num_mel_bins, fft, sampling_rate, low_freq, high_freq)
    return np.log(np.maximum(mel, KALDI_EPS)).astype(np.float32)


def fit_length(x: np.ndarray, length: int, axis: int, value: float = 0.0) -> np.ndarray:
    """``x`` cut or padded with ``value`` to ``length`` along ``axis`` (at the end)."""
    n = x.shape[axis]
    if n >= length:
        return np.take(x, np.arange(length), axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - n)
    return np.pad(x, pad, constant_values=value)


def ast_features(waveform: np.ndarray, *, max_length: int = 1024, mean: float = -4.2677393,
                 std: float = 4.5689974, do_normalize: bool = True, **fbank: Any) -> np.ndarray:
    """``ASTFeatureExtractor``'s ``input_values`` for one waveform: ``[max_length, mels]``.

    The fbank is zero-padded (before normalisation, so padding becomes -mean / (2·std)) or
    truncated to ``max_length`` frames, then ``(x - mean) / (2·std)``.
    """
    x = fit_length(kaldi_fbank(waveform, **fbank), max_length, axis=0).astype(np.float64)
    if do_normalize:
        x = (x - mean) / (2.0 * std)
    return x.astype(np.float32)


def whisper_log_mel(waveform: np.ndarray, *, num_mel_bins: int = 80, sampling_rate: int = 16000,
                    n_fft: int = 400, hop_length: int = 160, n_samples: int | None = 480000,
                    padding_value: float = 0.0, do_normalize: bool = False) -> np.ndarray:
    """``WhisperFeatureExtractor``'s ``input_features`` for one waveform: ``[mels, frames]``.

    The waveform is cut or padded with ``padding_value`` to ``n_samples`` (30 s; None keeps its
    length), giving ``n_samples // hop_length`` frames (3000): the STFT is reflect-centred and
    its last frame dropped, as Whisper does. ``do_normalize`` first scales the real samples to
    zero mean and unit variance.
    """
    x = np.asarray(waveform, np.float64).reshape(-1)
    length = len(x) if n_samples is None else int(n_samples)
    x = x[:length]
    if do_normalize:
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    x = fit_length(x, length, axis=0, value=padding_value)
    x = np.pad(x, n_fft // 2, mode="reflect")
    frames = _frames(x, n_fft, hop_length)[:-1]
    power = np.abs(np.fft.rfft(frames * _window("hann", n_fft, True))) ** 2
    filters = slaney_mel_filters(num_mel_bins, n_fft, sampling_rate).astype(np.float32)
    log = np.log10(np.maximum(power @ filters.astype(np.float64), 1e-10)).T
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FrontEnd:
    """One feature extractor: ``kind`` ("ast" or "whisper"), its sampling rate and options.

    Calling it on a list of 1-D waveforms returns the batch that transformers' extractor returns
    for the same call: AST ``input_values`` ``[B, frames, mels]``, Whisper ``input_features``
    ``[B, mels, frames]``.
    """

    kind: str
    sampling_rate: int = 16000
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], where: str = "") -> FrontEnd:
        """From a ``preprocessor_config.json`` dict (``feature_extractor_type`` names the kind)."""
        kind = cfg.get("feature_extractor_type", "")
        rate = int(cfg.get("sampling_rate", 16000))
        if kind == "ASTFeatureExtractor":
            opts = {"num_mel_bins": int(cfg.get("num_mel_bins", 128)),
                    "max_length": int(cfg.get("max_length", 1024)),
                    "mean": float(cfg.get("mean", -4.2677393)),
                    "std": float(cfg.get("std", 4.5689974)),
                    "do_normalize": bool(cfg.get("do_normalize", True)),
                    "sampling_rate": rate}
            return cls("ast", rate, opts)
        if kind == "WhisperFeatureExtractor":
            opts = {"num_mel_bins": int(cfg.get("feature_size", 80)),
                    "n_fft": int(cfg.get("n_fft", 400)),
                    "hop_length": int(cfg.get("hop_length", 160)),
                    "n_samples": int(cfg.get("n_samples", cfg.get("chunk_length", 30) * rate)),
                    "padding_value": float(cfg.get("padding_value", 0.0)),
                    "sampling_rate": rate}
            if float(cfg.get("dither", 0.0)):
                raise ValueError(f"{where}dither={cfg['dither']} is not supported (random "
                                 "noise would make features non-deterministic)")
            return cls("whisper", rate, opts)
        raise ValueError(f"{where}feature_extractor_type={kind!r} is not supported; known: "
                         "ASTFeatureExtractor, WhisperFeatureExtractor")

    def one(self, waveform: np.ndarray) -> np.ndarray:
        """Features of one waveform (``[frames, mels]`` AST, ``[mels, frames]`` Whisper)."""
        fn = ast_features if self.kind == "ast" else whisper_log_mel
        return fn(np.asarray(waveform, np.float32), **self.options)

    def __call__(self, waveforms: Sequence[np.ndarray] | np.ndarray,
                 sampling_rate: int = 16000) -> np.ndarray:
        if sampling_rate != self.sampling_rate:
            raise ValueError(f"audio at {sampling_rate} Hz given to a {self.kind} front end made "
                             f"for {self.sampling_rate} Hz; resample it first")
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        return np.stack([self.one(w) for w in waveforms])


def spec_augment(features: np.ndarray, rng: np.random.Generator, *, time_axis: int = 0,
                 freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2,
                 time_width: int = 100, value: float = 0.0) -> np.ndarray:
    """SpecAugment's frequency and time masking (Park et al. 2019) for training; a new array.

    ``features`` is one example, ``[frames, mels]`` (``time_axis=0``, AST) or ``[mels, frames]``
    (``time_axis=1``, Whisper). Each of ``freq_masks`` masks sets a band of f ~ U{0..freq_width}
    consecutive mel bins, starting at U{0..mels - f}, to ``value``; likewise ``time_masks`` bands
    of up to ``time_width`` frames. The same ``rng`` state gives the same masks.
    """
    if features.ndim != 2 or time_axis not in (0, 1):
        raise ValueError(f"spec_augment takes one [frames, mels] or [mels, frames] example "
                         f"(time_axis 0 or 1), got shape {features.shape}, axis {time_axis}")
    out = np.array(features, copy=True)
    for axis, count, width in ((1 - time_axis, freq_masks, freq_width),
                               (time_axis, time_masks, time_width)):
        size = out.shape[axis]
        for _ in range(count):
            w = int(rng.integers(0, min(width, size) + 1))
            start = int(rng.integers(0, size - w + 1))
            index = [slice(None)] * 2
            index[axis] = slice(start, start + w)
            out[tuple(index)] = value
    return out
