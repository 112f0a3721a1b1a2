"""Folder and TFDS records: loaded and validated once per process, then batched by step.

Records go one by one through the preprocessing ops of ``data.pp_train`` / ``data.pp_eval``
(``mmjax.pp``); each modality's leading ops that need only the record (decoding, resizing,
audio features) run once, during validation, and their output may be cached. A record without
some modality of the dataset (those of the train records) gets that modality's placeholder
(``mmjax.modalities``), which the ops turn into an input of the usual shape, and its batch says
so in ``batch["present"][modality]`` (False), on every split that has such a record. Each row's
augmentation is drawn from ``(seed, step, row)``, so the iterator state is the step (or grain's
per-worker positions with ``data.num_workers > 0``) and a resumed run sees identical batches.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from mmjax import modalities
from mmjax.data import folder, mixture, order, shards
from mmjax.data.tokenize import WordPieceTokenizer
from mmjax.pp import audio as audio_pp
from mmjax.pp import ops

log = logging.getLogger(__name__)
_get = order.config_get

SPLITS = ("train", "val", "test")
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_PP_TRAIN = "decode|random_crop|flip|normalize|tokenize"  # Inception-style crop
DEFAULT_PP_EVAL = "decode|resize|normalize|tokenize"

_SPLIT_CACHE: dict[tuple, Any] = {}  # _SplitData or mixture.MixtureData
_TOKENIZER_CACHE: dict[tuple, Any] = {}
_LABEL_CACHE: dict[tuple, list] = {}


def _data_key(data_config: Any) -> tuple:
    """The config keys that determine which records a split holds."""
    name = data_config.name
    mix = mixture.sources(data_config)
    if mix:
        return ("mixture", tuple(mix), bool(_get(data_config, "skip_bad", False)),
                *(_get(data_config, k, None) for k in folder.SAFETY_KEYS))
    if name == "folder":
        path = _get(data_config, "path", "")
        if not path:
            raise ValueError("data.path is empty: set --config.data.path=DIR for a folder dataset")
        return (name, str(Path(path).absolute()), bool(_get(data_config, "skip_bad", False)),
                *(_get(data_config, k, None) for k in folder.SAFETY_KEYS))
    from mmjax.data import tfds_source

    return (name, *tfds_source.key(data_config))


class _SplitData:
    """Records of one split with int labels and, optionally, each modality's cacheable
    preprocessing (``ops.cacheable_prefix``) run once per record and kept.

    ``file`` reads that JSONL file instead (``FolderSource.from_file``: no labels), with the
    same preprocessing and cache as a split.
    """

    def __init__(self, data_config: Any, split: str, pp: str, *, file: str | Path = "",
                 skip_bad: bool = False):
        self.split = split
        self.pp = pp
        key = ("file", str(file), skip_bad) if file else _data_key(data_config)
        self.ctx = context(data_config, None)  # no tokenizer: the cached ops never need it
        parsed = ops.parse(pp, self.ctx)
        self.prefix = {m: ops.cacheable_prefix(parsed, m) for m in modalities.names()}
        self.prefix_ops = {m: [parsed[i] for i in idx] for m, idx in self.prefix.items()}
        limit = int(_get(data_config, "cache_mb", 2048)) * 2**20
        use_cache = bool(_get(data_config, "cache", True))
        self.cache: dict[str, dict[int, Any]] = {m: {} for m in modalities.names()}
        self._cached_bytes = 0
        self.modalities: tuple[str, ...] = ()
        self.partial = False  # some record lacks one of self.modalities

        def on_loaded(m: str, i: int, value: Any) -> None:
            if not use_cache or not self.prefix_ops[m] or self._cached_bytes > limit:
                return
            out = ops.apply(self.prefix_ops[m], {m: value}, None)[m]
            self.cache[m][i] = out
            self._cached_bytes += sum(np.asarray(x).nbytes for x in jax.tree.leaves(out))

        t = time.perf_counter()
        self.source: Any
        self._lines: list[int] | None
        self._ahead: dict[int, dict[str, Any]] = {}  # shard records read for the next batch
        self._whole: set[int] | None = None  # shard records whose media are all cached
        if key[0] == "folder" and shards.is_shard_set(key[1]):
            # Validated when written: only what the cache holds is decoded now, the first
            # records up to data.cache_mb as for a folder; the rest is read when used.
            self.source = shards.ShardSource(key[1], split)
            self.skipped = 0
            self._lines = self.source.lines
            self._file = self.source.file
            if use_cache:
                self._fill_cache(on_loaded, limit)
        elif key[0] in ("folder", "file"):
            self.source = folder.FolderSource(
                key[1], split, skip_bad=key[2], ctx=self.ctx, on_loaded=on_loaded
            ) if key[0] == "folder" else folder.FolderSource.from_file(
                key[1], skip_bad=key[2], ctx=self.ctx, on_loaded=on_loaded)
            self.skipped = self.source.skipped
            self._lines = self.source.lines
            self._file = self.source.file
            for m, measures in self.source.measures.items():
                modalities.get(m).report(measures, self.ctx, split or key[1])
        else:
            from mmjax.data import tfds_source

            self.source = tfds_source.TfdsSource(data_config, split)
            self.skipped = 0
            self._lines = None
            self._file = self.source.name
        cached = {m: len(c) for m, c in self.cache.items() if c}
        log.info("data %s: %d records (%d skipped; cached: %s) in %.1f s",
                 f"{key[0]}/{split}" if split else key[1], len(self.source), self.skipped,
                 cached or "none", time.perf_counter() - t)
        self.labels: np.ndarray | None = None

    def _fill_cache(self, on_loaded: Any, limit: int) -> None:
        """Decodes records in order into the cache until it holds ``limit`` bytes: the
        records, and the values, a folder's validation pass caches."""
        cached = [m for m in modalities.names()
                  if self.prefix_ops[m] and modalities.get(m).load is not None]
        for i in range(len(self.source)):
            if self._cached_bytes > limit or not cached:
                return
            rec = self.source[i]
            for m in cached:
                load = modalities.get(m).load
                if m in rec and load is not None:
                    on_loaded(m, i, load(rec[m], self.ctx))

    def set_labels(self, vocab: list, skip_bad: bool) -> None:
        """Maps raw labels to class indices; an unknown label is bad data like any other."""
        index = folder.label_index(vocab)
        if self._lines is None:  # TFDS labels are class indices already, read with each record
            self.labels = np.zeros(0, np.int32)
            return
        labels, keep = [], []
        for i, rec in enumerate(self.source.records):
            cls = index.get(str(rec["label"]))
            if cls is None:
                message = folder.printable(
                    f"{self._file}:{self._lines[i]}: label {folder.shown(rec['label'])} does "
                    "not occur in train")
                if not skip_bad:
                    raise folder.BadDataError(message)
                log.warning("skipping bad record %s", message)
                self.skipped += 1
                continue
            labels.append(cls)
            keep.append(i)
        if len(keep) != len(self.source.records):
            self.source.records = [self.source.records[i] for i in keep]
            if isinstance(self.source, shards.ShardSource):
                self.source.positions = [self.source.positions[i] for i in keep]
            self.source.lines = [self.source.lines[i] for i in keep]
            self.source.indices = [self.source.indices[i] for i in keep]
            self.cache = {m: {new: c[old] for new, old in enumerate(keep) if old in c}
                          for m, c in self.cache.items()}
            self._whole = None
        self.labels = np.asarray(labels, np.int32)

    def set_modalities(self, names: tuple[str, ...], where: str) -> None:
        """The modalities batches carry (the train records'); checks the ops can make them."""
        parsed = {op.name for op in ops.parse(self.pp, self.ctx)}
        for m in names:
            modality = modalities.get(m)
            needed = modality.required_ops
            if needed and not parsed & set(needed):
                raise ValueError(f"the records have {m} but {where} has no "
                                 f"{' or '.join(repr(n) for n in needed)} op (e.g. "
                                 f"...|{modality.default_pp})")
            modality.placeholder(self.ctx)  # what the modality needs from the config is there
        self.modalities = names
        if hasattr(self.source, "records"):
            self.partial = any(m not in r for r in self.source.records for m in names)
        else:
            self.partial = bool(set(names) - set(self.source.modalities()))

    def __len__(self) -> int:
        return len(self.source)

    def example(self, i: int) -> dict[str, Any]:
        """Record ``i`` after each modality's cacheable ops, with its int label; a modality the
        record lacks gets its placeholder (and ``present`` False when some record lacks one)."""
        ex = self._record(i)
        present = {m: m in ex for m in self.modalities}
        for m in self.modalities:
            if m not in ex:
                ex[m] = modalities.get(m).placeholder(self.ctx)
            cached = self.cache[m].get(i)
            if cached is not None:
                ex[m] = cached
            else:
                ex = ops.apply(self.prefix_ops[m], ex, None)
        if self.partial:
            ex["present"] = present
        if self._lines is not None and self.labels is not None:
            ex["label"] = self.labels[i]
        return ex

    def _cached(self, i: int) -> bool:
        """Whether every media input of shard record ``i`` is cached."""
        if self._whole is None:  # the cache is complete once filled: ask it once per record
            media = [m for m in modalities.names() if modalities.get(m).load]
            self._whole = {j for j, entry in enumerate(self.source.records)
                           if all(j in self.cache[m] for m in media if m in entry)}
        return i in self._whole

    def read_ahead(self, indices: list[int]) -> None:
        """Reads the shard records of ``indices`` that are not cached in one call (ArrayRecord
        reads many records at once several times faster than one by one)."""
        if isinstance(self.source, shards.ShardSource):
            need = sorted({i for i in indices if not self._cached(i)})
            self._ahead = dict(zip(need, self.source.many(need), strict=True))

    def _record(self, i: int) -> dict[str, Any]:
        """Record ``i``; from a shard set, without reading its media when all are cached."""
        if isinstance(self.source, shards.ShardSource):
            if self._cached(i):
                return dict(self.source.records[i])
            ahead = self._ahead.pop(i, None)
            if ahead is not None:
                return ahead
        return self.source[i]

    def rest(self, all_ops: list[ops.Op]) -> list[ops.Op]:
        """The ops of ``all_ops`` (this split's chain, parsed with a tokenizer) that
        :meth:`example` has not run."""
        done = {i for idx in self.prefix.values() for i in idx}
        return [op for i, op in enumerate(all_ops) if i not in done]


