r"""Any prepared TFDS dataset, read with ``tfds.data_source`` (array_record, no TensorFlow).

    python -m mmjax.train --config configs/tfds.py --workdir /tmp/mmjax_tfds \
        --config.data.tfds_name=mnist --config.data.text_key= \
        --config.data.text="what digit is this ?" --config.data.val_split=test

The model and training recipe are ``configs/folder.py``'s; only ``config.data`` differs. Its
keys map the dataset's features to the batch (``image_key``, ``text_key``, ``label_key``; an
empty ``text_key`` gives every example the constant ``text``) and name the splits (slices such
as ``"train[:90%]"`` work). The label feature should be a ``ClassLabel``. The embedded shapes
data exists as a TFDS builder too (``python -m mmjax.data.shapes_tfds --data_dir D``, then
``--config.data.tfds_name=mmjax_shapes --config.data.data_dir=D --config.data.text_key=question
--config.data.val_split=val``).

Arguments: ``tiny`` (few steps, for tests).
"""

from __future__ import annotations

from pathlib import Path

import ml_collections

from mmjax import config

folder = config.load_file(Path(__file__).with_name("folder.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = folder.get_config(arg)
    with c.unlocked():
        c.data = ml_collections.ConfigDict({
            "name": "tfds",
            "tfds_name": "",  # required: "name", "name/config" or "name:version"
            "data_dir": "",  # "" = TFDS's default
            "image_key": "image",  # a key the dataset lacks is left out (e.g. audio only)
            "audio_key": "audio",  # a tfds.features.Audio (resampled to data.audio's rate)
            "text_key": "text",
            "label_key": "label",
            "text": "",  # the constant text when text_key is ""
            "train_split": "train",
            "val_split": "validation",
            "test_split": "test",
            "image_size": c.data.image_size,
            "max_len": c.data.max_len,
            "tokenizer": "",
            "vocab_size": 2000,
            "pp_train": c.data.pp_train,
            "pp_eval": c.data.pp_eval,
            "audio": c.data.audio.to_dict(),
            "cache": True,
            "cache_mb": 2048,
            "num_workers": 0,
        })
    c.lock()
    return c
