"""Any TFDS dataset by name, read with ``tfds.data_source`` (array_record; no TensorFlow).

Config keys (under ``data``): ``tfds_name`` (``"name"``, ``"name/config"`` or with a version),
``data_dir``, the features mapped to the modalities (``<modality>_key``, by default the
modality's name: ``image_key``, ``audio_key``, ``text_key``...; an empty ``text_key`` gives every
example the constant ``text``; a key left at the modality's name is left out when the dataset
lacks it, so an audio dataset needs no image, while a key set to another name must exist) and
``label_key``, and the split names
(``train_split``, ``val_split``, ``test_split``, which may be slices such as ``"train[:90%]"``).
Records are decoded by TFDS's numpy decoders, then by each modality's ``from_tfds`` (an
``Audio`` feature becomes ``(samples, sample_rate)``, which the ``decode_audio`` op resamples to
the front end's rate; integer samples are 16-bit PCM); the label feature should be a
``ClassLabel``.
The module is not named ``tfds.py`` so that ``import tensorflow_datasets as tfds`` stays
unambiguous inside the package.
"""

from __future__ import annotations

from typing import Any

from mmjax import modalities
from mmjax.errors import ExplainedError

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


class TfdsNotPreparedError(ValueError, ExplainedError):
    """The TFDS dataset is not prepared in its data_dir: mmjax reads prepared data only."""


def _data_source(data_config: Any, split: str) -> Any:
    """The prepared split, never downloaded or generated here (no network, no builder code run
    on a training host)."""
    import tensorflow_datasets as tfds

    name = _opt(data_config, "tfds_name")
    data_dir = _opt(data_config, "data_dir") or None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:  # what TFDS raises for missing data depends on the dataset's file format
        if tfds.builder(name, data_dir=data_dir).is_prepared():
            raise
        where = f"data.data_dir={data_dir!r}" if data_dir else "the default TFDS data_dir"
        raise TfdsNotPreparedError(
            f"data.tfds_name={name!r}: no prepared data in {where}; mmjax does not download "
            f"datasets: prepare it first (`tfds build {name.split('/')[0]}"
            f"{' --data_dir ' + data_dir if data_dir else ''}`)") from None


def _features(data_config: Any) -> Any:
    import tensorflow_datasets as tfds

    return tfds.builder(_opt(data_config, "tfds_name"),
                        data_dir=_opt(data_config, "data_dir") or None).info.features


def _key(data_config: Any, modality: str) -> str:
    """The feature read as ``modality``: ``data.<modality>_key``, else the modality's name."""
    try:
        return str(getattr(data_config, f"{modality}_key"))
    except (AttributeError, KeyError):
        return _DEFAULTS.get(f"{modality}_key", modality)


class TfdsSource:
    """One split as records ``{modality: value, "label": int}``: each registered modality whose
    feature (``data.<modality>_key``) the dataset has, through the modality's ``from_tfds``;
    a modality whose key is empty takes the constant ``data.<modality>`` (``data.text``)."""

    def __init__(self, data_config: Any, split: str):
        split_name = _opt(data_config, f"{split}_split")
        self.name = f"tfds:{_opt(data_config, 'tfds_name')}[{split_name}]"
        self._source = _data_source(data_config, split_name)
        self._label = _opt(data_config, "label_key")
        if len(self._source) == 0:
            raise ValueError(f"{self.name}: no records")
        first = self._source[0]
        keys = {m: _key(data_config, m) for m in modalities.names()}
        self._fields = {m: k for m, k in keys.items() if k and k in first}
        for m, k in keys.items():  # a key set to other than the modality's name must exist
            if k and k != m and k not in first:
                raise KeyError(f"{self.name}: no feature {k!r} (data.{m}_key); features: "
                               f"{sorted(first)}")
        self._constants = {m: _opt(data_config, m) for m, k in keys.items()
                           if not k and m in _DEFAULTS}
        if not self._fields:
            tried = {f"data.{m}_key": k for m, k in keys.items() if k}
            raise KeyError(f"{self.name}: none of the features {tried} is in the dataset; "
                           f"features: {sorted(first)}")
        if self._label not in first:
            raise KeyError(f"{self.name}: no feature {self._label!r}; features: {sorted(first)}")
        features = _features(data_config)
        self._feature = {m: features[k] for m, k in self._fields.items()}

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self._source[int(index)]
        out: dict[str, Any] = {
            m: modalities.get(m).from_tfds(rec[k], self._feature[m])
            for m, k in self._fields.items()}
        return {**out, **self._constants, "label": int(rec[self._label])}

    def modalities(self) -> tuple[str, ...]:
        """The modalities every record of this split has."""
        return tuple(m for m in modalities.names() if m in self._fields or m in self._constants)

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
