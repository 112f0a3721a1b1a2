"""Tokenizers: one interface (``Tokenizer``) and its word-level, word-piece and HF implementations.

The shapes questions use about twenty words, so ``WordTokenizer`` maps whole words and needs no
model download; folder and TFDS datasets use a word-piece tokenizer trained on their train texts,
or a Hugging Face tokenizer folder (``data.tokenizer``). The first two write BERT's layout
(``[CLS] words [SEP]`` then padding) so the same text encoder serves them and Hugging Face
checkpoints; all three pad on the right, as the text towers expect.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmjax import files
from mmjax.data import shapes
from mmjax.errors import ExplainedError

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_CACHE_LIMIT = 1 << 16

Ids = np.ndarray | Sequence[int] | Sequence[Sequence[int]]


class Tokenizer(Protocol):
    """What the data pipeline, the evaluators and ``data.inspect`` call on a tokenizer.

    ``encode`` pads and truncates on the right: last-token pooling and captioning read a mask as
    1s then 0s. ``decode`` drops special and padding tokens, so a decoded row compares with a
    caption or a question's words. The special-token ids are those of the
    vocabulary; ``None`` where a Hugging Face tokenizer has no such token.
    """

    PAD: int
    UNK: int | None
    CLS: int | None
    SEP: int | None
    MASK: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 ``[N, max_len]``, right-padded; mask is 1 on real tokens."""
        ...

    def decode(self, ids: Ids) -> list[str]:
        """One string per row of ``ids`` (``[L]`` or ``[N, L]``), special tokens dropped."""
        ...


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

    def decode(self, ids: Ids) -> list[str]:
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


class WordPieceTokenizer:
    """A word-piece tokenizer trained on a dataset's own train texts (``tokenizers`` library).

    Folder and TFDS datasets have open vocabularies, so words are split into sub-words learnt
    offline from the train split; the trained tokenizer is saved in the workdir so a resumed run
    (and evaluation) reuses exactly the same ids. Rows follow the BERT layout of
    ``WordTokenizer``: ``[CLS] pieces [SEP]`` then ``[PAD]``.
    """

    PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        # mmjax reads masks as right padding (see Tokenizer); some tokenizers pad on the left.
        self._tok.padding_side = "right"
        for i, name in enumerate(_SPECIALS):
            if tokenizer.token_to_id(name) != i:
                raise ValueError(f"word-piece tokenizer must map {name} to id {i}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2000) -> WordPieceTokenizer:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

        def fresh(model: Any) -> Any:
            tok = Tokenizer(model)
            tok.normalizer = normalizers.BertNormalizer(lowercase=True)
            tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tok.decoder = decoders.WordPiece()
            return tok

        texts = list(texts)
        tok = fresh(models.WordPiece(unk_token="[UNK]"))
        # The trainer numbers the initial symbols in hash order and breaks frequency ties by
        # those numbers, so the same texts could give different vocabularies (and processes of
        # one run different ids). Given as leading tokens, in sorted order, the symbols get
        # fixed numbers and the merges a fixed order.
        first, inner = set(), set()
        for text in texts:
            for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
                first.add(word[0])
                inner.update(word[1:])
        symbols = sorted(first | inner) + sorted("##" + c for c in inner)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=[*_SPECIALS, *symbols], show_progress=False
        )
        tok.train_from_iterator(texts, trainer)
        # Renumber in a fixed order (specials, then by string); only the real specials are
        # special tokens of the result.
        rest = sorted(set(tok.get_vocab()) - set(_SPECIALS))
        ordered = {w: i for i, w in enumerate([*_SPECIALS, *rest])}
        out = fresh(models.WordPiece(ordered, unk_token="[UNK]", continuing_subword_prefix="##"))
        out.add_special_tokens(list(_SPECIALS))
        return cls(out)

    @classmethod
    def load(cls, path: str | Path) -> WordPieceTokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Writes atomically (``mmjax.files``): a reader never sees a half-written tokenizer,
        and processes saving into one workdir at once never share a temporary file."""
        files.write_atomic(path, self._tok.to_str(pretty=True))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 ``[N, max_len]``; pieces beyond ``max_len - 2`` are dropped."""
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        ids = np.full((len(texts), max_len), self.PAD, np.int32)
        for r, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            pieces = enc.ids[: max_len - 2]
            ids[r, 0] = self.CLS
            ids[r, 1 : 1 + len(pieces)] = pieces
            ids[r, 1 + len(pieces)] = self.SEP
        return ids, (ids != self.PAD).astype(np.int32)

    def decode(self, ids: Ids) -> list[str]:
        arr = np.atleast_2d(np.asarray(ids))
        return [self._tok.decode([int(i) for i in row]) for row in arr]