def context(data_config: Any, tokenizer: Any) -> ops.Context:
    """What the ops take from the data config (and the tokenizer)."""
    return ops.Context(
        image_size=int(_get(data_config, "image_size", 32)),
        max_len=int(_get(data_config, "max_len", 16)),
        tokenizer=tokenizer,
        audio=audio_pp.front_end(data_config),
        data=data_config,
    )


def _pp(data_config: Any, split: str) -> str:
    if split == "train":
        return _get(data_config, "pp_train", DEFAULT_PP_TRAIN)
    return _get(data_config, "pp_eval", DEFAULT_PP_EVAL)


def split_data(
    data_config: Any, split: str, workdir: str = "", *, labelled: bool = True
) -> Any:
    """Split ``split`` (a ``_SplitData``, or a ``MixtureData`` for ``data.mixture``), loaded
    and validated once per process; ``labelled``: with class indices."""
    if split not in SPLITS:
        raise ValueError(f"unknown data split {split!r}; expected one of {SPLITS}")
    pp = _pp(data_config, split)
    key = (*_data_key(data_config), split, pp, _get(data_config, "image_size", 32),
           bool(_get(data_config, "cache", True)), audio_pp.config_key(data_config))
    data = _SPLIT_CACHE.get(key)
    if data is None:
        if key[0] == "mixture":
            data = _SPLIT_CACHE[key] = mixture.MixtureData.load(data_config, split, pp,
                                                                _SplitData)
            train_modalities = data.union_modalities()
        else:
            data = _SPLIT_CACHE[key] = _SplitData(data_config, split, pp)
            train_modalities = data.source.modalities()
        data.set_modalities(train_modalities if split == "train"
                            else data_modalities(data_config), f"data.pp_{_pp_name(split)}")
    if labelled and data.labels is None:
        data.set_labels(labels(data_config, workdir), bool(_get(data_config, "skip_bad", False)))
    return data


