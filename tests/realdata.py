r"""Small real-data folder datasets from the images that ship with scikit-learn.

Three kinds, each written as ``DIR/{train,val,test}.jsonl`` plus PNG files (the format of
``mmjax/data/folder.py``), so ``configs/folder.py`` can be checked on real pixels offline:

- ``digits_qa``: UCI handwritten digits (``sklearn.datasets.load_digits``: 1,797 scans of
  8x8 pixels, 17 grey levels), upscaled, with yes/no questions about the digit ("is this digit
  greater than five?", "is this digit even?", "is this a seven?", "is the digit smaller than
  3?"). Answering needs the digit's identity from the image and the question's number and
  relation from the text.
- ``digits_colour``: two different digits on a 4x4 grid of cells, each drawn in its own colour in
  its own cell; "what colour is the 3?" (answer a colour name) or "which digit is red?" (answer
  a digit word). The answer depends on where the named digit is, so fused attention has to find
  it among the patches.
- ``photos_match``: random crops of the two sample photographs (``china.jpg``, a temple;
  ``flower.jpg``) with a caption that describes the crop or the other photo; answer "yes" if it
  matches. Train crops come from the left 60 % of each photo, val and test from the right 40 %.

Every kind draws train, val and test from disjoint source images (or photo regions), is a pure
function of its arguments (same seed, same bytes), and returns the number of records per split.

As a script::

    python -m tests.realdata digits_qa DIR [--image_size 32] [--seed 0] [--num_val 300] ...
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 230),
}
_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}

Record = tuple[np.ndarray, str, str]  # (uint8 image, text, label)


# --- sources ----------------------------------------------------------------------------------


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [1797, 8, 8] ink intensities scaled to 0..255, int [1797] digit labels)."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    ink = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return ink, d.target.astype(np.int64)


def split_indices(n: int, num_val: int, num_test: int, seed: int) -> dict[str, np.ndarray]:
    """Disjoint index sets: ``num_val`` and ``num_test`` drawn at random, train the rest."""
    if num_val + num_test >= n:
        raise ValueError(f"num_val + num_test = {num_val + num_test} leaves no train of {n}")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return {
        "val": np.sort(perm[:num_val]),
        "test": np.sort(perm[num_val : num_val + num_test]),
        "train": np.sort(perm[num_val + num_test :]),
    }


def upscale(ink: np.ndarray, size: int, resample: str = "nearest") -> np.ndarray:
    """An 8x8 ink image → ``[size, size]`` uint8 (dark digit on white paper, as scanned)."""
    im = Image.fromarray(255 - ink).resize((size, size), _RESAMPLE[resample])
    return np.asarray(im)


def _write(root: Path, split: str, records: Sequence[Record]) -> int:
    """Writes the split's JSONL and PNGs; records sharing one image array share its file."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    with open(root / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for image, text, label in records:
            name = names.get(id(image))
            if name is None:
                name = names[id(image)] = f"img/{split}_{len(names):05d}.png"
                Image.fromarray(image).save(root / name)
            f.write(json.dumps({"image": name, "text": text, "label": label}) + "\n")
    return len(records)


# --- digits_qa ----------------------------------------------------------------------------------


def _number(k: int, rng: np.random.Generator) -> str:
    """A number as a word or a numeral, at random: real questions use both."""
    return WORDS[k] if rng.uniform() < 0.5 else str(k)


def _greater(d: int, yes: bool, rng: np.random.Generator) -> tuple[str, bool]:
    ks = [k for k in range(9) if (d > k) == yes] or list(range(9))
    k = int(rng.choice(ks))
    return f"is this digit greater than {_number(k, rng)}?", d > k


def _smaller(d: int, yes: bool, rng: np.random.Generator) -> tuple[str, bool]:
    ks = [k for k in range(1, 10) if (d < k) == yes] or list(range(1, 10))
    k = int(rng.choice(ks))
    return f"is the digit smaller than {_number(k, rng)}?", d < k


def _parity(d: int, yes: bool, rng: np.random.Generator) -> tuple[str, bool]:
    word = "even" if (d % 2 == 0) == yes else "odd"
    return f"is this digit {word}?", (d % 2 == 0) == (word == "even")


