"""Module classes by kind, one registry per family (encoders, fusions, heads), and the rule
that turns a config entry into a module's options.

A config entry is ``{"kind": ..., **options}``; every option must be a field of the kind's
class (an unknown one is an error naming the key), and a few keys describe the part to the
trainer rather than to its module (``init_from``, ``loss``...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

# Config keys that describe a part but are not arguments of its module.
NON_MODULE_KEYS = frozenset({"kind", "init_from", "inflate", "loss", "target",
                             "label_smoothing", "tokenizer"})
T = TypeVar("T")


def module_kwargs(cls: type, cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``cfg`` that are fields of ``cls``; an unknown key is a config error."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name", "opts"}
    out = {}
    for key, value in cfg.items():
        if key in NON_MODULE_KEYS:
            continue
        if key not in fields:
            raise ValueError(f"{where}.{key} is not an option of {cls.__name__}; "
                             f"known: {sorted(fields)}")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


class Registry(Generic[T]):
    """``kind -> class`` of one family; ``register`` adds a kind (a tower or fusion of your own)."""

    def __init__(self, family: str, classes: Mapping[str, type[T]]):
        self.family = family
        self._classes: dict[str, type[T]] = dict(classes)

    def register(self, kind: str, cls: type[T]) -> type[T]:
        if kind in self._classes and self._classes[kind] is not cls:
            raise ValueError(f"{self.family} kind {kind!r} is registered already "
                             f"({self._classes[kind].__name__})")
        self._classes[kind] = cls
        return cls

    def __contains__(self, kind: object) -> bool:
        return kind in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def get(self, kind: Any, where: str) -> type[T]:
        """The class of ``kind``; an unknown kind names the config key ``where.kind``."""
        if kind not in self._classes:
            raise ValueError(f"{where}.kind={kind!r}; known {self.family} kinds: "
                             f"{sorted(self._classes)}")
        return self._classes[kind]

    def build(self, cfg: Mapping[str, Any], where: str, **kwargs: Any) -> T:
        """An instance of ``cfg["kind"]`` with the options of ``cfg`` (``kwargs``: ``opts``,
        ``name``, ``parent``...)."""
        cls = self.get(cfg.get("kind"), where)
        return cls(**module_kwargs(cls, cfg, where), **kwargs)
