"""Text: ``"text": "a question"`` in a record, ``{"ids", "mask"}`` int32 ``[B, L]`` in a batch.

Corruptions act on the text as the run's tokenizer reads it back (``typo``: character edits,
``word_drop``, ``word_shuffle``; no synonyms). Attacks move the tower's input token embeddings
(``TextEncoder``'s ``token_embeds``), only at real tokens, in embedding units; explanations
score each token through the same embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmjax.modalities.base import Attack, Corruption, CorruptionError, Modality, register
from mmjax.pp import ops

log = logging.getLogger(__name__)

TABLES: dict[str, tuple[float, ...]] = {
    "typo": (0.1, 0.2, 0.3, 0.4, 0.5),  # probability that a word gets one character edit
    "word_drop": (0.1, 0.2, 0.3, 0.4, 0.5),  # probability that a word is dropped
    "word_shuffle": (0.2, 0.4, 0.6, 0.8, 1.0),  # fraction of positions permuted among themselves
}
UNKNOWN = "[UNK]"  # how an unknown token is written in decoded text (BERT's spelling)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


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
    if name not in TABLES:
        raise CorruptionError(f"{name} is not a text corruption; text: {sorted(TABLES)}")
    if severity not in range(1, 6):
        raise CorruptionError(f"corruption {name}: severity {severity!r} is not one of 1..5")
    p = TABLES[name][severity - 1]
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


def _corruption(name: str) -> Corruption:
    def apply(entry: Mapping[str, Any], severity: int, rng: np.random.Generator,
              tokenizer: Any) -> dict[str, Any]:
        if tokenizer is None:
            raise CorruptionError(f"text corruption {name} needs the run's tokenizer")
        ids = np.asarray(entry["ids"])
        texts = decode_keeping_unknown(tokenizer, ids)
        same = (tokenizer.encode(texts, ids.shape[1])[0] == ids).all(axis=1)
        if not same.all():
            log.warning("%s: %d of %d text rows change in the tokenizer's decode/encode round "
                        "trip alone", name, int((~same).sum()), len(same))
        texts = [corrupt_text(t, name, severity, rng) for t in texts]
        new_ids, new_mask = tokenizer.encode(texts, ids.shape[1])
        return {**entry, "ids": new_ids.astype(ids.dtype),
                "mask": new_mask.astype(np.asarray(entry["mask"]).dtype)}

    return Corruption(TABLES[name], apply)


def _attack_start(entry: Mapping[str, Any], params: Mapping[str, Any]
                  ) -> tuple[Any, Any, float, float]:
    table = params["token_embedding"]["embedding"]
    x0 = jnp.take(table, entry["ids"], axis=0).astype(jnp.float32)
    return x0, entry["mask"].astype(jnp.float32)[..., None], -jnp.inf, jnp.inf


def _synthetic(batch_size: int, ctx: ops.Context, tower: Mapping[str, Any],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Between L/2 and L valid tokens per row, ids drawn below the tower's vocabulary."""
    length = ctx.max_len
    lengths = rng.integers(max(length // 2, 1), length + 1, size=batch_size)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, int(tower.get("vocab_size") or 2), size=(batch_size, length),
                       dtype=np.int32)
    return {"ids": ids * mask, "mask": mask}


_MEANINGS = {"ids": "token ids (see Text)",
             "mask": "1 on real tokens ([CLS], pieces, [SEP]), 0 on padding",
             "segment_ids": "segment ids (0 for a single text)"}


def _steps(ctx: ops.Context, spec: str, tokenizer_file: str) -> list[str]:
    tok = ctx.tokenizer
    if tokenizer_file == "vocab.txt":
        how = ("lower-case, split on whitespace, and map each word to its line number in "
               "`vocab.txt` (unknown words: [UNK] = 1)")
    elif tokenizer_file:
        how = (f"word-piece with the Hugging Face `tokenizers` file `{tokenizer_file}` "
               "(`Tokenizer.from_file`), encoded without special tokens")
    else:
        how = f"the Hugging Face tokenizer of `{(ctx.data or {}).get('tokenizer', '')}`"
    return [
        how,
        f"lay out each row as `[CLS] pieces [SEP]` then [PAD] up to {ctx.max_len} ids "
        f"([CLS] = {tok.CLS}, [SEP] = {tok.SEP}, [PAD] = {tok.PAD}); pieces beyond "
        f"{ctx.max_len - 2} are dropped, never the [SEP]",
        "mask: 1 where the id is not [PAD], else 0",
    ]


def _from_tfds(value: Any, feature: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


TEXT = register(Modality(
    name="text",
    towers=("text",),
    placeholder=lambda ctx: "",
    required_ops=("tokenize",),
    default_pp="tokenize",
    synthetic=_synthetic,
    explained_as="tokens",
    corruptions={name: _corruption(name) for name in TABLES},
    attack=Attack("token embeddings", _attack_start,
                  lambda entry, x: {**entry, "token_embeds": x}),
    describe=lambda leaf, dtype: _MEANINGS.get(leaf, f"{leaf} ({dtype})"),
    steps=_steps,
    from_tfds=_from_tfds,
))
