"""The embedded "shapes_video" dataset: a question whose answer needs the motion and the text.

Each example is a clip of ``NUM_FRAMES`` frames in which two squares of different colours move,
each in its own direction (right, left, down or up, ``SPEED`` pixels a frame, wrapping around
the edges), and the question "which way does the <colour> square move ?" names one of them.
The answer is that square's direction (4 classes, balanced); ``data.text="caption"`` gives
"the red square moves left and the blue square moves up" instead (video-text contrastive
training). So:

- video alone: the answer is one of the two directions on screen (50%);
- text alone: the colour says nothing about the direction (25%);
- one frame alone: with wrap-around, a square's position says nothing about its direction
  (25% with the question); the ``one_frame`` variant repeats the first frame to show it.

``variant``: ``no_video`` (every clip black), ``no_text`` (one constant question),
``one_frame`` (a still clip). Example ``i`` of a split is a pure function of
``(seed, split, i)``, like ``shapes``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.data import shapes
from mmjax.data.tokenize import WordTokenizer

DIRECTIONS: tuple[str, ...] = ("right", "left", "down", "up")
ANSWERS: tuple[str, ...] = DIRECTIONS
VARIANTS: tuple[str, ...] = ("", "no_video", "no_text", "one_frame")
CONSTANT_TEXT = shapes.CONSTANT_TEXT
NUM_FRAMES = 8
SPEED = 2  # pixels per frame
SIDE = 6  # square side in pixels (32-px frames)
_STEP = np.array([[0, 1], [0, -1], [1, 0], [-1, 0]])  # (row, column) step per direction
_SALT = 0x51DE0


def _check(split: str, variant: str) -> None:
    shapes.check_split("shapes_video", split, variant, VARIANTS)


def render(starts: np.ndarray, directions: np.ndarray, colours: np.ndarray, size: int,
           frames: int = NUM_FRAMES) -> np.ndarray:
    """uint8 ``[frames, size, size, 3]``: squares with top-left corners ``starts``
    ([K, 2] rows, columns), moving in ``directions`` [K], filled with ``colours`` [K, 3]."""
    clip = np.zeros((frames, size, size, 3), np.uint8)
    side = np.arange(SIDE * size // 32)
    for t in range(frames):
        for start, d, rgb in zip(starts, directions, colours, strict=True):
            r, c = (start + _STEP[d] * SPEED * t) % size
            clip[t, ((r + side) % size)[:, None], ((c + side) % size)[None, :]] = rgb
    return clip


def make_example(split: str, index: int, *, image_size: int = 32, variant: str = "",
                 seed: int = 0, frames: int = NUM_FRAMES) -> dict:
    """``{"video": uint8 [T, S, S, 3], "question": str, "label": int}`` of example ``index``
    (``frames``: T, for longer clips written to files)."""
    _check(split, variant)
    rng = np.random.default_rng([seed % 2**63, _SALT, shapes.SPLIT_SEEDS[split], int(index)])
    colours = rng.choice(len(shapes.COLOURS), size=2, replace=False)
    directions = rng.choice(len(DIRECTIONS), size=2, replace=False)
    asked = int(rng.integers(2))
    # Balanced answers: the asked square's direction cycles with the index.
    shift = (int(index) % len(DIRECTIONS) - directions[asked]) % len(DIRECTIONS)
    directions = (directions + shift) % len(DIRECTIONS)
    starts = rng.integers(0, image_size, size=(2, 2))
    rgb = np.clip(shapes._RGB[colours] + rng.uniform(-20, 20, (2, 3)), 0, 255).astype(np.uint8)
    clip = render(starts, directions, rgb, image_size, frames)
    if variant == "no_video":
        clip[:] = 0
    elif variant == "one_frame":
        clip[:] = clip[0]
    question = CONSTANT_TEXT if variant == "no_text" else \
        f"which way does the {shapes.COLOURS[colours[asked]]} square move ?"
    first = int(rng.integers(2))
    caption = " and ".join(f"the {shapes.COLOURS[colours[k]]} square moves "
                           f"{DIRECTIONS[directions[k]]}" for k in (first, 1 - first))
    return {"video": clip, "question": question, "caption": caption,
            "label": int(directions[asked])}


def make_batch(split: str, indices: Sequence[int] | np.ndarray, *, image_size: int = 32,
               variant: str = "", seed: int = 0) -> dict:
    """Examples ``indices`` stacked: ``{"video": uint8 [B, T, S, S, 3], "question":
    list[str], "caption": list[str], "label": int32 [B]}``."""
    rows = [make_example(split, int(i), image_size=image_size, variant=variant, seed=seed)
            for i in np.asarray(indices).reshape(-1)]
    return {"video": np.stack([r["video"] for r in rows]),
            "question": [r["question"] for r in rows],
            "caption": [r["caption"] for r in rows],
            "label": np.asarray([r["label"] for r in rows], np.int32)}


def tokenizer() -> WordTokenizer:
    """The fixed vocabulary of the questions (ids stable across runs)."""
    words = ["which", "way", "does", "the", "square", "move", "?", "moves", "and",
             *CONSTANT_TEXT.split(), *shapes.COLOURS, *DIRECTIONS]
    return WordTokenizer(words)


class ShapesVideoSource(shapes.ShapesSource):
    """A split of ``shapes_video``, read a batch of indices at a time (``get_batch``)."""

    name, variants = "shapes_video", VARIANTS
    make_batch = staticmethod(make_batch)
    make_example = staticmethod(make_example)