def _pp_name(split: str) -> str:
    return "train" if split == "train" else "eval"


def data_modalities(data_config: Any) -> tuple[str, ...]:
    """The dataset's modalities: those that occur in its train records (every split's batches
    carry exactly these)."""
    return split_data(data_config, "train", labelled=False).modalities


def _train_raw_labels(data_config: Any) -> list:
    data = split_data(data_config, "train", labelled=False)
    if isinstance(data, mixture.MixtureData):
        named = [(n, [r["label"] for r in p.source.records])
                 for n, p in zip(data.names, data.parts, strict=True)]
        mixture.check_label_types(named)
        return [x for _, labels in named for x in labels]
    return [r["label"] for r in data.source.records]


def labels(data_config: Any, workdir: str) -> list:
    """The label vocabulary (from train, saved in / read from ``workdir``); cached per dataset."""
    saved = Path(workdir) / folder.LABELS_FILE if workdir else None
    key = _data_key(data_config)
    if data_config.name == "folder" and saved is not None and saved.exists():
        # The run's own classes, as saved; train is not read (it may have changed since).
        _LABEL_CACHE[key] = folder.label_vocab([], workdir)
        return _LABEL_CACHE[key]
    cached = _LABEL_CACHE.get(key)
    if cached is not None and not workdir:
        return cached
    if data_config.name == "tfds":
        from mmjax.data import tfds_source

        vocab = tfds_source.label_names(data_config)
    else:
        raw = cached if cached is not None else _train_raw_labels(data_config)
        vocab = folder.label_vocab(raw, workdir)
    _LABEL_CACHE[key] = vocab
    return vocab


