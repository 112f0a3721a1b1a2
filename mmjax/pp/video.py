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

``data.video`` configures them: ``{"num_frames", "stride", "fps", "size", "num_clips",
"num_crops"}``. At evaluation (``window="center"``) ``num_clips`` x ``num_crops`` > 1 makes
``decode_video`` emit views ``[V, T, H, W, 3]`` (the Kinetics test protocol): windows spread
evenly over the clip, times square crops at both ends and the centre of the longer side; the
model averages its class probabilities over them (``mmjax.models.views``).
"""

from __future__ import annotations

import contextlib
import copy
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
    num_clips: int = 1  # evaluation: windows spread evenly over the clip (1: the centre one)
    num_crops: int = 1  # evaluation: square crops along the longer side (1: none, as today)

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops


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
    if min(s.num_frames, s.stride, s.size, s.num_clips, s.num_crops) < 1 or s.fps < 0:
        raise ValueError(f"data.video: num_frames, stride, size, num_clips and num_crops must be "
                         f"positive and fps >= 0, got {cfg}")
    return s


def single_view(data_config: Any) -> Any:
    """``data_config`` with ``data.video.num_clips = num_crops = 1`` (a copy; the same object
    when it has no views): for what reads one clip per example (export, explanations)."""
    video = getattr(data_config, "get", lambda k, d: d)("video", None)
    if video is None or (video.get("num_clips", 1), video.get("num_crops", 1)) == (1, 1):
        return data_config
    out = copy.deepcopy(data_config)
    unlocked = out.unlocked() if hasattr(out, "unlocked") else contextlib.nullcontext()
    with unlocked:
        out.video.num_clips = out.video.num_crops = 1
    return out


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


def clip_starts(n: int, s: Sampling, fps: float) -> np.ndarray:
    """First source frame of each of the ``s.num_clips`` evaluation windows: one (the centre
    window) or spread evenly from the first frame to the last full window."""
    slack = max(n - span(s, fps)[1], 0)
    if s.num_clips == 1:
        return np.asarray([slack // 2], np.int64)
    return np.arange(s.num_clips, dtype=np.int64) * slack // (s.num_clips - 1)


def crop_boxes(height: int, width: int, num_crops: int) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of ``num_crops`` squares of the shorter side spread evenly
    along the longer one: 3 = both ends and the centre (SlowFast's test crops)."""
    side = min(height, width)
    slack = max(height, width) - side
    offsets = [slack // 2] if num_crops == 1 else \
        [i * slack // (num_crops - 1) for i in range(num_crops)]
    if width >= height:
        return [(o, 0, o + side, side) for o in offsets]
    return [(0, o, side, o + side) for o in offsets]


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


def decode_views(value: Any, s: Sampling, root: str = "") -> np.ndarray:
    """The evaluation views of a clip: uint8 ``[V, T, H, W, 3]``, ``V = num_clips x
    num_crops`` (clip-major). Windows at ``clip_starts``; with ``num_crops`` > 1 each is cut
    into ``crop_boxes`` resized to ``s.size``, else its frames stay whole. Frames shared by
    overlapping windows are decoded once."""
    if isinstance(value, np.ndarray):
        frames = value if value.ndim == 4 else value[None]
        n, fps = len(frames), 0.0
        windows = [window_indices(n, s, fps, int(a)) for a in clip_starts(n, s, fps)]
        clips = [frames[w].astype(np.uint8, copy=False) for w in windows]
    else:
        path = os.path.join(root, str(value))
        with _open(path) as container:
            stream = _video_stream(container, path)
            info = _info(container, stream)
            windows = [window_indices(info.num_frames, s, info.fps, int(a))
                       for a in clip_starts(info.num_frames, s, info.fps)]
            flat = np.concatenate(windows)
            order = np.argsort(flat, kind="stable")
            got = read_frames(path, flat[order], info, container)
            decoded = np.empty((len(flat), *got.shape[1:]), np.uint8)
            decoded[order] = got
        clips = list(decoded.reshape(len(windows), s.num_frames, *decoded.shape[1:]))
    if s.num_crops > 1:
        h, w = clips[0].shape[1:3]
        clips = [_resize_frames(c, s.size, box) for c in clips
                 for box in crop_boxes(h, w, s.num_crops)]
    return np.ascontiguousarray(np.stack(clips))


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
        if window == "center" and s.num_views > 1:
            return {**ex, key: decode_views(ex[key], s, ctx.root)}
        return {**ex, key: decode_video(ex[key], s, window, rng, ctx.root)}

    return fn


def _resize_frames(frames: np.ndarray, size: int, box: tuple[int, int, int, int] | None = None
                   ) -> np.ndarray:
    """Each frame's ``box`` (left, top, right, bottom; None: whole) resized to size x size;
    ``frames`` [..., H, W, 3] (a clip, or views of one)."""
    h, w = frames.shape[-3:-1]
    if box in (None, (0, 0, w, h)) and h == w == size:
        return frames
    flat = frames.reshape(-1, h, w, 3)
    out = np.empty((len(flat), size, size, 3), np.uint8)
    for i, f in enumerate(flat):
        im = Image.fromarray(f)
        out[i] = np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box))
    return out.reshape(*frames.shape[:-3], size, size, 3)


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
        h, w = ex[key].shape[-3:-1]
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
