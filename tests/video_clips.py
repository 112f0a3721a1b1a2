"""Real video files for the video tests, written with PyAV (FFmpeg's encoders in its wheel).

Frame ``i`` of a clip from ``level_frames`` is uniform grey ``(i % 40) * 6`` with a green
count ``(i // 40) * 30``, so a decoded frame tells which source frame it is even after lossy
compression (levels 6 apart; codecs move them by 1-3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np


def level_frames(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    """uint8 [n, h, w, 3]: frame i grey at ``(i % 40) * 6``, green at ``(i // 40) * 30``."""
    i = np.arange(n)
    frames = np.empty((n, h, w, 3), np.uint8)
    frames[..., 0] = frames[..., 2] = ((i % 40) * 6)[:, None, None]
    frames[..., 1] = ((i // 40) * 30)[:, None, None]
    return frames


def frame_index(frames: np.ndarray) -> np.ndarray:
    """The source index of each decoded ``level_frames`` frame."""
    grey = np.round(frames[..., 0].mean(axis=(1, 2)) / 6).astype(int)
    green = np.round(frames[..., 1].mean(axis=(1, 2)) / 30).astype(int)
    return green * 40 + grey


def write_clip(path: str | Path, frames: np.ndarray, *, codec: str = "libx264", fps: int = 10,
               audio_hz: float = 0.0, audio_rate: int = 16000, gop: int = 12) -> Path:
    """Encodes ``frames`` (uint8 [T, H, W, 3]) with ``codec`` into ``path`` (the container from
    its suffix); ``audio_hz`` > 0 adds an AAC (mp4/mkv) or Opus (webm) sine track as long as
    the video."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream: Any = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.gop_size = gop
        stream.bit_rate = 4_000_000
        if audio_hz:
            sound: Any = out.add_stream("libopus" if path.suffix == ".webm" else "aac",
                                   rate=48000 if path.suffix == ".webm" else audio_rate)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if audio_hz:
            rate = sound.rate
            t = np.arange(int(rate * len(frames) / fps)) / rate
            x = (0.3 * np.sin(2 * np.pi * audio_hz * t)).astype(np.float32)[None]
            chunk = 960
            for s in range(0, x.shape[1] - chunk + 1, chunk):
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, s:s + chunk]),
                                                   format="fltp", layout="mono")
                frame.sample_rate = rate
                frame.pts = s
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode():
                out.mux(packet)
    return path
