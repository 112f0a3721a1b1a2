"""Any TFDS dataset by name, read with ``tfds.data_source`` (array_record; no TensorFlow).

Config keys (under ``data``): ``tfds_name`` (``"name"``, ``"name/config"`` or with a version),
``data_dir``, the fields mapped to the batch (``image_key``, ``audio_key``, ``text_key``,
``label_key``; an empty ``text_key`` gives every example the constant ``text``; an image or
audio key the dataset lacks is left out, so an audio dataset needs no image), and the split names
(``train_split``, ``val_split``, ``test_split``, which may be slices such as ``"train[:90%]"``).
Records are decoded by TFDS's numpy decoders; the label feature should be a ``ClassLabel``.
An ``Audio`` feature becomes the ``audio`` modality as ``(samples, sample_rate)``, which the
``decode_audio`` op resamples to the front end's rate (integer samples are 16-bit PCM).
The module is not named ``tfds.py`` so that ``import tensorflow_datasets as tfds`` stays
unambiguous inside the package.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_DEFAULTS = {
    "tfds_name": "",
    "data_dir": "",
    "image_key": "image",
    "audio_key": "audio",
    "text_key": "text",
    "label_key": "label",
    "text": "",
    "train_split": "train",
    "val_split": "validation",
    "test_split": "test",
}


def _opt(data_config: Any, key: str) -> Any:
    try:
        return getattr(data_config, key)
    except (AttributeError, KeyError):
        return _DEFAULTS[key]


def key(data_config: Any) -> tuple:
    """What identifies the records: name, data_dir and the field mapping."""
    name = _opt(data_config, "tfds_name")
    if not name:
        raise ValueError("data.tfds_name is empty: name a TFDS dataset for data.name='tfds'")
    return tuple(_opt(data_config, k) for k in _DEFAULTS)


def _data_source(data_config: Any, split: str) -> Any:
    import tensorflow_datasets as tfds

    data_dir = _opt(data_config, "data_dir") or None
    return tfds.data_source(_opt(data_config, "tfds_name"), split=split, data_dir=data_dir)


def _text(value: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _sample_rate(data_config: Any, key: str) -> int | None:
    """The ``sample_rate`` an ``Audio`` feature declares (None if it declares none)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(_opt(data_config, "tfds_name"),
                           data_dir=_opt(data_config, "data_dir") or None)
    rate = getattr(builder.info.features[key], "sample_rate", None)
    return int(rate) if rate else None


class TfdsSource:
    """One split as records ``{"image": uint8 array, "audio": (samples, rate), "text": str,
    "label": int}`` (image and audio where the dataset has them)."""

    def __init__(self, data_config: Any, split: str):
        split_name = _opt(data_config, f"{split}_split")
        self.name = f"tfds:{_opt(data_config, 'tfds_name')}[{split_name}]"
        self._source = _data_source(data_config, split_name)
        self._media = {m: _opt(data_config, f"{m}_key") for m in ("image", "audio")}
        self._text_key = _opt(data_config, "text_key")
        self._const_text = _opt(data_config, "text")
        self._label = _opt(data_config, "label_key")
        if len(self._source) == 0:
            raise ValueError(f"{self.name}: no records")
        first = self._source[0]
        self._media = {m: k for m, k in self._media.items() if k and k in first}
        if not self._media:
            raise KeyError(f"{self.name}: no feature {_opt(data_config, 'image_key')!r} "
                           f"(data.image_key) or {_opt(data_config, 'audio_key')!r} "
                           f"(data.audio_key); features: {sorted(first)}")
        for k in (self._label,) + ((self._text_key,) if self._text_key else ()):
            if k not in first:
                raise KeyError(f"{self.name}: no feature {k!r}; features: {sorted(first)}")
        self._rate = _sample_rate(data_config, self._media["audio"]) \
            if "audio" in self._media else None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._source[int(index)]
        text = _text(rec[self._text_key]) if self._text_key else self._const_text
        out = {m: rec[k] for m, k in self._media.items()}
        if "audio" in out and self._rate:
            out["audio"] = (np.asarray(out["audio"]), self._rate)
        return {**out, "text": text, "label": int(rec[self._label])}

    def modalities(self) -> tuple[str, ...]:
        """The modalities every record of this split has (image/audio as found, and text)."""
        return (*self._media, "text")

    def raw_labels(self) -> list[int]:
        """Every label of the split: reads each record, so it is meant for small splits only."""
        return [int(self._source[i][self._label]) for i in range(len(self))]


def label_names(data_config: Any) -> list[str | int]:
    """The class names of the label feature (a ``ClassLabel``), else its class indices."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(_opt(data_config, "tfds_name"),
                           data_dir=_opt(data_config, "data_dir") or None)
    feature = builder.info.features[_opt(data_config, "label_key")]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    num = getattr(feature, "num_classes", None)
    if num:
        return list(range(num))
    raise ValueError(
        f"data.label_key={_opt(data_config, 'label_key')!r} of {_opt(data_config, 'tfds_name')} "
        "is not a ClassLabel"
    )
