"""Folder and TFDS records: loaded and validated once per process, then batched by step.

Records go one by one through the preprocessing ops of ``data.pp_train`` / ``data.pp_eval``
(``mmjax.data.ops``); the ops up to the first random one run once and may be cached, and so are
the audio ops that need only the record (decoding, features). A record without some modality of
the dataset (those of the train records) gets a placeholder of the usual shape and its batch
says so in ``batch["present"][modality]`` (False), on every split that has such a record. Each row's
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
import numpy as np

from mmjax.data import audio_ops, folder, ops, order, series_ops
from mmjax.data.tokenize import WordPieceTokenizer

log = logging.getLogger(__name__)
_get = order.config_get

SPLITS = ("train", "val", "test")
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_PP_TRAIN = "decode|random_crop|flip|normalize|tokenize"  # Inception-style crop
DEFAULT_PP_EVAL = "decode|resize|normalize|tokenize"

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
    """Records of one split with int labels and, optionally, pixels cached after decoding.

    ``file`` reads that JSONL file instead (``FolderSource.from_file``: no labels), with the
    same preprocessing and cache as a split.
    """

    def __init__(self, data_config: Any, split: str, pp: str, *, file: str | Path = "",
                 skip_bad: bool = False):
        self.split = split
        self.pp = pp
        self._image_size = int(_get(data_config, "image_size", 32))
        key = ("file", str(file), skip_bad) if file else _data_key(data_config)
        parsed = ops.parse(pp, _context(data_config, None))
        self.front_end = audio_ops.front_end(data_config)
        audio_prefix = audio_ops.cacheable(parsed)
        self.prefix_ops = parsed[: ops.cacheable_prefix(parsed)]
        self.prefix = len(self.prefix_ops)
        budget = int(_get(data_config, "cache_mb", 2048)) * 2**20
        use_cache = bool(_get(data_config, "cache", True)) and self.prefix > 0
        self.cache: dict[int, np.ndarray] = {}
        self.audio_cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0
        self.modalities: tuple[str, ...] = ()
        self.partial = False  # some record lacks one of self.modalities

        def on_image(i: int, pixels: np.ndarray) -> None:
            if not use_cache or self._cached_bytes > budget:
                return
            out = ops.apply(self.prefix_ops[1:], {"image": pixels}, None)["image"]
            self.cache[i] = out
            self._cached_bytes += out.nbytes

        held = audio_ops.samples_held(self.front_end)
        longest = [0, 0]  # samples of the longest clip, clips longer than the features hold

        def on_audio(i: int, waveform: np.ndarray) -> None:
            longest[0] = max(longest[0], len(waveform))
            longest[1] += len(waveform) > held
            if not bool(_get(data_config, "cache", True)) or not audio_prefix \
                    or self._cached_bytes > budget:
                return
            out = ops.apply(audio_prefix, {"audio": waveform}, None)["audio"]
            self.audio_cache[i] = out
            self._cached_bytes += out.nbytes

        t = time.perf_counter()
        if key[0] in ("folder", "file"):
            media = {"on_image": on_image, "on_audio": on_audio,
                     "audio_rate": self.front_end.sampling_rate if self.front_end else 0}
            self.source: Any = folder.FolderSource(
                key[1], split, skip_bad=key[2], **media
            ) if key[0] == "folder" else folder.FolderSource.from_file(
                key[1], skip_bad=key[2], **media)
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
            "data %s: %d records (%d skipped, %d images and %d clips cached) in %.1f s",
            f"{key[0]}/{split}" if split else key[1], len(self.source), self.skipped,
            len(self.cache), len(self.audio_cache),
            time.perf_counter() - t,
        )
        if longest[1]:
            rate = self.front_end.sampling_rate
            log.warning(
                "data %s: %d clips are longer than the %.2f s the audio features hold (longest "
                "%.2f s); their ends are cut: raise --config.data.audio.max_frames (100 per s)",
                split or key[1], longest[1], held / rate, longest[0] / rate)
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
            self.source.indices = [self.source.indices[i] for i in keep]
            self.cache = {new: self.cache[old] for new, old in enumerate(keep) if old in self.cache}
            self.audio_cache = {new: self.audio_cache[old] for new, old in enumerate(keep)
                                if old in self.audio_cache}
        self.labels = np.asarray(labels, np.int32)

    def set_modalities(self, modalities: tuple[str, ...], where: str) -> None:
        """The modalities batches carry (the train records'); checks the ops can make them."""
        names = {op.name for op in ops.parse(self.pp, _context(None, None, self.front_end))}
        if "audio" in modalities:
            if self.front_end is None:
                raise ValueError("the records have audio but the data config has no data.audio "
                                 "(the audio front end)")
            if "audio_features" not in names:
                raise ValueError(f"the records have audio but {where} has no 'audio_features' "
                                 "op (e.g. ...|decode_audio|audio_features)")
        if "series" in modalities and "series" not in names:
            raise ValueError(f"the records have series but {where} has no 'series' op "
                             "(e.g. ...|series(64, 3): length and channels)")
        self.modalities = modalities
        if hasattr(self.source, "records"):
            self.partial = any(m not in r for r in self.source.records for m in modalities)
        else:
            self.partial = bool(set(modalities) - set(self.source.modalities()))

    def _placeholders(self, ex: dict[str, Any]) -> dict[str, bool]:
        """Fills absent modalities in place (inputs the ops turn into the usual shapes);
        returns which of the batch's modalities the record has."""
        present = {m: m in ex for m in self.modalities}
        if "image" not in ex:
            size = self._image_size
            ex["image"] = np.zeros((size, size, 3), np.uint8)
        if "text" not in ex:
            ex["text"] = ""
        if "audio" not in ex and "audio" in self.modalities:
            ex["audio"] = audio_ops.placeholder(self.front_end)
        if "series" not in ex and "series" in self.modalities:
            ex["series"] = series_ops.placeholder()
        return present

    def __len__(self) -> int:
        return len(self.source)

    def example(self, i: int) -> dict[str, Any]:
        """Record ``i`` after the cacheable prefix ops, with its int label."""
        ex = self.source[i]
        present = self._placeholders(ex)
        pixels = self.cache.get(i)
        if pixels is not None:
            ex["image"] = pixels
        else:
            ex = ops.apply(self.prefix_ops, ex, None)
        clip = self.audio_cache.get(i)
        if clip is not None:
            ex["audio"] = clip
        if self.partial:
            ex["present"] = present
        if self._lines is not None and self.labels is not None:
            ex["label"] = self.labels[i]
        return ex


def _context(data_config: Any, tokenizer: Any, front_end: Any = None) -> ops.Context:
    if data_config is None:  # only the audio front end (op checks)
        return ops.Context(audio=front_end)
    return ops.Context(
        image_size=int(_get(data_config, "image_size", 32)),
        max_len=int(data_config.max_len),
        tokenizer=tokenizer,
        audio=audio_ops.front_end(data_config),
    )


def _pp(data_config: Any, split: str) -> str:
    if split == "train":
        return _get(data_config, "pp_train", DEFAULT_PP_TRAIN)
    return _get(data_config, "pp_eval", DEFAULT_PP_EVAL)


def split_data(
    data_config: Any, split: str, workdir: str = "", *, labelled: bool = True
) -> _SplitData:
    if split not in SPLITS:
        raise ValueError(f"unknown data split {split!r}; expected one of {SPLITS}")
    pp = _pp(data_config, split)
    key = (*_data_key(data_config), split, pp, _get(data_config, "image_size", 32),
           bool(_get(data_config, "cache", True)), audio_ops.config_key(data_config))
    data = _SPLIT_CACHE.get(key)
    if data is None:
        data = _SPLIT_CACHE[key] = _SplitData(data_config, split, pp)
        data.set_modalities(data.source.modalities() if split == "train"
                            else modalities(data_config), f"data.pp_{_pp_name(split)}")
    if labelled and data.labels is None:
        data.set_labels(labels(data_config, workdir), bool(_get(data_config, "skip_bad", False)))
    return data


def _pp_name(split: str) -> str:
    return "train" if split == "train" else "eval"


def modalities(data_config: Any) -> tuple[str, ...]:
    """The dataset's modalities: those that occur in its train records (every split's batches
    carry exactly these)."""
    return split_data(data_config, "train", labelled=False).modalities


def _train_raw_labels(data_config: Any) -> list:
    data = split_data(data_config, "train", labelled=False)
    return [r["label"] for r in data.source.records]


def labels(data_config: Any, workdir: str) -> list:
    """The label vocabulary (from train, saved in / read from ``workdir``); cached per dataset."""
    saved = Path(workdir) / folder.LABELS_FILE if workdir else None
    key = _data_key(data_config)
    if data_config.name == "folder" and saved is not None and saved.exists():
        # The run's own classes, as saved; train is not read (it may have changed since).
        vocab = _LABEL_CACHE[key] = folder.label_vocab([], workdir)
        return vocab
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
        data = split_data(data_config, "train", labelled=False)
        texts = [r["text"] for r in map(data.source.__getitem__, range(len(data))) if "text" in r]
        texts = texts or [""]  # no text in the records: a tokenizer of the special tokens
        tok = WordPieceTokenizer.train(texts, key[-1])
        _TOKENIZER_CACHE[key] = tok
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tok.save(saved)
    return tok


def _stack(examples: list[dict[str, Any]], modalities: tuple[str, ...] = ("image", "text"),
           uint8_images: bool = False) -> dict[str, Any]:
    """One batch of the ``modalities`` entries; ``uint8_images``: uint8 pixels stay uint8 (the
    step normalises them), else float32."""
    batch: dict[str, Any] = {}
    if "image" in modalities:
        images = np.stack([e["image"] for e in examples])
        batch["image"] = (images if uint8_images and images.dtype == np.uint8
                          else images.astype(np.float32, copy=False))
    if "audio" in modalities:
        batch["audio"] = np.stack([e["audio"] for e in examples]).astype(np.float32, copy=False)
    if "text" in modalities:
        batch["text"] = {
            "ids": np.stack([e["text"]["ids"] for e in examples]).astype(np.int32),
            "mask": np.stack([e["text"]["mask"] for e in examples]).astype(np.int32),
        }
    if "series" in modalities:  # the series tower's keyword arguments
        batch["series"] = {
            "values": np.stack([e["series"]["values"] for e in examples]).astype(np.float32),
            "mask": np.stack([e["series"]["mask"] for e in examples]).astype(np.int32),
        }
    if "present" in examples[0]:
        batch["present"] = {m: np.asarray([e["present"][m] for e in examples], bool)
                            for m in modalities}
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
    uint8_images: bool = False,
) -> dict[str, Any]:
    """Step's rows ``[lo, hi)``; each row's augmentation rng is a function of (seed, step, row)."""
    step = int(step)
    indices = order(step)[lo:hi]
    out = []
    for row, i in enumerate(indices.tolist(), start=lo):
        rng = np.random.default_rng([seed, step, row])
        out.append(ops.apply(rest, data.example(i), rng))
    return _stack(out, data.modalities, uint8_images)


