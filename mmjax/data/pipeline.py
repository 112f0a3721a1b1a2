"""Grain pipelines that turn a data config into train and eval batches.

Batches are formed from *indices* first and the examples of a whole batch are drawn at once
(``ShapesSource.get_batch``): per-record reads, per-record shuffling and stacking cost several
times more than the vectorised path on the 2-core demo machine, where a train step takes ~75 ms.

Multi-process sharding slices the global batch: every process shuffles the same global index
stream and keeps rows ``[p * B/P, (p + 1) * B/P)``, so the global batch at a step is the same
examples whatever the process count, and restarting on a different topology changes nothing.

Folder and TFDS data (``data.name`` = ``"folder"`` | ``"tfds"``) share the same step-indexed
design, but go record by record through the preprocessing ops named in ``data.pp_train`` /
``data.pp_eval`` (``mmjax.data.ops``), with each row's augmentation drawn from
``(seed, step, row)``; so the iterator state stays ``{"next_index": step}`` (or grain's
per-worker positions with ``data.num_workers > 0``) and a resumed run sees identical batches.
Each split is loaded, validated and optionally cached once per process.
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
import numpy as np

from mmjax.data import folder, ops, shapes
from mmjax.data.tokenize import WordPieceTokenizer, WordTokenizer, shapes_tokenizer

log = logging.getLogger(__name__)

_TEXT_FIELDS = ("question", "caption")
_SPLITS = ("train", "val", "test")
_NAMES = ("shapes", "folder", "tfds")
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_PP_TRAIN = "decode|resize|flip|normalize|tokenize"
DEFAULT_PP_EVAL = "decode|resize|normalize|tokenize"


def _get(config: Any, key: str, default: Any) -> Any:
    """Reads an optional config key; works for ConfigDicts, dataclasses and namespaces."""
    try:
        return getattr(config, key)
    except (AttributeError, KeyError):
        return default


def _check_name(data_config: Any) -> str:
    name = data_config.name
    if name not in _NAMES:
        raise ValueError(f"unknown data.name {name!r}; the pipeline supports: {_NAMES}")
    return name


def build_tokenizer(data_config: Any, *, workdir: str | Path = "") -> Any:
    """The tokenizer that matches the dataset named in ``data_config.name``.

    Folder and TFDS data use ``data.tokenizer`` (a Hugging Face tokenizer folder) or, when it
    is empty, a word-piece tokenizer trained on the train texts. With ``workdir`` the trained
    tokenizer is saved there, and one already there is reused, so a resumed run keeps its ids.
    """
    if _check_name(data_config) == "shapes":
        return shapes_tokenizer()
    return _records_tokenizer(data_config, str(workdir or ""))


def dataset_info(
    data_config: Any, tokenizer: Any, *, workdir: str | Path = ""
) -> dict[str, int]:
    """Sizes a model takes from its data: the vocabulary and the number of answer classes.

    For folder and TFDS data this also loads and validates every split, so bad records stop
    the run before training; ``skipped_<split>`` counts records dropped with ``skip_bad``.
    """
    if _check_name(data_config) == "shapes":
        return {"vocab_size": tokenizer.vocab_size, "num_classes": len(shapes.ANSWERS)}
    workdir = str(workdir or "")
    vocab = _labels(data_config, workdir)
    info = {"vocab_size": tokenizer.vocab_size, "num_classes": len(vocab)}
    for split in _SPLITS:
        info[f"skipped_{split}"] = _split_data(data_config, split, workdir).skipped
    return info


def _source(data_config: Any, split: str) -> shapes.ShapesSource:
    if _check_name(data_config) != "shapes":
        raise ValueError("internal: _source serves the shapes data only")
    if split not in _SPLITS:
        raise ValueError(f"unknown data split {split!r}; expected one of {_SPLITS}")
    text = _get(data_config, "text", "question")
    if text not in _TEXT_FIELDS:
        raise ValueError(f"unknown data.text {text!r}; expected one of {_TEXT_FIELDS}")
    return shapes.ShapesSource(
        split,
        int(getattr(data_config, f"num_{split}")),
        image_size=int(_get(data_config, "image_size", 32)),
        variant=_get(data_config, "variant", ""),
        # The data itself is fixed by the dataset's seed, never by the run's seed, so that
        # accuracies of different runs are measured on the same val/test examples.
        seed=int(_get(data_config, "seed", 0)),
    )


def _to_batch(
    indices: np.ndarray,
    *,
    source: shapes.ShapesSource,
    tokenizer: WordTokenizer,
    text_field: str,
    max_len: int,
) -> dict[str, Any]:
    """Indices → model batch: images scaled to [-1, 1], the chosen text tokenized, int32 labels."""
    raw = source.get_batch(indices)
    ids, mask = tokenizer.encode(raw[text_field], max_len)
    image = raw["image"].astype(np.float32)
    image *= 1.0 / 127.5
    image -= 1.0
    return {
        "image": image,
        "text": {"ids": ids, "mask": mask},
        "label": raw["label"].astype(np.int32),
    }


class _GlobalOrder:
    """Step → the global batch's example indices: a fresh permutation of the split each epoch.

    Whole-batch numpy indexing instead of grain's per-record ``shuffle``: grain spends ~28 us of
    Python per record, which was most of a batch's cost. Batches run across epoch boundaries,
    so every example is seen once per epoch and no data is dropped.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed % 2**63
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._perms[epoch] = perm
        return perm

    def __call__(self, step: int) -> np.ndarray:
        pos = np.arange(step * self.batch_size, (step + 1) * self.batch_size, dtype=np.int64)
        epochs, within = np.divmod(pos, self.num_examples)
        out = np.empty_like(pos)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[within[sel]]
        return out