def train_texts(data_config: Any) -> list[str]:
    """The ``text`` of every train record that has one."""
    data = split_data(data_config, "train", labelled=False)
    texts = []
    for part in getattr(data, "parts", [data]):
        rows = getattr(part.source, "records", None)  # folders and shards: no media read
        if rows is None:
            rows = map(part.source.__getitem__, range(len(part)))
        texts += [r["text"] for r in rows if "text" in r]
    return texts


def records_tokenizer(data_config: Any, workdir: str) -> Any:
    spec = _get(data_config, "tokenizer", "")
    if spec:
        key = ("hf", spec)
        tok = _TOKENIZER_CACHE.get(key)
        if tok is None:
            from mmjax.data.tokenize import load_hf_tokenizer

            tok = _TOKENIZER_CACHE[key] = load_hf_tokenizer(spec)
        return tok
    key = (*_data_key(data_config), int(_get(data_config, "vocab_size", 2000)))
    saved = Path(workdir) / TOKENIZER_FILE if workdir else None
    if saved is not None and saved.exists():
        tok = _TOKENIZER_CACHE[key] = WordPieceTokenizer.load(saved)
        return tok
    tok = _TOKENIZER_CACHE.get(key)
    if tok is None:
        texts = train_texts(data_config) or [""]  # no text: a tokenizer of the special tokens
        tok = WordPieceTokenizer.train(texts, key[-1])
        _TOKENIZER_CACHE[key] = tok
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tok.save(saved)
    return tok


def _stack_leaf(values: list[np.ndarray]) -> np.ndarray:
    """Rows stacked into one batch array: uint8 and bool as they are (uint8 pixels travel as
    such and the model scales them), other integers as int32, floats as float32."""
    x = np.stack(values)
    if x.dtype in (np.uint8, np.bool_):
        return x
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.int32, copy=False)
    return x.astype(np.float32, copy=False)


