"""The embedded "shapes" dataset: a visual question answering task that needs both modalities.

Every image is black with exactly two objects, each centred in its own cell of a 4x4 grid, so
with an image of 32 px each object lies inside one 8x8 ViT patch. That alignment is what lets a
tiny ViT learn the task in a few hundred steps on a CPU (docs/training.md); objects placed freely
take far longer. The two objects always differ in shape *and* colour, so
"what colour is the circle ?" and "what shape is the red one ?" each have exactly one answer,
and neither the picture alone nor the question alone determines it.

Nothing is stored or downloaded: example ``i`` of a split is a pure function of
``(seed, split, i)``. Randomness comes from a counter-based hash rather than a stateful RNG so a
whole batch of arbitrary indices can be drawn with a handful of vectorised numpy operations,
and so that drawing one example or a batch that contains it gives identical pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
ANSWERS: tuple[str, ...] = COLOURS + SHAPES

# Distinct per-split streams; they enter the hash as separate words, so no choice of the user
# seed can make one split's stream collide with another's.
SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1_000_003, "test": 2_000_006}

VARIANTS: tuple[str, ...] = ("", "image_only", "text_only")

# The one text every example gets in the "image_only" variant: it carries no information.
CONSTANT_TEXT = "what is the answer ?"

GRID = 4  # cells per side; one object per cell, at most one cell per ViT patch
COLOUR_JITTER = 20  # per-channel uniform jitter, on the 0-255 scale
# Object half-extent as a fraction of the cell side, one drawn per object. Both leave a margin of
# at least a pixel in the cell, and both keep the three silhouettes distinct on an 8-px cell
# (circle rows 2-4-6-6-4-2 px wide, square 6x6, triangle 2-2-4-4-6); they differ only on bigger
# cells, so the jitter in size is real but never blurs the shapes of the 32-px demo.
SIZE_FRACTIONS: tuple[float, ...] = (0.33, 0.355)

# Base colours sit 25 away from the ends of the range so that jitter rarely clips, and every
# pair differs by ~200 in at least one channel so colours never blur into each other.
_RGB = np.array(
    [
        [230, 30, 30],  # red
        [30, 230, 30],  # green
        [30, 30, 230],  # blue
        [230, 230, 30],  # yellow
        [230, 30, 230],  # magenta
        [30, 230, 230],  # cyan
    ],
    dtype=np.float32,
)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)

# Words drawn per example, in this order (adding a field at the end keeps old ones unchanged).
_F_CELL, _F_CELL2, _F_SHAPE, _F_SHAPE2, _F_COL, _F_COL2, _F_SIZE, _F_SIZE2, _F_TARGET = range(9)
_F_JITTER = 9  # six words: 3 channels x 2 objects
_NUM_FIELDS = _F_JITTER + 6


class Layout(NamedTuple):
    """What is drawn and asked in a batch of examples; tests use it to check the pixels.

    Object arrays are ``[B, 2]``; object 0 is the one in the lower-numbered (reading order) cell,
    which is also the order of the caption.
    """

    cells: np.ndarray  # int, cell index in 0..15, row-major
    shapes: np.ndarray  # int, index into SHAPES
    colours: np.ndarray  # int, index into COLOURS
    sizes: np.ndarray  # int, index into SIZE_FRACTIONS
    rgb: np.ndarray  # uint8 [B, 2, 3], the jittered colour actually drawn
    target: np.ndarray  # int [B], which object the question is about
    qtype: np.ndarray  # int [B], 0 asks for the colour, 1 asks for the shape


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 whose outputs look independent."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MUL1
    x = x ^ (x >> np.uint64(27))
    x = x * _MUL2
    return x ^ (x >> np.uint64(31))


def _random_words(split: str, indices: np.ndarray, seed: int) -> np.ndarray:
    """uint64 ``[B, _NUM_FIELDS]``, each word a pure function of (seed, split, index, field)."""
    key = _mix(np.array([seed % 2**64], dtype=np.uint64))
    key = _mix(key ^ np.array([SPLIT_SEEDS[split]], dtype=np.uint64) * _GOLDEN)
    base = _mix(key + indices.astype(np.uint64) * _GOLDEN)
    fields = np.arange(1, _NUM_FIELDS + 1, dtype=np.uint64) * _GOLDEN
    return _mix(base[:, None] ^ _mix(fields)[None, :])


def check_split(name: str, split: str, variant: str, variants: Sequence[str]) -> None:
    """Names the unknown split or variant of the embedded set ``name``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown {name} split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
    if variant not in variants:
        raise ValueError(f"unknown {name} variant {variant!r}; expected one of {variants}")


def _check(split: str, variant: str, image_size: int) -> None:
    check_split("shapes", split, variant, VARIANTS)
    _check_size(image_size)


