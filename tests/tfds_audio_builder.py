"""A tiny TFDS builder with an ``Audio`` feature, built locally (no download, no TensorFlow)
for the audio tests: clips of 1 to 3 beeps at 8 kHz, the label their count.

TFDS registers builder classes by import, so the class lives in this importable module.
TFDS's ``Audio`` feature converts its dtype with TensorFlow when it is constructed (for its
tf.data decoder; ``tfds.data_source`` decodes with numpy), so without TensorFlow that one call
is answered by numpy inside :func:`without_tensorflow`, around building and reading alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tests.realdata_audio import beeps

RATE = 8000


@dataclasses.dataclass
class BeepsConfig(tfds.core.BuilderConfig):
    num_train: int = 24
    num_val: int = 8
    num_test: int = 8


class MmjaxBeeps(tfds.core.GeneratorBasedBuilder):
    """Clips of n beeps (int16 PCM at 8 kHz), a constant question, label n - 1."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [BeepsConfig(name="tiny")]

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "audio": tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=RATE),
                "label": tfds.features.ClassLabel(names=["one", "two", "three"]),
            }),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        cfg = self.builder_config
        return {s: self._generate_examples(s, n) for s, n in
                (("train", cfg.num_train), ("val", cfg.num_val), ("test", cfg.num_test))}

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict]]:
        rng = np.random.default_rng(["train", "val", "test"].index(split))
        for i in range(n):
            count = i % 3 + 1
            clip = beeps(count, RATE, rng, max_seconds=0.6)[:, 0]
            yield i, {"audio": np.round(clip * 32767).astype(np.int16), "label": count - 1}


@contextlib.contextmanager
def without_tensorflow() -> Iterator[None]:
    """Lets TFDS's ``Audio`` and ``Video`` features be constructed where TensorFlow is not
    installed: their dtype conversions (TensorFlow's ``as_dtype``) are answered with numpy
    dtypes."""
    from tensorflow_datasets.core.features import audio_feature, feature, video_feature

    try:
        import tensorflow  # noqa: F401
    except ImportError:
        shim = types.SimpleNamespace(dtypes=types.SimpleNamespace(as_dtype=np.dtype),
                                     string=np.dtype(object))
        modules = (audio_feature, video_feature, feature)
        saved = [m.tf for m in modules]
        for m in modules:
            m.tf = shim
        try:
            yield
        finally:
            for m, tf in zip(modules, saved, strict=True):
                m.tf = tf
        return
    yield


def build(data_dir: str) -> tfds.core.DatasetBuilder:
    """Writes the array_record files under ``data_dir``; returns the builder."""
    builder = MmjaxBeeps(config="tiny", data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
