"""Video: ``"video": "clips/x.mp4"`` in a record (any container and codec FFmpeg decodes, read
with PyAV), RGB uint8 frames ``[B, T, H, W, 3]`` in a batch, scaled to [-1, 1] inside the model.
``data.video`` says how clips are sampled (``mmjax.pp.video``).

Corruptions act on every frame with the image corruptions of ImageNet-C (``video_`` before
their names) plus ``frame_drop``: a fraction of the frames replaced by the frame before them,
as a stalling stream shows. Attacks move pixels on the [0, 1] scale, as for images. An
explanation is a strip of per-frame maps, first frame at the top: the explained value is the
clip with its frames stacked top to bottom, ``[B, T*H, W, 3]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.modalities import image
from mmjax.modalities.base import Attack, Corruption, CorruptionError, Modality, register
from mmjax.pp import image as image_pp
from mmjax.pp import ops
from mmjax.pp import video as video_pp

FRAME_DROP = (0.1, 0.2, 0.3, 0.4, 0.5)  # fraction of frames dropped per severity


def frame_drop(frames: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``frames`` [T, H, W, 3] with ``round(fraction * (T - 1))`` frames after the first
    replaced by the last frame kept before them."""
    t = len(frames)
    dropped = rng.choice(np.arange(1, t), size=round(fraction * (t - 1)), replace=False) \
        if t > 1 else np.zeros(0, np.int64)
    keep = np.ones(t, bool)
    keep[dropped] = False
    source = np.maximum.accumulate(np.where(keep, np.arange(t), 0))
    return frames[source]


def _per_frame(name: str) -> Corruption:
    def apply(entry: np.ndarray, severity: int, rng: np.random.Generator, tokenizer: Any
              ) -> np.ndarray:
        clips = np.asarray(entry)
        if clips.ndim not in (5, 6):
            raise CorruptionError(f"video_{name}: expected clips [B, (V,) T, H, W, 3], got "
                                  f"{clips.shape}")
        pixels, back = image.image_pixels(clips.reshape(-1, *clips.shape[-3:]))
        out = np.stack([image.corrupt_image(p, name, severity, rng) for p in pixels])
        return back(out).reshape(clips.shape)

    return Corruption(image.TABLES[name], apply)


def _frame_drop(entry: np.ndarray, severity: int, rng: np.random.Generator, tokenizer: Any
                ) -> np.ndarray:
    clips = np.asarray(entry)
    if clips.ndim not in (5, 6):
        raise CorruptionError(f"frame_drop: expected clips [B, (V,) T, H, W, 3], got "
                              f"{clips.shape}")
    flat = clips.reshape(-1, *clips.shape[-4:])  # each view of a clip drops its own frames
    return np.stack([frame_drop(c, FRAME_DROP[severity - 1], rng) for c in flat]
                    ).reshape(clips.shape)


def strip(entry: Any) -> Any:
    """Clips ``[B, T, H, W, C]`` as the model reads them, frames stacked: ``[B, T*H, W, C]``."""
    x = image.to_model(entry)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _with_strip(entry: Any, x: Any) -> Any:
    return x.reshape(entry.shape).astype(jnp.float32)


def _placeholder(ctx: ops.Context) -> np.ndarray:
    s = video_pp.sampling(ctx)
    return np.zeros((s.num_frames, s.size, s.size, 3), np.uint8)


def _synthetic(batch_size: int, ctx: ops.Context, tower: Mapping[str, Any],
               rng: np.random.Generator) -> np.ndarray:
    s = video_pp.sampling(ctx)
    return rng.integers(0, 256, size=(batch_size, s.num_frames, s.size, s.size, 3),
                        dtype=np.uint8)


def _describe(leaf: str, dtype: str) -> str:
    if dtype == "uint8":
        return ("RGB frames [T, H, W, 3], uint8 in [0, 255], scaled inside the function "
                "(see Video)")
    return "RGB frames [T, H, W, 3] in [-1, 1] (see Video)"


def _steps(ctx: ops.Context, spec: str, tokenizer_file: str) -> list[str]:
    s = video_pp.sampling(ctx)
    every = f"at {s.fps:g} frames per second" if s.fps > 0 else f"every {s.stride} frames"
    steps = []
    for op in ops.of_key(ops.parse(spec, ctx), "video"):
        if op.name == "decode_video":
            steps.append(f"decode {s.num_frames} frames {every} from the centre of the clip "
                         "(PyAV/FFmpeg), RGB uint8 [T, H, W, 3]")
        elif op.name == "video_resize":
            steps.append(f"resize every frame to {s.size} x {s.size} (Pillow `Image.BILINEAR`)")
        elif op.name == "video_center_crop":
            steps.append(f"crop the central square of every frame and resize it to {s.size} x "
                         f"{s.size} (Pillow `Image.BILINEAR`)")
    steps.append("pass the frames as uint8 [0, 255]: the function scales them, `x / 127.5 - 1`")
    return steps


def _load(path: str, ctx: ops.Context) -> video_pp.Info:
    return video_pp.probe(path, video_pp.sampling(ctx), image_pp.max_pixels(ctx))


VIDEO = register(Modality(
    name="video",
    towers=("vivit",),
    load=_load,
    placeholder=_placeholder,
    required_ops=("decode_video",),
    default_pp="decode_video|video_resize",
    to_model=image.to_model,
    synthetic=_synthetic,
    explained_value=strip,
    with_explained=_with_strip,
    corruptions={**{f"video_{n}": _per_frame(n) for n in image.TABLES},
                 "frame_drop": Corruption(FRAME_DROP, _frame_drop)},
    attack=Attack("pixels on the [0, 1] scale", lambda entry, params: (
        image.pixels01(entry)[0], jnp.ones((), jnp.float32), 0.0, 1.0),
        lambda entry, x: image.pixels01(entry)[1](x)),
    describe=_describe,
    steps=_steps,
    from_tfds=lambda value, feature: np.asarray(value),
))