def _slice_and_batch(
    step: int, *, order: _GlobalOrder, lo: int, hi: int, **kwargs: Any
) -> dict[str, Any]:
    return _to_batch(order(int(step))[lo:hi], **kwargs)


# No worker threads: a batch takes a few ms on the caller's thread, while prefetch threads would
# compete with XLA for the two cores of the demo machine and make start-up eager.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def train_iterator(
    data_config: Any,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tokenizer: Any = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's share of each global batch.

    Examples are shuffled by ``seed`` and reshuffled every epoch (``data.seed``, if present,
    picks the dataset itself and is independent of the shuffle). The iterator's
    ``get_state()`` is a small JSON-serialisable dict; ``set_state`` on a fresh iterator built
    with the same arguments resumes exactly where the saved one was.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index {process_index} for process_count {process_count}")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of process_count {process_count}"
        )
    per_process = batch_size // process_count
    if _check_name(data_config) != "shapes":
        return _records_train_iterator(
            data_config, batch_size=batch_size, seed=seed, lo=process_index * per_process,
            hi=(process_index + 1) * per_process, tokenizer=tokenizer,
        )
    source = _source(data_config, "train")
    make = functools.partial(
        _slice_and_batch,
        order=_GlobalOrder(len(source), batch_size, int(seed)),
        lo=process_index * per_process,
        hi=(process_index + 1) * per_process,
        source=source,
        tokenizer=build_tokenizer(data_config),
        text_field=_get(data_config, "text", "question"),
        max_len=int(data_config.max_len),
    )
    # Element i of this dataset is step i's batch, so the iterator state is just the step.
    ds = grain.MapDataset.range(sys.maxsize).map(make)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))


