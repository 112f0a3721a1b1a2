"""Video in the data pipeline: decoding with PyAV, temporal sampling, and the video ops.

PyAV's wheels bundle FFmpeg, so any container and codec FFmpeg decodes is read (mp4/H.264,
webm/VP9, avi/MPEG-4, mkv...) with no torch dependency. A clip is ``data.video.num_frames``
frames taken every ``stride`` decoded frames, or at ``fps`` frames per second when ``fps`` > 0
(frames are then picked by their timestamps). Only the frames of the window are converted to
RGB, and a window that starts past the first seconds is reached by seeking to the keyframe
before it, so a long file is never decoded whole. Frames travel as uint8 ``[T, H, W, 3]``.

The ops (registered in ``mmjax.pp.ops``'s registry when ``mmjax.pp`` is imported):

- ``decode_video(window)``: a path (or frames already decoded) → the window's frames;
  ``window="random"`` (train: a random start) or ``"center"`` (eval);
- ``video_resize(size)``, ``video_center_crop(size)``, ``video_random_crop(min_scale, size)``
  and ``video_flip(p)``: one spatial transform drawn per clip and applied alike to all its
  frames (a flip turns "left" into "right": name it only where the labels allow).

``data.video`` configures them: ``{"num_frames", "stride", "fps", "size"}``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from mmjax.pp import image_io
from mmjax.pp.ops import Context, Example, LimitError, OpFn, register

SEEK_AFTER_S = 2.0  # windows starting later than this are reached by seeking
THREADED_PIXELS = 640 * 480  # frames at least this large are decoded by FFmpeg's threads


@dataclasses.dataclass(frozen=True)
class Sampling:
    """``data.video``: frames per clip, their spacing, the frame size."""

    num_frames: int = 8
    stride: int = 2
    fps: float = 0.0  # > 0: frames at this rate by timestamp (``stride`` is then unused)
    size: int = 32


def sampling(ctx: Context) -> Sampling:
    """The ``data.video`` settings of a config (defaults for keys it lacks)."""
    cfg = ctx.setting("video", None)
    if cfg is None:
        return Sampling()
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    known = {f.name for f in dataclasses.fields(Sampling)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"data.video has unknown keys {unknown}; known: {sorted(known)}")
    s = Sampling(**cfg)
    if s.num_frames < 1 or s.stride < 1 or s.fps < 0 or s.size < 1:
        raise ValueError(f"data.video: num_frames, stride and size must be positive and fps "
                         f">= 0, got {cfg}")
    return s


@dataclasses.dataclass(frozen=True)
class Info:
    """What a file's header says about its video stream."""

    num_frames: int  # counted by the container, or estimated from duration x rate
    fps: float
    width: int
    height: int
    start: float  # the stream's first timestamp, in seconds


class NotMediaError(ValueError):
    """FFmpeg cannot open the file at all."""


def _open(path: str) -> Any:
    import av

    try:
        return av.open(path)
    except av.FFmpegError as e:
        raise NotMediaError(str(e)) from None


def _video_stream(container: Any, path: str) -> Any:
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    if ctx.width * ctx.height >= THREADED_PIXELS:  # threads cost more than they give on tiny frames
        stream.thread_type = "AUTO"
    return stream


def _info(container: Any, stream: Any) -> Info:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    n = int(stream.frames or 0)
    if n <= 0 and fps > 0:
        if stream.duration is not None and stream.time_base is not None:
            seconds = float(stream.duration * stream.time_base)
        else:
            seconds = float(container.duration or 0) / 1e6
        n = int(seconds * fps + 0.5)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    return Info(n, fps, int(stream.codec_context.width), int(stream.codec_context.height), start)


def span(s: Sampling, fps: float) -> tuple[float, int]:
    """(step between taken frames, in source frames; frames a window covers)."""
    step = fps / s.fps if s.fps > 0 and fps > 0 else float(s.stride)
    return step, int(np.floor((s.num_frames - 1) * step)) + 1


