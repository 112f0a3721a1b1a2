"""Input corruptions at five severities: images (ImageNet-C), text and audio, in numpy.

Image corruptions follow Hendrycks & Dietterich 2019 (ImageNet-C) with its parameter tables, on
raw uint8 ``[H, W, 3]`` pixels: ``gaussian_noise``, ``gaussian_blur``, ``contrast`` and
``jpeg``. Text corruptions act on the text as the run's tokenizer reads it back (``typo``:
character edits, ``word_drop``, ``word_shuffle``; no synonyms). ``audio_noise`` adds white
noise at a signal-to-noise ratio to waveforms. Every function takes a
``numpy.random.Generator``, so a corrupted evaluation is reproducible.

:func:`batch_corruption` turns a spec into a ``batch -> batch`` function for the evaluation
loop. Images are corrupted as pixels, as a separate step on the batch: a batch that carries
uint8 images is corrupted as is; one that carries the ``[-1, 1]`` scaling of the ``normalize``
op is mapped back to its exact pixels, corrupted and scaled again.
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from PIL import Image

from mmjax.errors import ExplainedError

log = logging.getLogger(__name__)

# ImageNet-C's parameters per severity 1..5 (Hendrycks & Dietterich 2019, make_imagenet_c.py).
IMAGE_TABLES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),  # std of the noise on the [0, 1] scale
    "gaussian_blur": (1, 2, 3, 4, 6),  # sigma in pixels
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),  # factor towards each channel's mean
    "jpeg": (25, 18, 15, 10, 7),  # JPEG quality
}
TEXT_TABLES: dict[str, tuple[float, ...]] = {
    "typo": (0.1, 0.2, 0.3, 0.4, 0.5),  # probability that a word gets one character edit
    "word_drop": (0.1, 0.2, 0.3, 0.4, 0.5),  # probability that a word is dropped
    "word_shuffle": (0.2, 0.4, 0.6, 0.8, 1.0),  # fraction of positions permuted among themselves
}
AUDIO_TABLES: dict[str, tuple[float, ...]] = {"audio_noise": (20, 15, 10, 5, 0)}  # SNR in dB
KINDS = {**dict.fromkeys(IMAGE_TABLES, "image"), **dict.fromkeys(TEXT_TABLES, "text"),
         **dict.fromkeys(AUDIO_TABLES, "audio")}
SEVERITIES = (1, 2, 3, 4, 5)
UNKNOWN = "[UNK]"  # how an unknown token is written in decoded text (BERT's spelling)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


class CorruptionError(ValueError, ExplainedError):
    """A bad ``--corrupt`` spec or an input the corruption cannot act on; the message says."""


def parameter(name: str, severity: int) -> float:
    """The table value of corruption ``name`` at ``severity`` (1..5)."""
    table = {**IMAGE_TABLES, **TEXT_TABLES, **AUDIO_TABLES}
    if name not in table:
        raise CorruptionError(f"unknown corruption {name!r}; known: {sorted(table)}")
    if severity not in SEVERITIES:
        raise CorruptionError(f"corruption {name}: severity {severity!r} is not one of 1..5")
    return table[name][severity - 1]


def parse_specs(text: str) -> list[tuple[str, int]]:
    """``"gaussian_noise:3,jpeg:1-5"`` → ``[("gaussian_noise", 3), ("jpeg", 1), ...]``."""
    out: list[tuple[str, int]] = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, sep, sev = item.partition(":")
        lo, dash, hi = sev.partition("-")
        if not sep or not lo.isdigit() or (dash and not hi.isdigit()):
            raise CorruptionError(f"--corrupt item {item!r}: expected NAME:SEVERITY or "
                                  "NAME:FIRST-LAST with severities 1..5")
        for s in range(int(lo), int(hi if dash else lo) + 1):
            parameter(name, s)  # validates both
            out.append((name, s))
    if not out:
        raise CorruptionError(f"--corrupt={text!r} names no corruption")
    return out


# --- images: uint8 [H, W, 3] -> uint8 [H, W, 3] ----------------------------------------------


def _to_uint8(x01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


def gaussian_noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of std ``c`` on the [0, 1] scale, clipped."""
    c = parameter("gaussian_noise", severity)
    x = image.astype(np.float64) / 255.0
    return _to_uint8(x + rng.normal(scale=c, size=x.shape))


def _blur_axis(x: np.ndarray, sigma: float, axis: int, truncate: float = 4.0) -> np.ndarray:
    """1-D Gaussian along ``axis`` with edge replication (scipy's ``mode="nearest"``)."""
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="edge")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for i, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(i, i + n), axis=axis)
    return out


