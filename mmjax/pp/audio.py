"""Audio in the data pipeline: decoding, resampling, and the audio preprocessing ops.

``decode_audio`` reads a file (WAV/FLAC/OGG, anything libsndfile reads, through ``soundfile``;
anything else FFmpeg reads, such as a video's soundtrack, through PyAV),
encoded bytes, an array or a ``(samples, rate)`` pair, averages stereo to mono and resamples
with ``soxr`` (high quality) to the front end's rate, so clips of any rate and channel count
reach the model alike. Empty or non-finite audio is an error, as a broken image is.

The ops (registered in ``mmjax.pp.ops``'s registry when ``mmjax.pp`` is imported):

- ``decode_audio``: ``"audio"`` path/bytes/pair → float32 waveform at ``data.audio``'s rate;
- ``audio_features``: waveform → log-mel features of the front end (``mmjax.pp.audio_features``):
  ``[frames, mels]`` for an ``ast`` front end, ``[mels, frames]`` for ``whisper``;
- ``spec_augment(freq_masks, freq_width, time_masks, time_width)``: train-only masking.

Both deterministic ops pass through what is already decoded (an array; raw samples from
elsewhere come as a ``(samples, rate)`` pair) or already features (2-D), so their output can
be computed once per record during validation and cached.

``data.audio`` configures the front end: ``{"front_end": "ast" | "whisper", "preprocessor":
HF folder or preprocessor_config.json ("" = none; it then overrides the rest),
"sampling_rate", "num_mel_bins", "max_frames"}``.
"""

from __future__ import annotations

import functools
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mmjax.pp import ops
from mmjax.pp.audio_features import FrontEnd, spec_augment

MODALITY = "audio"
PCM_SCALE = 32768.0  # integer samples are taken as 16-bit PCM (TFDS Audio's default)
MAX_SECONDS = 600.0  # data.max_audio_seconds's default


def max_seconds(ctx: ops.Context) -> float:
    """``data.max_audio_seconds``: longer clips are refused from their header."""
    return float(ctx.setting("max_audio_seconds", MAX_SECONDS))