def window_indices(n: int, s: Sampling, fps: float, start: int | None) -> np.ndarray:
    """Source frame indices of a window starting at ``start`` (None: the centre one)."""
    step, covered = span(s, fps)
    if start is None:
        start = max(n - covered, 0) // 2
    return np.minimum(start + np.floor(np.arange(s.num_frames) * step).astype(np.int64),
                      max(n - 1, 0))


def _start(n: int, s: Sampling, fps: float, window: str, rng: Any) -> int | None:
    if window == "center" or rng is None:
        return None
    covered = span(s, fps)[1]
    return int(rng.integers(0, max(n - covered, 0) + 1))


def _frames(container: Any, stream: Any, info: Info) -> Iterator[tuple[int, Any]]:
    """(frame index, frame) from where the container stands; the index comes from the
    timestamp (variable frame rates and seeks keep their place), or a count without one."""
    for count, frame in enumerate(container.decode(stream)):
        t = frame.time
        yield (round((t - info.start) * info.fps) if t is not None and info.fps > 0
               else count), frame


_LOCAL = threading.local()


def _reformatter() -> Any:
    """This thread's RGB converter: reusing one keeps FFmpeg's scaler context, 10x faster on
    small frames than the fresh one ``VideoFrame.to_ndarray`` makes for every frame."""
    if not hasattr(_LOCAL, "reformatter"):
        from av.video.reformatter import VideoReformatter

        _LOCAL.reformatter = VideoReformatter()
    return _LOCAL.reformatter


def read_frames(path: str, indices: np.ndarray, info: Info, container: Any = None,
                size: int = 0) -> np.ndarray:
    """uint8 ``[len(indices), H, W, 3]``: the frames at ``indices`` (sorted, repeats allowed),
    each the last frame at or before its index (``size`` > 0: scaled to size x size by
    FFmpeg's scaler while converting)."""
    own = container is None
    container = _open(path) if own else container
    try:
        stream = _video_stream(container, path)
        first = int(indices[0])
        if info.fps > 0 and first / info.fps > SEEK_AFTER_S:
            target = info.start + first / info.fps
            container.seek(int(target / stream.time_base), stream=stream, backward=True,
                           any_frame=False)
        kwargs = {"width": size, "height": size} if size else {}
        reformatter = _reformatter()

        def rgb(frame: Any) -> np.ndarray:
            return reformatter.reformat(frame, format="rgb24", **kwargs).to_ndarray()

        out: list[np.ndarray] = []
        prev = None
        k = 0
        for idx, frame in _frames(container, stream, info):
            while k < len(indices) and indices[k] < idx and prev is not None:
                out.append(rgb(prev))
                k += 1
            while k < len(indices) and indices[k] <= idx:
                out.append(rgb(frame))
                k += 1
            prev = frame
            if k == len(indices):
                break
        if prev is None:
            raise ValueError("no frame could be decoded")
        while len(out) < len(indices):  # the header over-counted: repeat the last frame
            out.append(rgb(prev))
        return np.stack(out)
    finally:
        if own:
            container.close()