def collate(examples: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """One batch of the ``names`` entries (each an array or a dict of arrays per example), with
    ``present`` and ``label`` when the examples carry them."""
    batch: dict[str, Any] = {
        m: jax.tree.map(lambda *rows: _stack_leaf(list(rows)), *[e[m] for e in examples])
        for m in names}
    if "present" in examples[0]:
        batch["present"] = {m: np.asarray([e["present"][m] for e in examples], bool)
                            for m in names}
    if "label" in examples[0]:
        batch["label"] = np.asarray([e["label"] for e in examples], np.int32)
    return batch


def _records_batch(
    step: int,
    *,
    order: order.GlobalOrder,
    lo: int,
    hi: int,
    data: _SplitData,
    rest: list[ops.Op],
    seed: int,
) -> dict[str, Any]:
    """Step's rows ``[lo, hi)``; each row's augmentation rng is a function of (seed, step, row)."""
    step = int(step)
    indices = order(step)[lo:hi].tolist()
    data.read_ahead(indices)
    out = []
    for row, i in enumerate(indices, start=lo):
        rng = np.random.default_rng([seed, step, row])
        out.append(ops.apply(rest, data.example(i), rng))
    return collate(out, data.modalities)


def train_iterator(
    data_config: Any, *, batch_size: int, seed: int, lo: int, hi: int, tokenizer: Any
) -> grain.DatasetIterator:
    data = split_data(data_config, "train")
    tok = tokenizer if tokenizer is not None else records_tokenizer(data_config, "")
    all_ops = ops.parse(_pp(data_config, "train"), context(data_config, tok))
    make = functools.partial(
        _records_batch,
        order=train_order(data_config, batch_size, seed),
        lo=lo,
        hi=hi,
        data=data,
        rest=data.rest(all_ops),
        seed=int(seed) % 2**63,
    )
    ds = grain.MapDataset.range(sys.maxsize).map(make)
    workers = int(_get(data_config, "num_workers", 0))
    it_ds = ds.to_iter_dataset(order.READ_OPTIONS)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; libraries may not
            flags.FLAGS.mark_as_parsed()
        # Decoding and augmentation in worker processes; grain keeps the element order, and the
        # iterator state (one position per worker) stays JSON and exact across a restart.
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it_ds)


def train_order(data_config: Any, batch_size: int, seed: int) -> Any:
    """Step → the train split's indices of its global batch (``order.GlobalOrder``, or a
    ``mixture.MixtureOrder`` over the sources of ``data.mixture``)."""
    data = split_data(data_config, "train", labelled=False)
    if isinstance(data, mixture.MixtureData):
        return mixture.MixtureOrder(data, mixture.sources(data_config), batch_size, int(seed))
    return order.GlobalOrder(len(data), batch_size, int(seed))


def eval_batches(
    data_config: Any, split: str, batch_size: int, tokenizer: Any
) -> Iterator[dict]:
    data = split_data(data_config, split)
    tok = tokenizer if tokenizer is not None else records_tokenizer(data_config, "")
    return _padded(data, data_config, split, batch_size, tok)


def _padded(data: _SplitData, data_config: Any, split: str, batch_size: int,
            tokenizer: Any) -> Iterator[dict]:
    rest = data.rest(ops.parse(_pp(data_config, split), context(data_config, tokenizer)))
    return order.padded_batches(len(data), batch_size, lambda idx: collate([
        ops.apply(rest, data.example(int(i)), np.random.default_rng([0, int(i)])) for i in idx],
        data.modalities))


def file_batches(
    data_config: Any, file: str | Path, *, batch_size: int, tokenizer: Any, skip_bad: bool,
    modalities: tuple[str, ...] | None = None,
) -> tuple[folder.FolderSource, Iterator[dict]]:
    """A JSONL file of new inputs (labels optional, ignored), validated up front like a split
    and preprocessed exactly as val/test are (``data.pp_eval``); the source's ``indices``,
    ``lines`` and ``skipped`` say which of its lines the padded batches hold."""
    data = _SplitData(data_config, "", _pp(data_config, "val"), file=Path(file).absolute(),
                      skip_bad=skip_bad)
    data.set_modalities(tuple(modalities or data.source.modalities()), "data.pp_eval")
    return data.source, _padded(data, data_config, "val", batch_size, tokenizer)