def train_iterator(
    data_config: Any, *, batch_size: int, seed: int, lo: int, hi: int, tokenizer: Any
) -> grain.DatasetIterator:
    data = split_data(data_config, "train")
    tok = tokenizer if tokenizer is not None else records_tokenizer(data_config, "")
    all_ops = ops.parse(_pp(data_config, "train"), _context(data_config, tok))
    make = functools.partial(
        _records_batch,
        order=order.GlobalOrder(len(data), batch_size, int(seed)),
        lo=lo,
        hi=hi,
        data=data,
        rest=all_ops[data.prefix :],
        seed=int(seed) % 2**63,
        uint8_images=ops.device_normalized(all_ops),
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


def eval_batches(
    data_config: Any, split: str, batch_size: int, tokenizer: Any
) -> Iterator[dict]:
    data = split_data(data_config, split)
    tok = tokenizer if tokenizer is not None else records_tokenizer(data_config, "")
    return _padded(data, data_config, split, batch_size, tok)


def _padded(data: _SplitData, data_config: Any, split: str, batch_size: int,
            tokenizer: Any) -> Iterator[dict]:
    all_ops = ops.parse(_pp(data_config, split), _context(data_config, tokenizer))
    rest = all_ops[data.prefix :]
    uint8_images = ops.device_normalized(all_ops)
    return order.padded_batches(len(data), batch_size, lambda idx: _stack([
        ops.apply(rest, data.example(int(i)), np.random.default_rng([0, int(i)])) for i in idx],
        data.modalities, uint8_images))


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