def probe(path: str, s: Sampling, max_pixels: int = image_io.MAX_PIXELS) -> Info:
    """The header of a video file, checked: a video stream of at least the frames one window
    covers, no larger than ``max_pixels`` a frame, whose first frame decodes."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        info = _info(container, stream)
        if info.width * info.height > max_pixels:
            raise LimitError(f"frames of {info.width}x{info.height}, more than "
                             f"data.max_image_pixels={max_pixels}")
        covered = span(s, info.fps)[1]
        if info.num_frames < covered:
            raise ValueError(f"too few frames: {info.num_frames}, a clip of "
                             f"data.video.num_frames={s.num_frames} covers {covered}")
        read_frames(path, np.zeros(1, np.int64), info, container)
        return info


def decode_video(value: Any, s: Sampling, window: str = "center", rng: Any = None,
                 root: str = "", size: int = 0) -> np.ndarray:
    """A path (relative to ``root``) or frames ``[N, H, W, 3]`` → uint8 ``[T, H, W, 3]``, the
    window of ``s`` (``window``: ``"random"`` with ``rng``, else the centre one)."""
    if isinstance(value, np.ndarray):
        frames = value if value.ndim == 4 else value[None]
        if len(frames) == s.num_frames:
            return frames.astype(np.uint8, copy=False)
        n = len(frames)
        idx = window_indices(n, s, 0.0, _start(n, s, 0.0, window, rng))
        return np.ascontiguousarray(frames[idx].astype(np.uint8, copy=False))
    path = os.path.join(root, str(value))
    with _open(path) as container:
        stream = _video_stream(container, path)
        info = _info(container, stream)
        idx = window_indices(info.num_frames, s, info.fps,
                             _start(info.num_frames, s, info.fps, window, rng))
        return read_frames(path, idx, info, container, size)


def decode_audio_track(path: str, rate: int, max_seconds: float) -> np.ndarray:
    """The first audio stream of a media file (a video's soundtrack) → float32 mono at
    ``rate`` Hz (0: its own), through FFmpeg's resampler."""
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        seconds = float(stream.duration * stream.time_base) if stream.duration else \
            float(container.duration or 0) / 1e6
        if seconds > max_seconds:
            raise LimitError(f"{seconds:.1f} s long, more than "
                             f"data.max_audio_seconds={max_seconds:g}")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate or stream.rate)
        chunks = [f.to_ndarray().reshape(-1) for frame in container.decode(stream)
                  for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


# --- the ops ---------------------------------------------------------------------------------


@register("decode_video", deterministic=False)
def _decode_video(ctx: Context, window: str = "random", key: str = "video") -> OpFn:
    if window not in ("random", "center"):
        raise ValueError(f"decode_video: window={window!r}; expected 'random' or 'center'")
    s = sampling(ctx)

    def fn(ex: Example, rng: Any) -> Example:
        return {**ex, key: decode_video(ex[key], s, window, rng, ctx.root)}

    return fn


def _resize_frames(frames: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None
                   ) -> np.ndarray:
    """Each frame's ``box`` (left, top, right, bottom; None: whole) resized to size x size."""
    if box is None and frames.shape[1] == frames.shape[2] == size:
        return frames
    out = np.empty((len(frames), size, size, 3), np.uint8)
    for i, f in enumerate(frames):
        im = Image.fromarray(f)
        out[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out


@register("video_resize")
def _video_resize(ctx: Context, size: int = 0, key: str = "video") -> OpFn:
    size = size or sampling(ctx).size

    def fn(ex: Example, rng: Any) -> Example:
        return {**ex, key: _resize_frames(ex[key], size)}

    return fn


@register("video_center_crop")
def _video_center_crop(ctx: Context, size: int = 0, key: str = "video") -> OpFn:
    size = size or sampling(ctx).size

    def fn(ex: Example, rng: Any) -> Example:
        h, w = ex[key].shape[1:3]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return {**ex, key: _resize_frames(ex[key], size, (left, top, left + s, top + s))}

    return fn


@register("video_random_crop", deterministic=False)
def _video_random_crop(ctx: Context, min_scale: float = 0.6, size: int = 0, key: str = "video",
                       max_scale: float = 1.0, ratio: tuple[float, float] = (3 / 4, 4 / 3)
                       ) -> OpFn:
    """``random_crop`` of images with one box drawn per clip, cut from every frame."""
    size = size or sampling(ctx).size
    scale = (float(min_scale), float(max_scale))
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
    ratios = (float(ratio[0]), float(ratio[1]))

    def fn(ex: Example, rng: np.random.Generator) -> Example:
        frames = ex[key]
        top, left, h, w = image_io.inception_box(rng, frames.shape[1], frames.shape[2], scale,
                                                 ratios)
        return {**ex, key: _resize_frames(frames, size, (left, top, left + w, top + h))}

    return fn


@register("video_flip", deterministic=False)
def _video_flip(ctx: Context, p: float = 0.5, key: str = "video") -> OpFn:
    def fn(ex: Example, rng: np.random.Generator) -> Example:
        if rng.uniform() < p:
            return {**ex, key: np.ascontiguousarray(ex[key][:, :, ::-1])}
        return ex

    return fn
