"""Train and eval batches for any data config: the entry points the trainer calls.

The embedded shapes data is handled here: a whole batch of indices is drawn at once
(``ShapesSource.get_batch``), much cheaper than per-record reads on a small CPU. Folder and TFDS
records go through ``records.py`` (preprocessing ops per record). Both follow ``order.py``:
step ``i``'s global batch is a fixed function of (seed, i) and each process keeps its rows, so
batches do not depend on the process count and a resumed run sees identical batches.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from mmjax.data import mixture, order, records, shapes, shapes_audio, shapes_video, tokenize
from mmjax.data.records import SPLITS
from mmjax.data.tokenize import WordTokenizer, shapes_tokenizer

log = logging.getLogger(__name__)
_ORDER_CACHE: dict[tuple, Any] = {}  # data.mixture's train order, for its metrics

_TEXT_FIELDS = ("question", "caption")
_NAMES = ("shapes", "shapes_audio", "shapes_video", "folder", "tfds")
# Generated, batch-at-a-time.
EMBEDDED = {"shapes": shapes, "shapes_audio": shapes_audio, "shapes_video": shapes_video}
# The embedded sets other than shapes: (modalities, source class).
_OTHERS = {"shapes_audio": (("audio", "image", "text"), shapes_audio.ShapesAudioSource),
           "shapes_video": (("text", "video"), shapes_video.ShapesVideoSource)}


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
    if _check_name(data_config) in EMBEDDED:
        return EMBEDDED[data_config.name].tokenizer() if data_config.name in _OTHERS \
            else shapes_tokenizer()
    return records.records_tokenizer(data_config, str(workdir or ""))


def dataset_info(
    data_config: Any, tokenizer: Any, *, workdir: str | Path = ""
) -> dict[str, int]:
    """Sizes a model takes from its data: the vocabulary and the number of answer classes.

    For folder and TFDS data this also loads and validates every split, so bad records stop
    the run before training; ``skipped_<split>`` counts records dropped with ``skip_bad``.
    """
    if _check_name(data_config) in EMBEDDED:
        answers = EMBEDDED[data_config.name].ANSWERS
        return {"vocab_size": tokenizer.vocab_size, "num_classes": len(answers)}
    workdir = str(workdir or "")
    if getattr(data_config, "tokenizer", ""):  # a tokenizer of the user's: does it know the words?
        tokenize.check_coverage(tokenizer, records.train_texts(data_config),
                                name=str(data_config.tokenizer),
                                limit=float(data_config.get("max_unk_rate",
                                                            tokenize.DEFAULT_MAX_UNK_RATE)))
    vocab = records.labels(data_config, workdir)
    info = {"vocab_size": tokenizer.vocab_size, "num_classes": len(vocab)}
    for split in SPLITS:
        info[f"skipped_{split}"] = records.split_data(data_config, split, workdir).skipped
    return info


def modalities(data_config: Any) -> tuple[str, ...]:
    """The input modalities the batches carry (folder and TFDS: those of the train records)."""
    name = _check_name(data_config)
    if name in EMBEDDED:
        return _OTHERS[name][0] if name in _OTHERS else ("image", "text")
    return records.data_modalities(data_config)


def _source(data_config: Any, split: str) -> shapes.ShapesSource:
    if _check_name(data_config) not in EMBEDDED:
        raise ValueError("internal: _source serves the embedded data only")
    if split not in SPLITS:
        raise ValueError(f"unknown data split {split!r}; expected one of {SPLITS}")
    text = order.config_get(data_config, "text", "question")
    if text not in _TEXT_FIELDS:
        raise ValueError(f"unknown data.text {text!r}; expected one of {_TEXT_FIELDS}")
    if data_config.name == "shapes_audio" and text != "question":
        raise ValueError(f"data.text={text!r}: shapes_audio has questions only")
    cls = _OTHERS[data_config.name][1] if data_config.name in _OTHERS else shapes.ShapesSource
    return cls(
        split,
        int(getattr(data_config, f"num_{split}")),
        image_size=int(order.config_get(data_config, "image_size", 32)),
        variant=order.config_get(data_config, "variant", ""),
        # The data itself is fixed by the dataset's seed, never by the run's seed, so that
        # accuracies of different runs are measured on the same val/test examples.
        seed=int(order.config_get(data_config, "seed", 0)),
    )


def _to_batch(
    indices: np.ndarray,
    *,
    source: shapes.ShapesSource,
    tokenizer: WordTokenizer,
    text_field: str,
    max_len: int,
) -> dict[str, Any]:
    """Indices → model batch: uint8 images (the model scales them), the chosen text tokenized,
    int32 labels."""
    raw = source.get_batch(indices)
    ids, mask = tokenizer.encode(raw[text_field], max_len)
    return {
        **({"image": raw["image"]} if "image" in raw else {}),
        "text": {"ids": ids, "mask": mask},
        **({"audio": raw["audio"]} if "audio" in raw else {}),  # shapes_audio: [B, frames, mels]
        **({"video": raw["video"]} if "video" in raw else {}),  # shapes_video: [B, T, H, W, 3]
        "label": raw["label"].astype(np.int32),
    }


def _slice_and_batch(
    step: int, *, steps: order.GlobalOrder, lo: int, hi: int, **kwargs: Any
) -> dict[str, Any]:
    return _to_batch(steps(int(step))[lo:hi], **kwargs)


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
    if _check_name(data_config) not in EMBEDDED:
        return records.train_iterator(
            data_config, batch_size=batch_size, seed=seed, lo=process_index * per_process,
            hi=(process_index + 1) * per_process, tokenizer=tokenizer,
        )
    source = _source(data_config, "train")
    make = functools.partial(
        _slice_and_batch,
        steps=order.GlobalOrder(len(source), batch_size, int(seed)),
        lo=process_index * per_process,
        hi=(process_index + 1) * per_process,
        source=source,
        tokenizer=build_tokenizer(data_config),
        text_field=order.config_get(data_config, "text", "question"),
        max_len=int(data_config.max_len),
    )
    # Element i of this dataset is step i's batch, so the iterator state is just the step.
    ds = grain.MapDataset.range(sys.maxsize).map(make)
    return iter(ds.to_iter_dataset(order.READ_OPTIONS))


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
    if _check_name(data_config) not in EMBEDDED:
        return records.eval_batches(data_config, split, batch_size, tokenizer)
    source = _source(data_config, split)
    kwargs = {
        "source": source,
        "tokenizer": build_tokenizer(data_config),
        "text_field": order.config_get(data_config, "text", "question"),
        "max_len": int(data_config.max_len),
    }
    return order.padded_batches(source.num_examples, batch_size,
                                lambda idx: _to_batch(idx, **kwargs))


def label_names(data_config: Any, *, workdir: str | Path = "") -> list[str]:
    """Names of the answer classes, in label-id order (evaluators print and compare them)."""
    if _check_name(data_config) in EMBEDDED:
        return list(EMBEDDED[data_config.name].ANSWERS)
    return [str(v) for v in records.labels(data_config, str(workdir or ""))]


def file_batches(
    data_config: Any, file: str | Path, *, batch_size: int, tokenizer: Any,
    skip_bad: bool = False, modalities: tuple[str, ...] | None = None,
) -> tuple[Any, Iterator[dict]]:
    """New inputs: a JSONL file in the folder format (labels optional, ignored), every line
    validated first (errors name FILE:LINE; ``skip_bad`` drops and counts them), then padded
    batches preprocessed as this data's val/test examples are (``data.pp_eval``; for the shapes
    data its default, which is the shapes scaling when images are ``image_size`` square).

    Returns the ``FolderSource`` (its ``indices``, ``lines`` and ``skipped`` place the batches'
    rows in the file) and the batches, with ``"valid"`` marking real rows. ``modalities``
    (default: the file's) are the inputs the batches carry; a line without one gets a
    placeholder and ``present`` False.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return records.file_batches(data_config, file, batch_size=batch_size, tokenizer=tokenizer,
                                skip_bad=skip_bad, modalities=modalities)


def _mixture_order(data_config: Any, batch_size: int, seed: int) -> Any:
    key = (tuple(mixture.sources(data_config)), batch_size, int(seed))
    if key not in _ORDER_CACHE:
        _ORDER_CACHE[key] = records.train_order(data_config, batch_size, seed)
    return _ORDER_CACHE[key]


def source_fractions(data_config: Any, *, batch_size: int, seed: int, start: int,
                     stop: int) -> dict[str, float]:
    """``{"data/<source>_fraction": f}``: each ``data.mixture`` source's share of the train rows
    of iterator elements ``[start, stop)``; ``{}`` for data without a mixture."""
    if _check_name(data_config) in EMBEDDED or not mixture.sources(data_config):
        return {}
    return _mixture_order(data_config, batch_size, seed).fractions(start, stop)


def source_masks(data_config: Any, *, batch_size: int, seed: int, element: int,
                 process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
    """Per ``data.mixture`` source with rows in iterator element ``element``'s global batch,
    float32 1/0 over this process's rows: which come from it; ``{}`` without a mixture."""
    if _check_name(data_config) in EMBEDDED or not mixture.sources(data_config):
        return {}
    rows = _mixture_order(data_config, batch_size, seed).row_sources(element)
    n = batch_size // process_count
    return {name: (rows == k)[process_index * n:(process_index + 1) * n].astype(np.float32)
            for k, (name, _, _) in enumerate(mixture.sources(data_config)) if (rows == k).any()}
