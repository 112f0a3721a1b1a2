r"""A real-data video + text folder set: two handwritten digits move, a question asks about one.

``moving_digits`` writes ``DIR/{train,val,test}.jsonl`` and H.264 clips in the format of
``mmjax/data/folder.py``. Each clip shows two different UCI handwritten digits
(``sklearn.datasets.load_digits``, 8x8 scans shown at 12x12, light on black; train, val and
test use disjoint scans) on ``size`` x ``size`` frames, each moving one pixel per frame in its
own direction (right, left, down or up) and staying inside the frame. The question
"which way does the 7 move ?" names one of the two; the answer is its direction.

One frame cannot answer (it shows no motion) and the motion alone cannot either (two digits
move, in different directions): the video alone reaches 0.5, the question alone 0.25.

As a script::

    python -m tests.realdata_video DIR [--num_train 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.video_clips import write_clip

DIRECTIONS = ("right", "left", "down", "up")
STEPS = np.array([[0, 1], [0, -1], [1, 0], [-1, 0]])  # (row, column) per frame


def _glyph(image: np.ndarray) -> np.ndarray:
    """A float 8x8 scan (0..1) → 12x12: each pixel repeated 3 times, every second row/column."""
    return np.repeat(np.repeat(image, 3, 0), 3, 1)[::2, ::2]


def moving_digits(root: str | Path, *, num_train: int = 2000, num_val: int = 300,
                  num_test: int = 300, size: int = 32, num_frames: int = 16,
                  seed: int = 0) -> dict[str, int]:
    """Writes the set into ``root``; returns the number of records per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images / 16.0, digits.target
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(targets))
    scans = {"train": perm[:1400], "val": perm[1400:1600], "test": perm[1600:]}
    glyph, room = 12, size - 12
    if room < num_frames - 1:
        raise ValueError(f"frames of {size} px leave no room to move {num_frames - 1} px")
    counts = {}
    for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
        lines = []
        for i in range(n):
            a, b = rng.choice(scans[split], 2, replace=False)
            while targets[a] == targets[b]:
                b = rng.choice(scans[split])
            dirs = rng.choice(4, 2, replace=False)
            step = STEPS[dirs]
            # Start where the whole path stays inside the frame.
            starts = np.where(step > 0, rng.integers(0, room - num_frames + 1, (2, 2)),
                              np.where(step < 0, rng.integers(num_frames - 1, room + 1, (2, 2)),
                                       rng.integers(0, room + 1, (2, 2))))
            frames = np.zeros((num_frames, size, size, 3), np.uint8)
            for t in range(num_frames):
                for k, idx in enumerate((a, b)):
                    r, c = starts[k] + step[k] * t
                    ink = (_glyph(images[idx])[..., None] * 255).astype(np.uint8)
                    cell = frames[t, r:r + glyph, c:c + glyph]
                    np.maximum(cell, ink, out=cell)
            asked = int(rng.integers(2))
            name = f"clips/{split}_{i}.mp4"
            write_clip(root / name, frames)
            lines.append(json.dumps({"video": name,
                                     "text": f"which way does the {targets[(a, b)[asked]]} move ?",
                                     "label": DIRECTIONS[dirs[asked]]}) + "\n")
        (root / f"{split}.jsonl").write_text("".join(lines))
        counts[split] = n
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root")
    parser.add_argument("--num_train", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(moving_digits(args.root, num_train=args.num_train, seed=args.seed))


if __name__ == "__main__":
    main()
