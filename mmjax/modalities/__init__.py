"""The modalities mmjax knows, one module each (``image``, ``audio``, ``series``, ``text``,
``video``), and the registry that the pipeline, the model, the explainers, the robustness tools
and the exporter ask instead of switching on a modality's name (``base.Modality`` lists the
questions).

Adding a modality is one module that calls ``register(Modality(...))``, plus its tower
registered with ``mmjax.models.encoders.ENCODERS`` (docs/architecture.md walks through one).
"""

import importlib

from mmjax.modalities.base import (
    Attack,
    Corruption,
    CorruptionError,
    Modality,
    corruption,
    get,
    names,
    of_tower,
    register,
)

# The built-in modalities; each module registers itself when imported, in this order (the order
# of a record's fields in messages and summaries).
BUILT_IN = ("image", "audio", "series", "text", "video")
for _name in BUILT_IN:
    importlib.import_module(f"mmjax.modalities.{_name}")

__all__ = ["BUILT_IN", "Attack", "Corruption", "CorruptionError", "Modality", "corruption", "get",
           "names", "of_tower", "register"]