def gaussian_blur(image: np.ndarray, severity: int, rng: np.random.Generator | None = None
                  ) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels over height and width (skimage's ``gaussian`` as
    ImageNet-C calls it: edge replication, kernel truncated at 4 sigma)."""
    sigma = parameter("gaussian_blur", severity)
    x = image.astype(np.float64) / 255.0
    return _to_uint8(_blur_axis(_blur_axis(x, sigma, 0), sigma, 1))


def contrast(image: np.ndarray, severity: int, rng: np.random.Generator | None = None
             ) -> np.ndarray:
    """Each channel pulled towards its mean: ``(x - mean) * c + mean``."""
    c = parameter("contrast", severity)
    x = image.astype(np.float64) / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - means) * c + means)


def jpeg(image: np.ndarray, severity: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A JPEG round trip at ImageNet-C's quality (Pillow, its default 4:2:0 subsampling)."""
    quality = int(parameter("jpeg", severity))
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, "JPEG", quality=quality)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        return np.asarray(im.convert("RGB"))


IMAGE_FNS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "gaussian_blur": gaussian_blur, "contrast": contrast,
    "jpeg": jpeg,
}


def corrupt_image(image: np.ndarray, name: str, severity: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Image corruption ``name`` of one uint8 ``[H, W, 3]`` image."""
    if name not in IMAGE_FNS:
        raise CorruptionError(f"unknown image corruption {name!r}; known: {sorted(IMAGE_FNS)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise CorruptionError(f"{name}: expected a uint8 [H, W, C] image, got {image.dtype} "
                              f"{image.shape}")
    return IMAGE_FNS[name](image, severity, rng)


# --- text: str -> str -------------------------------------------------------------------------


def _special(word: str) -> bool:
    return word.startswith("[") and word.endswith("]")


def _typo(word: str, rng: np.random.Generator) -> str:
    """One edit: swap two neighbouring characters, delete, insert or substitute one."""
    edits = ("swap", "delete", "insert", "substitute") if len(word) >= 2 else \
        ("insert", "substitute")
    kind = edits[int(rng.integers(0, len(edits)))]
    i = int(rng.integers(0, max(len(word), 1)))
    letter = _LETTERS[int(rng.integers(0, len(_LETTERS)))]
    if kind == "swap":
        i = min(i, len(word) - 2)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "delete":
        return word[:i] + word[i + 1:]
    if kind == "insert":
        return word[:i] + letter + word[i:]
    return word[:i] + letter + word[i + 1:]  # substitute


def corrupt_text(text: str, name: str, severity: int, rng: np.random.Generator) -> str:
    """Text corruption ``name`` of one string (words split on whitespace; special tokens such
    as ``[UNK]`` are never edited; ``word_drop`` keeps at least one word)."""
    p = parameter(name, severity)
    if KINDS[name] != "text":
        raise CorruptionError(f"{name} is not a text corruption; text: {sorted(TEXT_TABLES)}")
    words = text.split()
    if not words:
        return text
    if name == "typo":
        words = [_typo(w, rng) if not _special(w) and rng.uniform() < p else w for w in words]
    elif name == "word_drop":
        keep = rng.uniform(size=len(words)) >= p
        if not keep.any():
            keep[int(rng.integers(0, len(words)))] = True
        words = [w for w, k in zip(words, keep, strict=True) if k]
    else:  # word_shuffle
        chosen = np.flatnonzero(rng.uniform(size=len(words)) < p)
        order = list(range(len(words)))
        for src, dst in zip(chosen, rng.permutation(chosen), strict=True):
            order[src] = int(dst)
        words = [words[i] for i in order]
    return " ".join(words)


# --- audio: float waveform -> float waveform ---------------------------------------------------


def add_noise(waveform: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``waveform`` (``[..., T]``, each row a signal) plus white Gaussian noise scaled so that
    each row's signal-to-noise power ratio is exactly ``snr_db`` decibels."""
    x = np.asarray(waveform, np.float64)
    noise = rng.standard_normal(x.shape)
    p_signal = np.mean(x**2, axis=-1, keepdims=True)
    p_noise = np.mean(noise**2, axis=-1, keepdims=True)
    scale = np.sqrt(p_signal / (p_noise * 10.0 ** (snr_db / 10.0)))
    return (x + noise * scale).astype(np.asarray(waveform).dtype)


def audio_noise(waveform: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """White noise at ``AUDIO_TABLES["audio_noise"]`` dB SNR (20 dB at severity 1 to 0 dB)."""
    return add_noise(waveform, parameter("audio_noise", severity), rng)


# --- batches ---------------------------------------------------------------------------------


def image_pixels(images: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """(uint8 pixels of a batch's images, a function back to the batch's representation).

    uint8 images pass through; float images must be the ``normalize`` op's ``x / 127.5 - 1``
    of uint8 pixels (checked), which is inverted exactly.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images, lambda pixels: pixels
    if not np.issubdtype(images.dtype, np.floating):
        raise CorruptionError(f"batch['image'] has dtype {images.dtype}; corruptions need "
                              "uint8 pixels or their [-1, 1] scaling")
    scaled = (images.astype(np.float64) + 1.0) * 127.5
    pixels = np.round(scaled)
    if images.size and (np.abs(scaled - pixels).max() > 1e-3 or pixels.min() < 0
                        or pixels.max() > 255):
        raise CorruptionError("batch['image'] is not the [-1, 1] scaling (x / 127.5 - 1) of "
                              "uint8 pixels that data.pp_eval's normalize op writes, so the raw "
                              "pixels that corruptions act on cannot be recovered")
    dtype = images.dtype

    def back(p: np.ndarray) -> np.ndarray:
        return (p.astype(np.float32) * (1.0 / 127.5) - 1.0).astype(dtype)

    return pixels.astype(np.uint8), back


def decode_keeping_unknown(tokenizer: Any, ids: np.ndarray) -> list[str]:
    """``tokenizer.decode`` of each row, with every unknown-token id written as ``[UNK]``
    (decoders drop special tokens, so a plain round trip would delete unknown words)."""
    unk = getattr(tokenizer, "UNK", None)
    out = []
    for row in np.atleast_2d(ids):
        if unk is None or unk not in row:
            out.append(tokenizer.decode(row[None])[0])
            continue
        parts, run = [], []
        for i in [*row.tolist(), unk]:
            if i != unk:
                run.append(i)
                continue
            if run:
                parts.append(tokenizer.decode(np.asarray([run]))[0])
            parts.append(UNKNOWN)
            run = []
        out.append(" ".join(p for p in parts[:-1] if p))
    return out


def corrupt_batch(batch: Mapping[str, Any], name: str, severity: int, rng: np.random.Generator,
                  *, tokenizer: Any = None) -> dict[str, Any]:
    """``batch`` with corruption ``name`` applied to every row of its modality's entry
    (``image``, ``text`` as ``{"ids", "mask"}`` decoded and re-encoded with ``tokenizer``,
    ``audio`` as ``[B, T]`` waveforms)."""
    kind = KINDS.get(name)
    parameter(name, severity)
    if kind not in batch:
        raise CorruptionError(f"corruption {name} acts on {kind!r}, which the batch lacks "
                              f"(keys {sorted(batch)})")
    out = dict(batch)
    if kind == "image":
        pixels, back = image_pixels(batch["image"])
        out["image"] = back(np.stack([corrupt_image(p, name, severity, rng) for p in pixels]))
    elif kind == "text":
        if tokenizer is None:
            raise CorruptionError(f"text corruption {name} needs the run's tokenizer")
        ids = np.asarray(batch["text"]["ids"])
        texts = decode_keeping_unknown(tokenizer, ids)
        same = (tokenizer.encode(texts, ids.shape[1])[0] == ids).all(axis=1)
        if not same.all():
            log.warning("%s: %d of %d text rows change in the tokenizer's decode/encode round "
                        "trip alone", name, int((~same).sum()), len(same))
        texts = [corrupt_text(t, name, severity, rng) for t in texts]
        new_ids, new_mask = tokenizer.encode(texts, ids.shape[1])
        out["text"] = {**batch["text"], "ids": new_ids.astype(ids.dtype),
                       "mask": new_mask.astype(np.asarray(batch["text"]["mask"]).dtype)}
    else:
        audio = np.asarray(batch["audio"])
        if audio.ndim != 2:
            raise CorruptionError(f"audio_noise is defined on waveforms [B, T]; batch['audio'] "
                                  f"has shape {audio.shape} (features: the noise must be added "
                                  "before the feature front end)")
        out["audio"] = audio_noise(audio, severity, rng)
    return out


def batch_corruption(name: str, severity: int, *, tokenizer: Any = None,
                     seed: int = 0) -> Callable[[dict], dict]:
    """``batch -> corrupted batch`` for the evaluation loop; batch ``i`` draws from
    ``default_rng([seed, crc32(name), severity, i])``, so the same split gives the same
    corruption every time."""
    parameter(name, severity)
    counter = iter(range(2**62))
    salt = zlib.crc32(name.encode())

    def fn(batch: dict) -> dict:
        rng = np.random.default_rng([seed, salt, severity, next(counter)])
        return corrupt_batch(batch, name, severity, rng, tokenizer=tokenizer)

    return fn
