"""A word-level tokenizer for small closed vocabularies such as the embedded shapes task.

The shapes questions use about twenty words, so a subword tokenizer would add a dependency and
a model download for nothing. Ids follow BERT's layout (``[CLS] words [SEP]`` then padding) so
the same text encoder serves both this and Hugging Face checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmjax.data import shapes

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CACHE_LIMIT = 1 << 16


class WordTokenizer:
    """Lower-cases, splits on whitespace and maps each word to an id.

    Encoded rows are cached per (text, max_len): the shapes task has a few hundred distinct
    strings, so after warm-up encoding a batch costs only dictionary look-ups.
    """

    PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4

    def __init__(self, words: Sequence[str]):
        vocab = list(_SPECIALS)
        seen = set(vocab)
        for word in words:
            w = word.lower()
            if not w or w.split() != [w]:
                raise ValueError(f"vocabulary word {word!r} is empty or contains whitespace")
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        self.vocab: tuple[str, ...] = tuple(vocab)
        self._ids = {w: i for i, w in enumerate(self.vocab)}
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _encode_one(self, text: str, max_len: int) -> np.ndarray:
        key = (text, max_len)
        row = self._cache.get(key)
        if row is None:
            words = [self._ids.get(w, self.UNK) for w in text.lower().split()]
            # Truncate the words, not the [SEP]: encoders that pool or split on [SEP] rely on it.
            words = words[: max_len - 2]
            row = np.full(max_len, self.PAD, np.int32)
            row[0] = self.CLS
            row[1 : 1 + len(words)] = words
            row[1 + len(words)] = self.SEP
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[key] = row
        return row

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 ``[N, max_len]``; mask is 1 on real tokens (incl. specials)."""
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        if not len(texts):
            return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
        ids = np.stack([self._encode_one(t, max_len) for t in texts])
        return ids, (ids != self.PAD).astype(np.int32)

    def decode(self, ids: np.ndarray | Sequence[int] | Sequence[Sequence[int]]) -> list[str]:
        """One string per row of ``ids`` (a single row gives a list of one).

        [PAD], [CLS] and [SEP] are dropped so ``decode(encode(t)[0])`` gives back ``t``'s words
        lower-cased; unknown and mask tokens are kept as ``[UNK]``/``[MASK]``.
        """
        arr = np.atleast_2d(np.asarray(ids))
        if arr.ndim != 2:
            raise ValueError(f"decode expects ids of shape [L] or [N, L], got {arr.shape}")
        skip = {self.PAD, self.CLS, self.SEP}
        out = []
        for row in arr.tolist():
            words = []
            for i in row:
                if i in skip:
                    continue
                words.append(self.vocab[i] if 0 <= i < len(self.vocab) else _SPECIALS[self.UNK])
            out.append(" ".join(words))
        return out


def shapes_tokenizer() -> WordTokenizer:
    """The fixed vocabulary of the shapes dataset: every question and caption word.

    Built from the dataset's own word lists so the two cannot drift apart; the order is fixed,
    so ids are stable across runs and checkpoints.
    """
    words = ["a", "and", "what", "colour", "shape", "is", "the", "one", "?"]
    words += shapes.CONSTANT_TEXT.split()
    words += list(shapes.COLOURS) + list(shapes.SHAPES)
    return WordTokenizer(words)