def _identity(d: int, yes: bool, rng: np.random.Generator) -> tuple[str, bool]:
    k = d if yes else int(rng.choice([j for j in range(10) if j != d]))
    return f"is this a {_number(k, rng)}?", k == d


def _natural_yes(template: str, d: int) -> float:
    """P(answer yes | digit d) when the asked number is uniform over the template's range."""
    if template == "greater":
        return d / 9  # k uniform in 0..8, yes iff k < d
    if template == "smaller":
        return (9 - d) / 9  # k uniform in 1..9, yes iff k > d
    if template == "identity":
        return 1 / 10
    return 1 / 2  # parity: "even" or "odd" with equal odds


TEMPLATES: dict[str, Callable[[int, bool, np.random.Generator], tuple[str, bool]]] = {
    "greater": _greater,
    "smaller": _smaller,
    "parity": _parity,
    "identity": _identity,
}


def digits_qa(
    root: str | Path,
    *,
    image_size: int = 32,
    seed: int = 0,
    num_val: int = 300,
    num_test: int = 300,
    train_questions: int = 2,
    eval_questions: int = 1,
    templates: Sequence[str] = tuple(TEMPLATES),
    resample: str = "nearest",
    balanced: bool = True,
) -> dict[str, int]:
    """Yes/no questions about UCI digits; ``*_questions`` per image (distinct templates).

    ``balanced``: each question is drawn to be true with probability 1/2 where its template
    allows (no digit is greater than nine), so answers are balanced up to a few percent *for
    every digit*: neither the image alone nor the question alone tells the answer. Otherwise
    the number a question names is uniform over its range, whatever the digit, so answers
    follow from the digits' frequencies ("is this a 7?" is mostly "no") and the image alone,
    or the question alone, already predicts some of them.
    """
    unknown = set(templates) - set(TEMPLATES)
    if unknown or not templates:
        raise ValueError(f"unknown templates {sorted(unknown)}; known: {list(TEMPLATES)}")
    root = Path(root)
    ink, target = load_digits()
    idx = split_indices(len(ink), num_val, num_test, seed)
    counts = {}
    for split in SPLITS:
        rng = np.random.default_rng([seed, SPLITS.index(split), 2])
        per_image = train_questions if split == "train" else eval_questions
        records = []
        for i in idx[split].tolist():
            d = int(target[i])
            image = np.repeat(upscale(ink[i], image_size, resample)[..., None], 3, -1)
            chosen = rng.choice(len(templates), min(per_image, len(templates)), replace=False)
            for t in chosen.tolist():
                yes = bool(rng.uniform() < 0.5)
                if not balanced:  # a draw that makes the asked number uniform
                    yes = bool(rng.uniform() < _natural_yes(templates[t], d))
                text, answer = TEMPLATES[templates[t]](d, yes, rng)
                records.append((image, text, "yes" if answer else "no"))
        counts[split] = _write(root, split, records)
    return counts


# --- digits_colour ------------------------------------------------------------------------------