def check_duration(frames: int, rate: int, limit: float) -> None:
    """Refuses a clip longer than ``limit`` seconds before its samples are read: a small
    compressed file of silence can decode to gigabytes."""
    if rate <= 0:
        raise ValueError(f"a sample rate of {rate} Hz")
    if frames > limit * rate:
        raise ops.LimitError(f"{frames / rate:.1f} s long, more than "
                             f"data.max_audio_seconds={limit:g}")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """``[time]`` or ``[time, channels]`` → float32 ``[time]`` (the channels' mean)."""
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / PCM_SCALE
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1:
        raise ValueError(f"audio must be [time] or [time, channels], got shape {x.shape}")
    return x


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``x`` (1-D) from ``rate`` Hz to ``target`` Hz with soxr's high-quality resampler
    (``target`` 0: unchanged)."""
    if not target or int(rate) == int(target):
        return np.asarray(x, np.float32)
    import soxr

    return soxr.resample(np.asarray(x, np.float32), int(rate), int(target), quality="HQ")


def decode_audio(value: Any, rate: int, root: str = "", max_seconds: float = MAX_SECONDS
                 ) -> np.ndarray:
    """A path (relative to ``root``), encoded bytes, ``(samples, rate)`` or a 1-D array already
    at ``rate`` → float32 mono waveform at ``rate`` (0: the source's own rate); empty or
    non-finite audio raises, and so does a clip over ``max_seconds`` (``LimitError``, from
    the file's header)."""
    if isinstance(value, tuple):
        samples, source_rate = value
        check_duration(len(samples), int(source_rate), max_seconds)
        x = resample(to_mono(samples), int(source_rate), rate)
    elif isinstance(value, np.ndarray):
        x = to_mono(value)
    else:
        import soundfile

        source = io.BytesIO(value) if isinstance(value, bytes | bytearray) else \
            os.path.join(root, str(value))
        try:
            with soundfile.SoundFile(source) as f:
                check_duration(f.frames, f.samplerate, max_seconds)
                samples, source_rate = f.read(dtype="float32", always_2d=True), f.samplerate
            x = resample(to_mono(samples), source_rate, rate)
        except soundfile.LibsndfileError as e:
            if not isinstance(source, str):
                raise
            from mmjax.pp import video  # a video file (or any FFmpeg format): its soundtrack

            try:
                x = video.decode_audio_track(source, rate, max_seconds)
            except video.NotMediaError:  # neither reads it: libsndfile's reason is the clearer
                raise e from None
    if x.size == 0:
        raise ValueError("no audio samples")
    if not np.isfinite(x).all():
        raise ValueError("non-finite audio samples (NaN or inf)")
    return x


def front_end(data_config: Any) -> FrontEnd | None:
    """The front end ``data.audio`` describes (None if the config has no ``audio`` entry)."""
    try:
        cfg = data_config.audio
    except (AttributeError, KeyError):
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    pre = cfg.get("preprocessor", "")
    if pre:
        path = Path(pre)
        path = path / "preprocessor_config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"data.audio.preprocessor: {path} not found")
        return FrontEnd.from_config(json.loads(path.read_text()), f"{path}: ")
    kind, rate = cfg.get("front_end", "ast"), int(cfg.get("sampling_rate", 16000))
    mels, frames = int(cfg.get("num_mel_bins", 128)), int(cfg.get("max_frames", 1024))
    if kind == "ast":
        return FrontEnd.from_config({"feature_extractor_type": "ASTFeatureExtractor",
                                     "sampling_rate": rate, "num_mel_bins": mels,
                                     "max_length": frames})
    if kind == "whisper":
        hop = rate // 100  # Whisper's 10 ms hop (160 at 16 kHz)
        return FrontEnd.from_config({"feature_extractor_type": "WhisperFeatureExtractor",
                                     "sampling_rate": rate, "feature_size": mels,
                                     "n_fft": int(0.025 * rate), "hop_length": hop,
                                     "n_samples": frames * hop})
    raise ValueError(f"data.audio.front_end={kind!r}; use 'ast' or 'whisper'")


def config_key(data_config: Any) -> str:
    """``data.audio`` as a hashable key (cached splits hold features of one front end)."""
    fe = front_end(data_config)
    return "" if fe is None else repr((fe.kind, fe.sampling_rate, sorted(fe.options.items())))


def features_shape(fe: FrontEnd) -> tuple[int, int]:
    """The shape of one clip's features (``[frames, mels]`` AST, ``[mels, frames]`` Whisper)."""
    o = fe.options
    if fe.kind == "ast":
        return int(o["max_length"]), int(o["num_mel_bins"])
    return int(o["num_mel_bins"]), int(o["n_samples"]) // int(o["hop_length"])


def samples_held(fe: FrontEnd | None) -> int:
    """Waveform samples the front end's fixed frames cover; a longer clip is cut."""
    if fe is None:
        return sys.maxsize
    if fe.kind == "whisper":
        return int(fe.options["n_samples"])
    frames = features_shape(fe)[0]  # Kaldi frames: 25 ms windows every 10 ms
    return (frames - 1) * fe.sampling_rate // 100 + fe.sampling_rate // 40


def placeholder(fe: FrontEnd) -> np.ndarray:
    """What fills an absent clip's slot: features of the usual shape (never read by a model)."""
    return np.zeros(features_shape(fe), np.float32)


def _front_end(ctx: ops.Context, op: str) -> FrontEnd:
    """The context's front end; asked for only when an example has audio, so a spec with audio
    ops still parses (and serves image/text data) without ``data.audio``."""
    if ctx.audio is None:
        raise ValueError(f"preprocessing op {op!r} needs data.audio (the audio front end)")
    return ctx.audio


@ops.register("decode_audio", cacheable=True)
def _decode_op(ctx: ops.Context, key: str = MODALITY) -> ops.OpFn:
    limit = max_seconds(ctx)

    def fn(ex: ops.Example, rng: Any) -> ops.Example:
        if key not in ex or isinstance(ex[key], np.ndarray):  # absent, or decoded already
            return ex
        rate = _front_end(ctx, "decode_audio").sampling_rate
        return {**ex, key: decode_audio(ex[key], rate, ctx.root, limit)}

    return fn


@functools.cache
def _blas() -> Any:
    """The process's BLAS thread pools (built on first use, so that ops holding no handle to
    them can be pickled into data worker processes)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def audio_features_op(fe: FrontEnd) -> Any:
    """``waveform -> features`` of ``fe`` on one BLAS thread: the filterbank's small matmul
    is several times slower when OpenBLAS spreads it over cores that the training step and
    other data work keep busy (docs/data.md)."""

    def fn(waveform: np.ndarray) -> np.ndarray:
        with _blas().limit(limits=1, user_api="blas"):
            return fe.one(waveform)

    return fn


@ops.register("audio_features", cacheable=True)
def _features_op(ctx: ops.Context, key: str = MODALITY) -> ops.OpFn:
    features = None if ctx.audio is None else audio_features_op(ctx.audio)

    def fn(ex: ops.Example, rng: Any) -> ops.Example:
        if key not in ex or np.ndim(ex[key]) == 2:  # absent, or features already
            return ex
        if features is None:  # no front end: names data.audio
            return {**ex, key: audio_features_op(_front_end(ctx, "audio_features"))(ex[key])}
        return {**ex, key: features(ex[key])}

    return fn


@ops.register("spec_augment", deterministic=False)
def _spec_augment_op(ctx: ops.Context, freq_masks: int = 2, freq_width: int = 8,
                     time_masks: int = 2, time_width: int = 10, key: str = MODALITY) -> ops.OpFn:
    """Masks of up to ``freq_width`` mel bins and ``time_width`` frames (train only)."""

    def fn(ex: ops.Example, rng: np.random.Generator) -> ops.Example:
        if key not in ex or np.ndim(ex[key]) != 2:
            return ex
        time_axis = 0 if _front_end(ctx, "spec_augment").kind == "ast" else 1
        return {**ex, key: spec_augment(ex[key], rng, time_axis=time_axis,
                                        freq_masks=freq_masks, freq_width=freq_width,
                                        time_masks=time_masks, time_width=time_width)}

    return fn
