"""The embedded "shapes_audio" dataset: a question that needs the image, a sound and the text.

Each example is a ``shapes`` image (two objects that differ in shape and colour), a short clip
whose pitch names a colour (one tone per colour, plus noise and a noise burst), and the question
"is the <shape> the colour you hear ?". The answer is "yes" when the asked shape's object has
the heard colour, else "no, it is <its colour>" (7 classes). The heard colour is always one of
the two objects' colours and the asked shape always one of their shapes; the answer alternates
between yes and no with the index, and the heard object is the asked one exactly for "yes". So
no two modalities can do better than the majority answer, 50%:

- image + text: the heard colour is either object's, equally often (yes, or no with the asked
  object's colour);
- image + sound: the asked shape is either object's, equally often (yes, or no with the other
  object's colour);
- sound + text: shape and colour are drawn independently, so the pair is an object's (yes) as
  often as not, and a "no" names one of the five other colours uniformly.

Naming the colour in a "no" is what makes the task learnable in minutes: a yes/no answer alone
depends on the three inputs only through a three-way interaction (no signal from any pair),
which a small model does not pick up; with the colour named, the asked
object's colour is learnt as in ``shapes``, and "yes" against "no, it is c" is then linear in
that colour and the heard one.

The ``variant`` keys make one modality uninformative for ablations: ``no_image`` (blank
images), ``no_audio`` (one fixed noise clip for every example), ``no_text`` (one constant
question).

Audio: 16 kHz clips of ``CLIP_SAMPLES`` samples, turned into the Kaldi fbank of
``ASTFeatureExtractor`` with ``NUM_MELS`` mel bins and ``NUM_FRAMES`` frames (``[frames, mels]``,
an AST tower's ``input_values`` layout), so a small AST sees few patches. Each split has its own
bank of ``CLIPS_PER_COLOUR`` clips per colour, synthesised and featurised once per process
(``clip_bank``); an example picks a clip of its heard colour by a hash of its index. Like
``shapes``, example ``i`` of a split is a pure function of ``(seed, split, i)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmjax.data import shapes
from mmjax.data.tokenize import WordTokenizer
from mmjax.pp import audio_features as audio

ANSWERS: tuple[str, ...] = ("yes", *(f"no, it is {c}" for c in shapes.COLOURS))
VARIANTS: tuple[str, ...] = ("", "no_image", "no_audio", "no_text")
CONSTANT_TEXT = shapes.CONSTANT_TEXT  # the one question of the "no_text" variant

SAMPLE_RATE = 16_000
NUM_MELS = 16
NUM_FRAMES = 32
# Exactly NUM_FRAMES frames of 25 ms every 10 ms (0.335 s): no padding in the features.
CLIP_SAMPLES = 400 + (NUM_FRAMES - 1) * 160
CLIPS_PER_COLOUR = 64
# One tone per colour of shapes.COLOURS, at the centres of every other Kaldi mel bin (16 bins,
# 20 Hz to 8 kHz), so that each colour lights its own bin.
TONES_HZ: tuple[float, ...] = (265.0, 594.0, 1035.0, 1626.0, 2418.0, 3481.0)
TONE_JITTER = 0.02  # relative pitch jitter per clip; far below the 2-bin spacing

_SALT = 0x5A0D10  # separates this module's draws from those of shapes
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def _check(split: str, variant: str) -> None:
    shapes.check_split("shapes_audio", split, variant, VARIANTS)


def synth_clip(rng: np.random.Generator, tone_hz: float | None) -> np.ndarray:
    """float32 ``[CLIP_SAMPLES]`` in [-1, 1]: a tone of ``tone_hz`` (±``TONE_JITTER``) with
    random onset, length, loudness and phase, a 20-50 ms noise burst and background noise.
    ``tone_hz=None`` gives the noise alone."""
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    x = rng.normal(0.0, rng.uniform(0.005, 0.02), CLIP_SAMPLES)
    start = int(rng.integers(0, CLIP_SAMPLES - 800))
    width = int(rng.integers(320, 800))
    x[start:start + width] += rng.normal(0.0, rng.uniform(0.02, 0.08), width)[:len(x) - start]
    if tone_hz is not None:
        f = tone_hz * (1.0 + rng.uniform(-TONE_JITTER, TONE_JITTER))
        onset = int(rng.integers(0, 1200))
        length = int(rng.integers(2800, CLIP_SAMPLES - onset + 1))
        ramp = 160  # 10 ms raised-cosine fade in and out: no clicks
        env = np.zeros(CLIP_SAMPLES)
        env[onset:onset + length] = 1.0
        fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[onset:onset + ramp] *= fade
        env[onset + length - ramp:onset + length] *= fade[::-1]
        x += rng.uniform(0.1, 0.4) * env * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def features(waveforms: np.ndarray) -> np.ndarray:
    """float32 ``[N, NUM_FRAMES, NUM_MELS]``: ``ASTFeatureExtractor``'s ``input_values`` with
    ``num_mel_bins=NUM_MELS, max_length=NUM_FRAMES`` (AudioSet normalisation)."""
    fe = audio.FrontEnd("ast", SAMPLE_RATE, {"num_mel_bins": NUM_MELS, "max_length": NUM_FRAMES,
                                             "sampling_rate": SAMPLE_RATE})
    return fe(list(waveforms), sampling_rate=SAMPLE_RATE)


@functools.lru_cache(maxsize=8)
def clip_bank(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A split's clips and their features, computed once: ``(waveforms [C*K, CLIP_SAMPLES],
    features [C*K, NUM_FRAMES, NUM_MELS])`` with clip ``c*K + k`` the k-th of colour ``c``
    (K = ``CLIPS_PER_COLOUR``). Arrays are read-only (shared by every batch)."""
    _check(split, "")
    waves = np.stack([
        synth_clip(np.random.default_rng([seed % 2**63, _SALT, _SPLIT_INDEX[split], c, k]), tone)
        for c, tone in enumerate(TONES_HZ) for k in range(CLIPS_PER_COLOUR)
    ])
    feats = features(waves)
    waves.flags.writeable = feats.flags.writeable = False
    return waves, feats


