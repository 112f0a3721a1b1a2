"""The embedded ``shapes`` data as a real TFDS builder, so it can be read like any TFDS dataset.

Build it once (no TensorFlow needed; array_record files)::

    python -m mmjax.data.shapes_tfds --data_dir DIR [--config small]

then train on it with ``--config.data.name=tfds --config.data.tfds_name=mmjax_shapes/small
--config.data.data_dir=DIR --config.data.text_key=question``. Images are stored as uint8
``Tensor`` features rather than ``Image``: TFDS encodes ``Image`` arrays with TensorFlow, which
is an optional extra here. The builder lives in a package module because TFDS registers
builder classes by import.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import shapes


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    num_train: int = 50_000
    num_val: int = 2_000
    num_test: int = 2_000
    image_size: int = 32


# Under ``python -m`` this file also runs as ``__main__``: register only the importable copy.
class MmjaxShapes(tfds.core.GeneratorBasedBuilder,  # type: ignore[call-arg]
                  skip_registration=__name__ == "__main__"):
    """Two coloured objects per image and a question about them (see ``mmjax.data.shapes``)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [
        ShapesConfig(name="default"),
        ShapesConfig(name="small", num_train=2_000, num_val=200, num_test=200),
        ShapesConfig(name="tiny", num_train=64, num_val=16, num_test=16),
    ]

    # Nothing is downloaded, so there is no checksums file to look up; TFDS's lookup would import
    # ``importlib_resources``, which this environment does not need otherwise.
    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
                "question": tfds.features.Text(),
                "caption": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(shapes.ANSWERS)),
            }),
            description=__doc__,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "val": self._generate_examples("val", cfg.num_val),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split: str, n: int) -> Iterator[tuple[int, dict]]:
        size = self.builder_config.image_size
        for start in range(0, n, 512):
            idx = np.arange(start, min(n, start + 512))
            b = shapes.make_batch(split, idx, image_size=size)
            for j, i in enumerate(idx.tolist()):
                yield i, {
                    "image": b["image"][j],
                    "question": b["question"][j],
                    "caption": b["caption"][j],
                    "label": int(b["label"][j]),
                }


def build(data_dir: str, config: str = "default") -> tfds.core.DatasetBuilder:
    """Writes the array_record files under ``data_dir``; returns the builder."""
    builder = MmjaxShapes(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--config", default="default", choices=["default", "small", "tiny"])
    args = parser.parse_args()
    # Under ``python -m`` this file is ``__main__``, which TFDS cannot use as a package for the
    # builder; build with the class of the importable module instead.
    from mmjax.data import shapes_tfds

    shapes_tfds.build(args.data_dir, args.config)
    print(f"built mmjax_shapes/{args.config} in {args.data_dir}")


if __name__ == "__main__":
    main()