class HFTokenizer:
    """A Hugging Face tokenizer (transformers, offline) behind the ``Tokenizer`` interface.

    Rows are padded and truncated on the right whatever the saved tokenizer says: a folder saved
    with ``padding_side="left"`` would otherwise give masks that last-token pooling and the
    caption targets misread, and left
    truncation would drop the start of the text and [CLS]. The adapter owns the wrapped
    tokenizer and sets both sides on it.
    """

    def __init__(self, tokenizer: Any):
        if tokenizer.pad_token_id is None:
            raise ValueError(f"Hugging Face tokenizer {tokenizer.name_or_path!r} has no padding "
                             "token; batches of texts need one")
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        self._tok = tokenizer
        self.PAD: int = tokenizer.pad_token_id
        self.UNK: int | None = tokenizer.unk_token_id
        self.CLS: int | None = tokenizer.cls_token_id
        self.SEP: int | None = tokenizer.sep_token_id
        self.MASK: int | None = tokenizer.mask_token_id

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """The tokenizer saved in a local folder (``save_pretrained``); nothing is downloaded.

        transformers is imported here: it takes seconds to import.
        """
        from transformers import AutoTokenizer

        try:  # data, not code: a folder's own tokenizer class (auto_map) is never imported
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                trust_remote_code=False)
        except ValueError as e:
            if "trust_remote_code" not in str(e):
                raise
            raise TokenizerError(
                f"data.tokenizer={str(path)!r} names its own Python tokenizer class (auto_map in "
                "tokenizer_config.json); mmjax loads tokenizer folders as data only "
                "(trust_remote_code=False): use a tokenizer saved with a transformers class"
            ) from None
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)  # with added tokens, unlike the tokenizer's own vocab_size

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 ``[N, max_len]``: padded to and truncated at ``max_len``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single string")
        if not len(texts):
            return np.zeros((0, max_len), np.int32), np.zeros((0, max_len), np.int32)
        out = self._tok(list(texts), max_length=max_len, padding="max_length", truncation=True,
                        return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    def decode(self, ids: Ids) -> list[str]:
        arr = np.atleast_2d(np.asarray(ids))
        return self._tok.batch_decode(arr.tolist(), skip_special_tokens=True)


def load_hf_tokenizer(path: str | Path) -> HFTokenizer:
    """The Hugging Face tokenizer saved in a local folder, behind the ``Tokenizer`` interface."""
    return HFTokenizer.load(path)


class TokenizerError(ValueError, ExplainedError):
    """A ``data.tokenizer`` folder that cannot serve the dataset."""


class TokenizerCoverageError(TokenizerError):
    """The tokenizer maps too many of the train words to its unknown token."""


DEFAULT_MAX_UNK_RATE = 0.05


def unknown_rate(tokenizer: Tokenizer, texts: Iterable[str]) -> tuple[float, list[str]]:
    """The fraction of the whitespace-separated words of ``texts`` that ``tokenizer`` turns
    into its unknown token (any piece of the word), and those words, most frequent first."""
    unk = getattr(tokenizer, "UNK", None)
    counts = collections.Counter(w for t in texts for w in t.split())
    if unk is None or not counts:
        return 0.0, []
    words = list(counts)
    ids, _ = tokenizer.encode(words, 32)
    unknown = [w for w, row in zip(words, ids, strict=True) if (row == unk).any()]
    unknown.sort(key=lambda w: -counts[w])
    return sum(counts[w] for w in unknown) / sum(counts.values()), unknown


def check_coverage(tokenizer: Tokenizer, texts: Iterable[str], *, name: str,
                   limit: float = DEFAULT_MAX_UNK_RATE) -> float:
    """Stops a run whose tokenizer does not know the dataset's words (a tokenizer of another
    language, or one saved without its vocabulary), which would otherwise train on the unknown
    token alone; returns the rate."""
    rate, words = unknown_rate(tokenizer, texts)
    if rate > limit:
        raise TokenizerCoverageError(
            f"data.tokenizer={name!r} maps {rate:.1%} of the train words to its unknown token "
            f"(e.g. {', '.join(map(repr, words[:5]))}); the limit is data.max_unk_rate={limit}. "
            "It does not know this dataset's words: use a tokenizer of its language and "
            "vocabulary, or data.tokenizer='' to train one on the train texts")
    return rate