@functools.lru_cache(maxsize=1)
def _silent_features() -> np.ndarray:
    """Features of one fixed noise-only clip: the uninformative audio of ``no_audio``."""
    return features(synth_clip(np.random.default_rng([_SALT, 99]), None)[None])[0]


def _clip_choice(split: str, indices: np.ndarray, seed: int) -> np.ndarray:
    """int ``[B]`` in ``[0, CLIPS_PER_COLOUR)``, a hash of (seed, split, index)."""
    key = shapes._mix(np.array([(seed ^ _SALT) % 2**64], np.uint64))
    key = shapes._mix(key ^ np.array([shapes.SPLIT_SEEDS[split]], np.uint64) * shapes._GOLDEN)
    words = shapes._mix(key + indices.astype(np.uint64) * shapes._GOLDEN)
    return (words % CLIPS_PER_COLOUR).astype(np.int64)


def questions(shape_ids: np.ndarray, variant: str = "") -> list[str]:
    """The question of each example from the asked shape's index into ``shapes.SHAPES``."""
    if variant == "no_text":
        return [CONSTANT_TEXT] * len(shape_ids)
    table = [f"is the {s} the colour you hear ?" for s in shapes.SHAPES]
    return [table[s] for s in shape_ids.tolist()]


def make_batch(split: str, indices: Sequence[int] | np.ndarray, *, image_size: int = 32,
               variant: str = "", seed: int = 0) -> dict:
    """Examples ``indices`` of ``split``: ``{"image": uint8 [B,H,W,3], "audio": float32
    [B, NUM_FRAMES, NUM_MELS], "question": list[str], "label": int32 [B], "clip": int [B]}``.

    ``label`` indexes ANSWERS (0 yes, 1 + the asked object's colour for no); ``clip`` is the
    row of ``clip_bank(split, seed)`` the audio came from (-1 for ``no_audio``).
    """
    _check(split, variant)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    layout = shapes.sample_layout(split, idx, seed=seed)
    rows = np.arange(len(idx))
    asked = layout.target  # which object's shape the question names
    yes = idx % 2 == 0  # alternating: every split and prefix is balanced
    heard = np.where(yes, asked, 1 - asked)  # which object's colour the clip names
    colour = layout.colours[rows, heard]
    clip = colour * CLIPS_PER_COLOUR + _clip_choice(split, idx, seed)
    if variant == "no_audio":
        feats = np.broadcast_to(_silent_features(), (len(idx), NUM_FRAMES, NUM_MELS)).copy()
        clip = np.full_like(clip, -1)
    else:
        feats = clip_bank(split, seed)[1][clip]
    if variant == "no_image":
        image = np.zeros((len(idx), image_size, image_size, 3), np.uint8)
    else:
        image = shapes.render(layout, image_size)
    return {
        "image": image,
        "audio": feats,
        "question": questions(layout.shapes[rows, asked], variant),
        "label": np.where(yes, 0, 1 + layout.colours[rows, asked]).astype(np.int32),
        "clip": clip,
    }


def tokenizer() -> WordTokenizer:
    """The fixed vocabulary of the questions (ids stable across runs)."""
    words = ["is", "the", "colour", "you", "hear", "?", *CONSTANT_TEXT.split(), *shapes.SHAPES]
    return WordTokenizer(words)


class ShapesAudioSource(shapes.ShapesSource):
    """A split of ``shapes_audio``, read a batch of indices at a time (``get_batch``)."""

    name, variants = "shapes_audio", VARIANTS
    make_batch = staticmethod(make_batch)

    @staticmethod
    def make_example(split: str, index: int, **kwargs: Any) -> dict:
        return {k: v[0] for k, v in make_batch(split, [index], **kwargs).items()}
