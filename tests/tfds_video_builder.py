"""A tiny TFDS builder with a ``Video`` feature, built locally (no download, no TensorFlow):
clips of ``level_frames`` (each frame tells its source index), of 20 to 37 frames. The frames
are given as PNG bytes (what the feature stores): TFDS encodes numpy frames with TensorFlow."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from tests.video_clips import level_frames

HEIGHT, WIDTH = 16, 24


def length(split: str, i: int) -> int:
    """The number of frames of example ``i`` of ``split``."""
    return 20 + 5 * i + ("train", "val", "test").index(split)


class MmjaxLevels(tfds.core.GeneratorBasedBuilder):
    """Clips whose frame i is grey level ``(i % 40) * 6``; label: the clip's length parity."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "video": tfds.features.Video(shape=(None, HEIGHT, WIDTH, 3)),
            "label": tfds.features.ClassLabel(names=["even", "odd"]),
        }))

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {s: self._generate_examples(s) for s in ("train", "val", "test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        for i in range(4):
            n = length(split, i)
            yield i, {"video": [_png(f) for f in level_frames(n, HEIGHT, WIDTH)],
                      "label": n % 2}


def _png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


def build(data_dir: str) -> tfds.core.DatasetBuilder:
    """Writes the array_record files under ``data_dir``; returns the builder."""
    builder = MmjaxLevels(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
