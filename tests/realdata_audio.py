r"""A real-data three-modality folder dataset: a handwritten digit, a clip of beeps, a question.

``digits_beeps`` writes ``DIR/{train,val,test}.jsonl`` plus PNG and audio files in the format of
``mmjax/data/folder.py``:

- image: a UCI handwritten digit d (``sklearn.datasets.load_digits``, 8x8 scans upscaled; train,
  val and test use disjoint scans);
- audio: a synthesised clip of n beeps (n in ``0..max_beeps``), each a tone of random length,
  with random gaps, a random pitch per clip (the pitch says nothing about n), random loudness and
  a little noise, written with ``soundfile`` at varied sample rates (8 to 44.1 kHz), mono or
  stereo, as WAV or FLAC;
- text: "is the digit plus the number of beeps greater than K?" or "... smaller than K?", K
  written as a word or a numeral.

The answer needs all three: the digit from the image, the count from the audio and the
relation and K from the text. K is drawn around the sum's median (``ks``) and the relation at
random, independently of the digit and the clip: "greater" and "smaller" flip the answer, so
the digit alone or the count alone says nothing, and K alone little (answers are "yes" a bit
under half the time: a sum equal to K is "no" for both). The digit or the count with the
question reaches about 0.7, the digit with the count about 0.5, all three 1.0.
``baselines`` measures how well the best rule that sees only the digit, only the count or only
the question (their exact latent values, not pixels or samples) does on val: near chance.
With ``questions="mixed"`` a third of the questions ask about the digit alone and a third
about the beeps alone, so the best rule without the audio (or without the image) answers
about 0.8: the set for training with missing modalities.

As a script::

    python -m tests.realdata_audio DIR [--seed 0] [--num_val 300] [--num_test 300] ...
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from tests.realdata import SPLITS, WORDS, load_digits, split_indices, upscale

RATES = (8000, 11025, 16000, 22050, 44100)
RELATIONS = ("greater", "smaller")


def beeps(n: int, rate: int, rng: np.random.Generator, *, channels: int = 1,
          max_seconds: float = 1.25) -> np.ndarray:
    """A float32 clip ``[time, channels]`` of ``n`` tone beeps (random lengths, gaps, pitch,
    loudness, start; white noise ~30 dB below), at most ``max_seconds`` long."""
    pitch = rng.uniform(400.0, 1600.0)
    amp = rng.uniform(0.2, 0.7)
    t0 = rng.uniform(0.0, 0.08)
    on = rng.uniform(0.04, 0.06, n)
    off = rng.uniform(0.05, 0.07, n)
    scale = min(1.0, (max_seconds - t0 - 0.02) / max(float((on + off).sum()), 1e-3))
    on, off = on * scale, off * scale
    total = int(max_seconds * rate * rng.uniform(0.9, 1.0))
    x = np.zeros(total)
    start = t0
    ramp = int(0.005 * rate)
    for k in range(n):
        a, m = int(start * rate), int(on[k] * rate)
        t = np.arange(m) / rate
        tone = np.sin(2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi))
        env = np.minimum(1.0, np.minimum(np.arange(m), np.arange(m)[::-1]) / max(ramp, 1))
        x[a:a + m] += tone * env
        start += on[k] + off[k]
    x = amp * x + rng.normal(0.0, amp * 0.03, total)
    gains = rng.uniform(0.7, 1.0, channels)
    return (x[:, None] * gains[None, :]).astype(np.float32)


# What a question asks about: its subject (filled with the relation and K), the value it
# compares, and the K values drawn (around each value's median).
ASKS = {
    "sum": ("is the digit plus the number of beeps {} than {}?", lambda d, n: d + n, (8, 9, 10)),
    "digit": ("is the digit {} than {}?", lambda d, n: d, (4, 5)),
    "beeps": ("is the number of beeps {} than {}?", lambda d, n: n, (4, 5)),
}


def _question(d: int, n: int, ask: str, rng: np.random.Generator,
              ks: Sequence[int] | None) -> tuple[str, bool, dict]:
    template, value, default_ks = ASKS[ask]
    relation = RELATIONS[int(rng.integers(2))]
    k = int(rng.choice(default_ks if ks is None else ks))
    word = WORDS[k] if k < 10 and rng.uniform() < 0.5 else str(k)
    s = value(d, n)
    answer = s > k if relation == "greater" else s < k
    return template.format(relation, word), answer, {"ask": ask, "relation": relation, "k": k}


def digits_beeps(root: str | Path, *, image_size: int = 32, seed: int = 0, num_val: int = 300,
                 num_test: int = 300, num_train: int | None = None, train_questions: int = 2,
                 max_beeps: int = 9, ks: Sequence[int] | None = None,
                 questions: str = "sum") -> dict[str, int]:
    """Writes the dataset (a pure function of its arguments); returns records per split.

    ``questions="sum"``: every question needs all three modalities; ``"mixed"``: a third ask
    about the digit alone ("is the digit greater than 4?"), a third about the beeps alone and a
    third about the sum, so a model missing one modality can still answer some of them.
    ``ks``: the K values (default: around the compared value's median).

    ``train_questions`` records (each with its own clip and question) per train scan (all the
    scans not in val or test, or the first ``num_train``), one per val/test scan.
    ``latent.jsonl`` keeps each record's digit, count, relation and K for :func:`baselines`
    (the model never reads it).
    """
    if questions not in ("sum", "mixed"):
        raise ValueError(f"questions={questions!r}; expected 'sum' or 'mixed'")
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    ink, target = load_digits()
    idx = split_indices(len(ink), num_val, num_test, seed)
    idx["train"] = idx["train"][:num_train]
    counts = {}
    latent = []
    for split in SPLITS:
        rng = np.random.default_rng([seed, SPLITS.index(split), 5])
        per = train_questions if split == "train" else 1
        n_rec = 0
        with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in idx[split].tolist():
                d = int(target[i])
                image = f"img/{split}_{i:04d}.png"
                Image.fromarray(upscale(ink[i], image_size)).convert("RGB").save(root / image)
                for _ in range(per):
                    n = int(rng.integers(0, max_beeps + 1))
                    rate = int(RATES[int(rng.integers(len(RATES)))])
                    channels = 1 + int(rng.uniform() < 0.3)
                    ext = "flac" if rng.uniform() < 0.2 else "wav"
                    clip = f"audio/{split}_{n_rec:05d}.{ext}"
                    soundfile.write(root / clip, beeps(n, rate, rng, channels=channels), rate,
                                    subtype="PCM_16")
                    ask = "sum" if questions == "sum" else list(ASKS)[int(rng.integers(3))]
                    text, answer, q = _question(d, n, ask, rng, ks)
                    label = "yes" if answer else "no"
                    f.write(json.dumps({"image": image, "audio": clip, "text": text,
                                        "label": label}) + "\n")
                    latent.append(json.dumps({"split": split, "digit": d, "beeps": n,
                                              "label": label, **q}))
                    n_rec += 1
        counts[split] = n_rec
    (root / "latent.jsonl").write_text("\n".join(latent) + "\n")
    return counts


def baselines(root: str | Path, split: str = "val") -> dict[str, float]:
    """Accuracy on ``split`` of the best rule that sees one modality's exact latent value (the
    digit, the beep count or the question's relation and K), fitted as the majority answer per
    value on train, and of the same with all three (the task's ceiling: 1.0)."""
    rows = [json.loads(x) for x in (Path(root) / "latent.jsonl").read_text().splitlines()]
    views = {"image_only": lambda r: r["digit"], "audio_only": lambda r: r["beeps"],
             "text_only": lambda r: (r.get("ask"), r["relation"], r["k"]),
             "image_text": lambda r: (r.get("ask"), r["digit"], r["relation"], r["k"]),
             "audio_text": lambda r: (r.get("ask"), r["beeps"], r["relation"], r["k"]),
             "image_audio": lambda r: (r["digit"], r["beeps"]),
             "all_three": lambda r: (r.get("ask"), r["digit"], r["beeps"], r["relation"],
                                     r["k"])}
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == split]
    overall = Counter(r["label"] for r in train).most_common(1)[0][0]
    out = {"majority": sum(r["label"] == overall for r in evals) / len(evals)}
    for name, view in views.items():
        by = defaultdict(Counter)
        for r in train:
            by[view(r)][r["label"]] += 1
        guess = {v: c.most_common(1)[0][0] for v, c in by.items()}
        out[name] = sum(guess.get(view(r), overall) == r["label"] for r in evals) / len(evals)
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_val", type=int, default=300)
    parser.add_argument("--num_test", type=int, default=300)
    parser.add_argument("--num_train", type=int, default=None, help="train scans (default all)")
    parser.add_argument("--train_questions", type=int, default=2)
    parser.add_argument("--max_beeps", type=int, default=9)
    parser.add_argument("--questions", choices=("sum", "mixed"), default="sum")
    args = vars(parser.parse_args(argv))
    root = args.pop("dir")
    counts = digits_beeps(root, **args)
    print(json.dumps({"dir": str(root), **counts, "val_baselines": baselines(root)}))


if __name__ == "__main__":
    main()
