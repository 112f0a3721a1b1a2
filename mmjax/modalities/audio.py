"""Audio: ``"audio": "clip.wav"`` in a record (WAV/FLAC/OGG, any rate, mono or stereo), log-mel
features float32 ``[B, frames, mels]`` (AST front end) or ``[B, mels, frames]`` (Whisper) in a
batch. The front end is ``data.audio`` (``mmjax.pp.audio``).

``audio_noise`` adds white noise at a signal-to-noise ratio to waveforms: it acts on batches
that carry waveforms ``[B, T]``, before any feature front end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmjax.modalities.base import Corruption, CorruptionError, Modality, register
from mmjax.pp import audio as audio_pp
from mmjax.pp import ops

log = logging.getLogger(__name__)

TABLES: dict[str, tuple[float, ...]] = {"audio_noise": (20, 15, 10, 5, 0)}  # SNR in dB


def add_noise(waveform: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``waveform`` (``[..., T]``, each row a signal) plus white Gaussian noise scaled so that
    each row's signal-to-noise power ratio is exactly ``snr_db`` decibels."""
    x = np.asarray(waveform, np.float64)
    noise = rng.standard_normal(x.shape)
    p_signal = np.mean(x**2, axis=-1, keepdims=True)
    p_noise = np.mean(noise**2, axis=-1, keepdims=True)
    scale = np.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (x + noise * scale).astype(np.asarray(waveform).dtype)


def _audio_noise(entry: np.ndarray, severity: int, rng: np.random.Generator, tokenizer: Any
                 ) -> np.ndarray:
    audio = np.asarray(entry)
    if audio.ndim != 2:
        raise CorruptionError(f"audio_noise is defined on waveforms [B, T]; batch['audio'] "
                              f"has shape {audio.shape} (features: the noise must be added "
                              "before the feature front end)")
    return add_noise(audio, TABLES["audio_noise"][severity - 1], rng)


def _front_end(ctx: ops.Context) -> Any:
    if ctx.audio is None:
        raise ValueError("the records have audio but the data config has no data.audio "
                         "(the audio front end)")
    return ctx.audio


def _report(lengths: list[float], ctx: ops.Context, where: str) -> None:
    """Warns when clips are longer than the features hold (their ends are cut)."""
    held = audio_pp.samples_held(ctx.audio)
    long = [n for n in lengths if n > held]
    if long:
        rate = ctx.audio.sampling_rate
        log.warning(
            "data %s: %d clips are longer than the %.2f s the audio features hold (longest "
            "%.2f s); their ends are cut: raise --config.data.audio.max_frames (100 per s)",
            where, len(long), held / rate, max(long) / rate)


def _synthetic(batch_size: int, ctx: ops.Context, tower: Mapping[str, Any],
               rng: np.random.Generator) -> np.ndarray:
    shape = audio_pp.features_shape(_front_end(ctx))
    return rng.standard_normal((batch_size, *shape), dtype=np.float32)


def _steps(ctx: ops.Context, spec: str, tokenizer_file: str) -> list[str]:
    fe = _front_end(ctx)
    layout = "[frames, mels]" if fe.kind == "ast" else "[mels, frames]"
    return [f"decode the clip, average its channels to mono and resample to {fe.sampling_rate} "
            "Hz (soxr, high quality)",
            f"{fe.kind} log-mel features {layout}, shape {list(audio_pp.features_shape(fe))} "
            "(mmjax.pp.audio_features; longer clips are cut, shorter ones padded)"]


def _from_tfds(value: Any, feature: Any) -> Any:
    rate = getattr(feature, "sample_rate", None)
    return (np.asarray(value), int(rate)) if rate else value


AUDIO = register(Modality(
    name="audio",
    towers=("ast", "whisper"),
    load=lambda path, ctx: audio_pp.decode_audio(
        path, ctx.audio.sampling_rate if ctx.audio is not None else 0,
        max_seconds=audio_pp.max_seconds(ctx)),
    placeholder=lambda ctx: audio_pp.placeholder(_front_end(ctx)),
    required_ops=("audio_features",),
    default_pp="decode_audio|audio_features",
    synthetic=_synthetic,
    measure=lambda waveform: float(len(waveform)),
    report=_report,
    corruptions={"audio_noise": Corruption(TABLES["audio_noise"], _audio_noise)},
    describe=lambda leaf, dtype: f"log-mel features, {dtype} (see Audio)",
    steps=_steps,
    from_tfds=_from_tfds,
))