def _check_size(image_size: int) -> None:
    if image_size < 4 * GRID or image_size % GRID:
        raise ValueError(
            f"shapes image_size must be a multiple of {GRID} and at least {4 * GRID}, "
            f"got {image_size}"
        )


def sample_layout(split: str, indices: Sequence[int] | np.ndarray, *, seed: int = 0) -> Layout:
    """Draws objects, colours, cells and the question for each index, without any pixels."""
    _check(split, "", 4 * GRID)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and indices.min() < 0:
        raise ValueError(f"shapes indices must be non-negative, got {int(indices.min())}")
    w = _random_words(split, indices, seed)
    # Ordered pairs of distinct values, uniformly: the first anywhere, the second at a non-zero
    # offset from it. (Modulo bias from a 64-bit word is far below anything measurable.)
    c0 = w[:, _F_CELL] % 16
    c1 = (c0 + 1 + w[:, _F_CELL2] % 15) % 16
    s0 = w[:, _F_SHAPE] % 3
    s1 = (s0 + 1 + w[:, _F_SHAPE2] % 2) % 3
    k0 = w[:, _F_COL] % 6
    k1 = (k0 + 1 + w[:, _F_COL2] % 5) % 6
    z0 = w[:, _F_SIZE] % len(SIZE_FRACTIONS)
    z1 = w[:, _F_SIZE2] % len(SIZE_FRACTIONS)
    swap = c1 < c0  # put the objects in reading order
    cells = np.where(swap[:, None], np.stack([c1, c0], 1), np.stack([c0, c1], 1))
    shapes = np.where(swap[:, None], np.stack([s1, s0], 1), np.stack([s0, s1], 1))
    colours = np.where(swap[:, None], np.stack([k1, k0], 1), np.stack([k0, k1], 1))
    sizes = np.where(swap[:, None], np.stack([z1, z0], 1), np.stack([z0, z1], 1))
    jitter = (w[:, _F_JITTER:] % (2 * COLOUR_JITTER + 1)).astype(np.int64) - COLOUR_JITTER
    colours = colours.astype(np.int64)
    rgb = _RGB[colours] + jitter.reshape(-1, 2, 3)
    return Layout(
        cells=cells.astype(np.int64),
        shapes=shapes.astype(np.int64),
        colours=colours,
        sizes=sizes.astype(np.int64),
        rgb=np.clip(rgb, 0, 255).astype(np.uint8),
        target=(w[:, _F_TARGET] % 2).astype(np.int64),
        # Alternating by index makes every split (and every prefix of one) exactly balanced.
        qtype=indices % 2,
    )


@functools.lru_cache(maxsize=16)
def _masks(cell: int) -> np.ndarray:
    """uint8 ``[len(SHAPES), len(SIZE_FRACTIONS), cell, cell]`` masks (1 inside), per cell size.

    Crisp masks from pixel centres rather than anti-aliased ones: at 8 px a soft-edged square
    and circle differ by a few tens of grey levels in their corners, while crisp ones differ in
    twelve whole pixels, which a tiny ViT separates within the demo's few hundred steps.
    """
    t = np.arange(cell) + 0.5 - cell / 2  # pixel-centre offsets from the cell centre
    dy, dx = np.meshgrid(t, t, indexing="ij")
    out = np.zeros((len(SHAPES), len(SIZE_FRACTIONS), cell, cell), np.uint8)
    for j, frac in enumerate(SIZE_FRACTIONS):
        h = frac * cell
        inside = {
            "circle": dx**2 + dy**2 <= h**2,
            "square": np.maximum(np.abs(dx), np.abs(dy)) <= h,
            # Apex up, base 2h wide at the bottom: its rows widen downwards, unlike the others.
            "triangle": (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / 2),
        }
        for i, name in enumerate(SHAPES):
            out[i, j] = inside[name]
    return out