def eval_batches(
    data_config: Any, split: str, *, batch_size: int, tokenizer: Any = None
) -> Iterator[dict]:
    """Every example of ``split`` once, in order, with ``"valid"`` marking real rows.

    The last batch is filled up to ``batch_size`` (so eval compiles one shape) with repeats of
    the split's first examples, marked ``valid == 0``: real inputs rather than zeros, so that no
    model sees an all-padding text row that could turn masked attention into NaNs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if _check_name(data_config) != "shapes":
        return _records_eval(data_config, split, batch_size, tokenizer)
    source = _source(data_config, split)
    kwargs = {
        "source": source,
        "tokenizer": build_tokenizer(data_config),
        "text_field": _get(data_config, "text", "question"),
        "max_len": int(data_config.max_len),
    }
    return _eval_gen(source.num_examples, batch_size, kwargs)


def _eval_gen(n: int, batch_size: int, kwargs: dict[str, Any]) -> Iterator[dict]:
    # Separate from eval_batches so that a bad config fails at the call, not at the first next().
    for start in range(0, n, batch_size):
        real = np.arange(start, min(start + batch_size, n))
        pad = np.arange(batch_size - len(real)) % n
        batch = _to_batch(np.concatenate([real, pad]), **kwargs)
        valid = np.zeros(batch_size, np.float32)
        valid[: len(real)] = 1.0
        batch["valid"] = valid
        yield batch


# --- folder and TFDS records ----------------------------------------------------------------
#
# A split is loaded (and validated) once per process and kept: the trainer asks for eval batches
# at every evaluation, and the validation pass decodes every image.

_SPLIT_CACHE: dict[tuple, _SplitData] = {}
_TOKENIZER_CACHE: dict[tuple, Any] = {}
_LABEL_CACHE: dict[tuple, list] = {}


def _data_key(data_config: Any) -> tuple:
    """The config keys that determine which records a split holds."""
    name = data_config.name
    if name == "folder":
        path = _get(data_config, "path", "")
        if not path:
            raise ValueError("data.path is empty: set --config.data.path=DIR for a folder dataset")
        return (name, str(Path(path).absolute()), bool(_get(data_config, "skip_bad", False)))
    from mmjax.data import tfds_source

    return (name, *tfds_source.key(data_config))


class _SplitData:
    """Records of one split with int labels and, optionally, pixels cached after decoding."""

    def __init__(self, data_config: Any, split: str, pp: str):
        self.split = split
        key = _data_key(data_config)
        parsed = ops.parse(pp, _context(data_config, None))
        self.prefix_ops = parsed[: ops.cacheable_prefix(parsed)]
        self.prefix = len(self.prefix_ops)
        budget = int(_get(data_config, "cache_mb", 2048)) * 2**20
        use_cache = bool(_get(data_config, "cache", True)) and self.prefix > 0
        self.cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

        def on_image(i: int, pixels: np.ndarray) -> None:
            if not use_cache or self._cached_bytes > budget:
                return
            out = ops.apply(self.prefix_ops[1:], {"image": pixels}, None)["image"]
            self.cache[i] = out
            self._cached_bytes += out.nbytes

        t = time.perf_counter()
        if key[0] == "folder":
            self.source: Any = folder.FolderSource(
                key[1], split, skip_bad=key[2], on_image=on_image
            )
            self.skipped = self.source.skipped
            self._lines = self.source.lines
            self._file = self.source.file
        else:
            from mmjax.data import tfds_source

            self.source = tfds_source.TfdsSource(data_config, split)
            self.skipped = 0
            self._lines = None
            self._file = self.source.name
        log.info(
            "data %s/%s: %d records (%d skipped, %d cached) in %.1f s",
            key[0], split, len(self.source), self.skipped, len(self.cache),
            time.perf_counter() - t,
        )
        self.labels: np.ndarray | None = None

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
                message = (
                    f"{self._file}:{self._lines[i]}: label {rec['label']!r} does not occur in "
                    "train"
                )
                if not skip_bad:
                    raise folder.BadDataError(message)
                log.warning("skipping bad record %s", message)
                self.skipped += 1
                continue
            labels.append(cls)
            keep.append(i)
        if len(keep) != len(self.source.records):
            self.source.records = [self.source.records[i] for i in keep]
            self.source.lines = [self.source.lines[i] for i in keep]
            self.cache = {new: self.cache[old] for new, old in enumerate(keep) if old in self.cache}
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.source)

    def example(self, i: int) -> dict[str, Any]:
        """Record ``i`` after the cacheable prefix ops, with its int label."""
        ex = self.source[i]
        pixels = self.cache.get(i)
        if pixels is not None:
            ex["image"] = pixels
        else:
            ex = ops.apply(self.prefix_ops, ex, None)
        if self._lines is not None:
            ex["label"] = self.labels[i]
        return ex


def _context(data_config: Any, tokenizer: Any) -> ops.Context:
    return ops.Context(
        image_size=int(_get(data_config, "image_size", 32)),
        max_len=int(data_config.max_len),
        tokenizer=tokenizer,
    )


def _pp(data_config: Any, split: str) -> str:
    if split == "train":
        return _get(data_config, "pp_train", DEFAULT_PP_TRAIN)
    return _get(data_config, "pp_eval", DEFAULT_PP_EVAL)


def _split_data(
    data_config: Any, split: str, workdir: str = "", *, labelled: bool = True
) -> _SplitData:
    if split not in _SPLITS:
        raise ValueError(f"unknown data split {split!r}; expected one of {_SPLITS}")
    pp = _pp(data_config, split)
    key = (*_data_key(data_config), split, pp, _get(data_config, "image_size", 32),
           bool(_get(data_config, "cache", True)))
    data = _SPLIT_CACHE.get(key)
    if data is None:
        data = _SPLIT_CACHE[key] = _SplitData(data_config, split, pp)
    if labelled and data.labels is None:
        data.set_labels(_labels(data_config, workdir), bool(_get(data_config, "skip_bad", False)))
    return data


def label_names(data_config: Any, *, workdir: str | Path = "") -> list[str]:
    """Names of the answer classes, in label-id order (evaluators print and compare them)."""
    if _check_name(data_config) == "shapes":
        return list(shapes.ANSWERS)
    return [str(v) for v in _labels(data_config, str(workdir or ""))]


def _train_raw_labels(data_config: Any) -> list:
    data = _split_data(data_config, "train", labelled=False)
    return [r["label"] for r in data.source.records]


def _labels(data_config: Any, workdir: str) -> list:
    """The label vocabulary (from train, saved in / read from ``workdir``); cached per dataset."""
    key = _data_key(data_config)
    vocab = _LABEL_CACHE.get(key)
    if vocab is not None and not workdir:
        return vocab
    if data_config.name == "tfds":
        from mmjax.data import tfds_source

        vocab = tfds_source.label_names(data_config)
    else:
        raw = vocab if vocab is not None else _train_raw_labels(data_config)
        vocab = folder.label_vocab(raw, workdir)
    _LABEL_CACHE[key] = vocab
    return vocab


def _records_tokenizer(data_config: Any, workdir: str) -> Any:
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
        data = _split_data(data_config, "train", labelled=False)
        texts = [data.source[i]["text"] for i in range(len(data))]
        tok = WordPieceTokenizer.train(texts, key[-1])
        _TOKENIZER_CACHE[key] = tok
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tok.save(saved)
    return tok


def _stack(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": np.stack([e["image"] for e in examples]).astype(np.float32, copy=False),
        "text": {
            "ids": np.stack([e["text"]["ids"] for e in examples]).astype(np.int32),
            "mask": np.stack([e["text"]["mask"] for e in examples]).astype(np.int32),
        },
        "label": np.asarray([e["label"] for e in examples], np.int32),
    }


def _records_batch(
    step: int,
    *,
    order: _GlobalOrder,
    lo: int,
    hi: int,
    data: _SplitData,
    rest: list[ops.Op],
    seed: int,
) -> dict[str, Any]:
    """Step's rows ``[lo, hi)``; each row's augmentation rng is a function of (seed, step, row)."""
    step = int(step)
    indices = order(step)[lo:hi]
    out = []
    for row, i in enumerate(indices.tolist(), start=lo):
        rng = np.random.default_rng([seed, step, row])
        out.append(ops.apply(rest, data.example(i), rng))
    return _stack(out)


def _records_train_iterator(
    data_config: Any, *, batch_size: int, seed: int, lo: int, hi: int, tokenizer: Any
) -> grain.DatasetIterator:
    data = _split_data(data_config, "train")
    tok = tokenizer if tokenizer is not None else build_tokenizer(data_config)
    all_ops = ops.parse(_pp(data_config, "train"), _context(data_config, tok))
    make = functools.partial(
        _records_batch,
        order=_GlobalOrder(len(data), batch_size, int(seed)),
        lo=lo,
        hi=hi,
        data=data,
        rest=all_ops[data.prefix :],
        seed=int(seed) % 2**63,
    )
    ds = grain.MapDataset.range(sys.maxsize).map(make)
    workers = int(_get(data_config, "num_workers", 0))
    it_ds = ds.to_iter_dataset(_READ_OPTIONS)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; libraries may not
            flags.FLAGS.mark_as_parsed()
        # Decoding and augmentation in worker processes; grain keeps the element order, and the
        # iterator state (one position per worker) stays JSON and exact across a restart.
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it_ds)


def _records_eval(
    data_config: Any, split: str, batch_size: int, tokenizer: Any
) -> Iterator[dict]:
    data = _split_data(data_config, split)
    tok = tokenizer if tokenizer is not None else build_tokenizer(data_config)
    all_ops = ops.parse(_pp(data_config, split), _context(data_config, tok))
    rest = all_ops[data.prefix :]
    n = len(data)
    return _records_eval_gen(data, rest, n, batch_size)


def _records_eval_gen(
    data: _SplitData, rest: list[ops.Op], n: int, batch_size: int
) -> Iterator[dict]:
    for start in range(0, n, batch_size):
        real = np.arange(start, min(start + batch_size, n))
        pad = np.arange(batch_size - len(real)) % n
        rows = [
            ops.apply(rest, data.example(int(i)), np.random.default_rng([0, int(i)]))
            for i in np.concatenate([real, pad])
        ]
        batch = _stack(rows)
        valid = np.zeros(batch_size, np.float32)
        valid[: len(real)] = 1.0
        batch["valid"] = valid
        yield batch
