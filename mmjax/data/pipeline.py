"""Grain pipelines that turn a data config into train and eval batches.

Batches are formed from *indices* first and the examples of a whole batch are drawn at once
(``ShapesSource.get_batch``): per-record reads, per-record shuffling and stacking cost several
times more than the vectorised path on the 2-core demo machine, where a train step takes ~75 ms.

Multi-process sharding slices the global batch: every process shuffles the same global index
stream and keeps rows ``[p * B/P, (p + 1) * B/P)``, so the global batch at a step is the same
examples whatever the process count, and restarting on a different topology changes nothing.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from mmjax.data import shapes
from mmjax.data.tokenize import WordTokenizer, shapes_tokenizer

_TEXT_FIELDS = ("question", "caption")
_SPLITS = ("train", "val", "test")


def _get(config: Any, key: str, default: Any) -> Any:
    """Reads an optional config key; works for ConfigDicts, dataclasses and namespaces."""
    try:
        return getattr(config, key)
    except (AttributeError, KeyError):
        return default


def _check_name(data_config: Any) -> None:
    name = data_config.name
    if name != "shapes":
        raise ValueError(f"unknown data.name {name!r}; the pipeline supports: 'shapes'")


def build_tokenizer(data_config: Any) -> WordTokenizer:
    """The tokenizer that matches the dataset named in ``data_config.name``."""
    _check_name(data_config)
    return shapes_tokenizer()


def dataset_info(data_config: Any, tokenizer: WordTokenizer) -> dict[str, int]:
    """Sizes a model takes from its data: the vocabulary and the number of answer classes."""
    _check_name(data_config)
    return {"vocab_size": tokenizer.vocab_size, "num_classes": len(shapes.ANSWERS)}


def _source(data_config: Any, split: str) -> shapes.ShapesSource:
    _check_name(data_config)
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
    source = _source(data_config, "train")
    per_process = batch_size // process_count
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


def eval_batches(data_config: Any, split: str, *, batch_size: int) -> Iterator[dict]:
    """Every example of ``split`` once, in order, with ``"valid"`` marking real rows.

    The last batch is filled up to ``batch_size`` (so eval compiles one shape) with repeats of
    the split's first examples, marked ``valid == 0``: real inputs rather than zeros, so that no
    model sees an all-padding text row that could turn masked attention into NaNs.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
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