def render(layout: Layout, image_size: int = 32) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` images of a layout, built cell-wise without per-pixel loops."""
    cell = image_size // GRID
    n = layout.cells.shape[0]
    masks = _masks(cell)
    # Work in uint8 and only write the two occupied cells: a float canvas would move 4x the
    # bytes, the bulk of a batch's time.
    cells = np.zeros((n, GRID * GRID, cell, cell, 3), np.uint8)
    rows = np.arange(n)
    for obj in range(2):
        m = masks[layout.shapes[:, obj], layout.sizes[:, obj]]  # [B, cell, cell] of 0/1
        cells[rows, layout.cells[:, obj]] = m[..., None] * layout.rgb[:, obj, None, None, :]
    img = cells.reshape(n, GRID, GRID, cell, cell, 3).transpose(0, 1, 3, 2, 4, 5)
    return img.reshape(n, image_size, image_size, 3)


@functools.lru_cache(maxsize=1)
def _text_tables() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """Every question and object phrase, so building a batch's strings is only table lookups."""
    colour_q = tuple(f"what colour is the {s} ?" for s in SHAPES)
    shape_q = tuple(f"what shape is the {c} one ?" for c in COLOURS)
    phrases = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
    return colour_q, shape_q, phrases


def texts(layout: Layout, variant: str = "") -> tuple[list[str], list[str], np.ndarray]:
    """(questions, captions, labels) of a layout; labels index ANSWERS."""
    rows = np.arange(layout.cells.shape[0])
    tshape = layout.shapes[rows, layout.target]
    tcolour = layout.colours[rows, layout.target]
    asks_colour = layout.qtype == 0
    # Asking for the colour names the shape, and vice versa.
    labels = np.where(asks_colour, tcolour, len(COLOURS) + tshape).astype(np.int32)
    if variant == "image_only":
        const = [CONSTANT_TEXT] * len(rows)
        return const, list(const), labels
    colour_q, shape_q, phrases = _text_tables()
    questions = [
        colour_q[s] if a else shape_q[c]
        for a, s, c in zip(asks_colour.tolist(), tshape.tolist(), tcolour.tolist(), strict=True)
    ]
    p = (layout.colours * len(SHAPES) + layout.shapes).tolist()
    captions = [f"a {phrases[a]} and a {phrases[b]}" for a, b in p]
    return questions, captions, labels


def make_batch(
    split: str,
    indices: Sequence[int] | np.ndarray,
    *,
    image_size: int = 32,
    variant: str = "",
    seed: int = 0,
) -> dict:
    """Examples ``indices`` of ``split`` at once: the fast path the pipeline uses.

    Returns ``{"image": uint8[B,H,W,3], "question": list[str], "caption": list[str],
    "label": int32[B]}``; row ``b`` equals ``make_example(split, indices[b], ...)``.
    """
    _check(split, variant, image_size)
    layout = sample_layout(split, indices, seed=seed)
    questions, captions, labels = texts(layout, variant)
    if variant == "text_only":
        image = np.zeros((len(labels), image_size, image_size, 3), np.uint8)
    else:
        image = render(layout, image_size)
    return {"image": image, "question": questions, "caption": captions, "label": labels}


def make_example(
    split: str, index: int, *, image_size: int = 32, variant: str = "", seed: int = 0
) -> dict:
    """Example ``index`` of ``split``: ``{"image", "question", "caption", "label"}``."""
    b = make_batch(split, [index], image_size=image_size, variant=variant, seed=seed)
    return {
        "image": b["image"][0],
        "question": b["question"][0],
        "caption": b["caption"][0],
        "label": int(b["label"][0]),
    }


class ShapesSource:
    """A grain random-access source over one split; examples are drawn lazily when read.

    Reading by index (``__getitem__``) serves grain's per-record pipelines; ``get_batch`` draws a
    whole batch of indices vectorised, which the shapes pipeline uses because it is much faster.
    The other embedded sets (``shapes_audio``, ``shapes_video``) subclass it with their own
    ``make_batch``, ``make_example`` and argument check.
    """

    name, variants = "shapes", VARIANTS
    make_batch = staticmethod(make_batch)
    make_example = staticmethod(make_example)

    def __init__(
        self,
        split: str,
        num_examples: int,
        *,
        image_size: int = 32,
        variant: str = "",
        seed: int = 0,
    ):
        check_split(self.name, split, variant, self.variants)
        _check_size(image_size)
        if num_examples <= 0:
            raise ValueError(f"{self.name} num_examples must be positive, got {num_examples}")
        self.split = split
        self.num_examples = int(num_examples)
        self.image_size = image_size
        self.variant = variant
        self.seed = seed

    def __len__(self) -> int:
        return self.num_examples

    def _checked(self, indices: np.ndarray) -> np.ndarray:
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            bad = indices[(indices < 0) | (indices >= self.num_examples)][0]
            raise IndexError(f"index {int(bad)} out of range for {self.num_examples} examples")
        return indices

    def __getitem__(self, index: int) -> dict:
        self._checked(np.asarray([index]))
        return self.make_example(self.split, int(index), image_size=self.image_size,
                                 variant=self.variant, seed=self.seed)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict:
        """Examples at ``indices`` stacked: see the module's ``make_batch``."""
        idx = self._checked(np.asarray(indices, dtype=np.int64).reshape(-1))
        return self.make_batch(self.split, idx, image_size=self.image_size, variant=self.variant,
                               seed=self.seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(split={self.split!r}, num_examples={self.num_examples}, "
            f"image_size={self.image_size}, variant={self.variant!r}, seed={self.seed})"
        )