def digits_colour(
    root: str | Path,
    *,
    image_size: int = 32,
    seed: int = 0,
    num_train: int = 3000,
    num_val: int = 400,
    num_test: int = 400,
    grid: int = 4,
    questions: str = "both",
    style: str = "ink",
    placement: str = "grid",
) -> dict[str, int]:
    """Two different digits in two cells of a ``grid`` x ``grid`` board, each in its own colour.

    ``questions="both"``: half the questions ask "what colour is the <digit>?" (a colour name),
    half "which digit is <colour>?" (a digit word); ``"colour"``: only the first kind. Digit
    scans for val and test (300 each) are disjoint from train's; the board is white. ``style``:
    ``"ink"`` blends a digit's ink from white to its colour; ``"tint"`` fills its cell with a
    light tint of the colour and draws the digit in dark grey. With ``"colour"`` each split
    also gets ``<split>_cells.json``: per record the grid cell (row-major) of the named digit,
    for pointing games (explanations must point at it). ``placement="anywhere"`` draws each
    cell-sized digit at a random pixel offset instead (the two never overlap), so a digit
    straddles patches; its cell is then the one holding its centre.
    """
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of grid {grid}")
    if questions not in ("both", "colour"):
        raise ValueError(f"questions={questions!r}; expected 'both' or 'colour'")
    if style not in ("ink", "tint"):
        raise ValueError(f"style={style!r}; expected 'ink' or 'tint'")
    if placement not in ("grid", "anywhere"):
        raise ValueError(f"placement={placement!r}; expected 'grid' or 'anywhere'")
    root = Path(root)
    cell = image_size // grid
    ink, target = load_digits()
    idx = split_indices(len(ink), 300, 300, seed)
    names = list(COLOURS)
    counts = {}
    for split, n in zip(SPLITS, (num_train, num_val, num_test), strict=True):
        rng = np.random.default_rng([seed, SPLITS.index(split), 3])
        pool = idx[split]
        by_digit = {d: pool[target[pool] == d] for d in range(10)}
        records, named_cells = [], []
        for _ in range(n):
            digits = rng.choice(10, 2, replace=False)
            colours = rng.choice(len(names), 2, replace=False)
            cells = rng.choice(grid * grid, 2, replace=False)
            corners = [np.array(divmod(int(c), grid)) * cell for c in cells]  # (y, x) pixels
            while placement == "anywhere":
                corners = list(rng.integers(0, image_size - cell + 1, (2, 2)))
                if np.abs(corners[0] - corners[1]).max() >= cell:
                    cells = np.array([(y + cell // 2) // cell * grid + (x + cell // 2) // cell
                                      for y, x in corners])
                    break
            board = np.full((image_size, image_size, 3), 255.0)
            for d, c, (y, x) in zip(digits.tolist(), colours.tolist(), corners, strict=True):
                scan = ink[int(rng.choice(by_digit[d]))]
                alpha = np.asarray(
                    Image.fromarray(scan).resize((cell, cell), Image.BILINEAR), np.float32
                )[..., None] / 255.0
                tile = board[y : y + cell, x : x + cell]
                colour = np.asarray(COLOURS[names[c]], np.float32)
                if style == "ink":
                    tile[:] = (1 - alpha) * tile + alpha * colour
                else:
                    tile[:] = (1 - alpha) * (0.55 * tile + 0.45 * colour) + alpha * 40.0
            which = int(rng.integers(2))
            named_cells.append(int(cells[which]))
            if rng.uniform() < 0.5 or questions == "colour":
                text = f"what colour is the {_number(int(digits[which]), rng)}?"
                label = names[int(colours[which])]
            else:
                text = f"which digit is {names[int(colours[which])]}?"
                label = WORDS[int(digits[which])]
            records.append((np.round(board).astype(np.uint8), text, label))
        counts[split] = _write(root, split, records)
        if questions == "colour":
            (root / f"{split}_cells.json").write_text(json.dumps(named_cells))
    return counts


# --- photos_match -------------------------------------------------------------------------------

PHOTO_CAPTIONS = {
    "china": (
        "a photo of a temple", "an old chinese building", "a pagoda with trees",
        "a roof of a temple", "ancient architecture in china",
    ),
    "flower": (
        "a photo of a flower", "a close up of a blossom", "petals of a flower",
        "a pink flower", "a flower with a bee",
    ),
}


def load_photos() -> dict[str, np.ndarray]:
    """``{"china": uint8 [427, 640, 3], "flower": ...}``."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {Path(f).stem: im for f, im in zip(data.filenames, data.images, strict=True)}


def photos_match(
    root: str | Path,
    *,
    image_size: int = 32,
    seed: int = 0,
    num_train: int = 1000,
    num_val: int = 200,
    num_test: int = 200,
) -> dict[str, int]:
    """Crops of the two photos with a caption of the same or the other photo; "yes" if same."""
    root = Path(root)
    photos = load_photos()
    names = sorted(photos)
    counts = {}
    for split, n in zip(SPLITS, (num_train, num_val, num_test), strict=True):
        rng = np.random.default_rng([seed, SPLITS.index(split), 4])
        records = []
        for _ in range(n):
            name = names[int(rng.integers(len(names)))]
            photo = photos[name]
            h, w = photo.shape[:2]
            lo, hi = (0, int(0.6 * w)) if split == "train" else (int(0.6 * w), w)
            side = int(rng.integers(h // 4, min(h, hi - lo) + 1))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(lo, hi - side + 1))
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            image = np.asarray(crop.resize((image_size, image_size), Image.BILINEAR))
            match = bool(rng.uniform() < 0.5)
            about = name if match else names[1 - names.index(name)]
            text = str(rng.choice(PHOTO_CAPTIONS[about]))
            records.append((image, text, "yes" if match else "no"))
        counts[split] = _write(root, split, records)
    return counts


# --- a Hugging Face tokenizer ---------------------------------------------------------------------


def hf_tokenizer(
    data_dir: str | Path, out_dir: str | Path, *, padding_side: str = "right",
    vocab_size: int = 200,
) -> Path:
    """A BERT-style word-piece tokenizer trained on ``data_dir``'s train texts, saved with
    ``transformers`` (``save_pretrained``) in ``out_dir`` for ``--config.data.tokenizer``.

    ``[CLS] text [SEP]`` with ids 0-4 for [PAD] [UNK] [CLS] [SEP] [MASK], as BERT lays them out;
    ``padding_side`` is saved in the folder, so ``"left"`` makes a tokenizer that pads on the
    left unless its user sets it otherwise.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = [json.loads(line)["text"]
             for line in (Path(data_dir) / "train.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", padding_side=padding_side,
    )
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


KINDS: dict[str, Callable[..., dict[str, int]]] = {
    "digits_qa": digits_qa,
    "digits_colour": digits_colour,
    "photos_match": photos_match,
}


def majority_fraction(root: str | Path, split: str = "val") -> float:
    """The accuracy of always answering ``split``'s most common label (chance for a model)."""
    labels = [json.loads(line)["label"]
              for line in (Path(root) / f"{split}.jsonl").read_text().splitlines()]
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / len(labels))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=[*sorted(KINDS), "hf_tokenizer"])
    parser.add_argument("dir", help="the dataset folder (hf_tokenizer: the one to train on)")
    parser.add_argument("--out", help="hf_tokenizer: the tokenizer folder to write")
    parser.add_argument("--padding_side", default="right", help="hf_tokenizer: left or right")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, help="records (digits_colour, photos_match)")
    parser.add_argument("--num_val", type=int)
    parser.add_argument("--num_test", type=int)
    parser.add_argument("--train_questions", type=int, help="per image (digits_qa)")
    parser.add_argument("--eval_questions", type=int, help="per image (digits_qa)")
    parser.add_argument("--templates", help="comma-separated (digits_qa): " + ",".join(TEMPLATES))
    parser.add_argument("--resample", choices=sorted(_RESAMPLE), help="upscaling (digits_qa)")
    parser.add_argument("--questions", choices=("both", "colour"),
                        help="digits_colour: both question kinds, or colour questions only")
    parser.add_argument("--style", choices=("ink", "tint"),
                        help="digits_colour: coloured ink, or tinted cells with grey digits")
    parser.add_argument("--placement", choices=("grid", "anywhere"),
                        help="digits_colour: digits in grid cells, or at any pixel offset")
    parser.add_argument("--natural", dest="balanced", action="store_const", const=False,
                        help="digits_qa: uniform asked numbers, not answers balanced per digit")
    args = vars(parser.parse_args(argv))
    kind, root = args.pop("kind"), args.pop("dir")
    out, padding_side = args.pop("out"), args.pop("padding_side")
    if kind == "hf_tokenizer":
        if not out:
            parser.error("hf_tokenizer needs --out")
        print(hf_tokenizer(root, out, padding_side=padding_side))
        return
    if args["templates"]:
        args["templates"] = args["templates"].split(",")
    counts = KINDS[kind](root, **{k: v for k, v in args.items() if v is not None})
    print(json.dumps({"kind": kind, "dir": str(root), **counts,
                      "val_majority": round(majority_fraction(root), 4)}))


if __name__ == "__main__":
    main()
