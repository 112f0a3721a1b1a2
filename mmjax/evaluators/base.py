"""What every evaluator shares: the ``Evaluator`` base class and the ``Env`` of a run."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np

from mmjax.data import pipeline
from mmjax.data.tokenize import Tokenizer


class Env:
    """What evaluators share: the model, data config, tokenizer, label names, eval batch size,
    and the run's distillation teacher (``trainer.distill.Teacher``) if it has one."""

    def __init__(self, *, model: Any, model_cfg: Mapping[str, Any], data_config: Any,
                 tokenizer: Tokenizer, label_names: Sequence[str], batch_size: int,
                 teacher: Any = None):
        self.model = model
        self.model_cfg = model_cfg
        self.data_config = data_config
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.batch_size = batch_size
        self.teacher = teacher
        self._jitted: dict[tuple, Callable] = {}

    def apply(self, method: str, **kwargs: Any) -> Callable:
        """A jitted ``model.apply(variables, batch, method=method, **kwargs)``."""
        key = (method, tuple(sorted(kwargs.items())))
        if key not in self._jitted:
            self._jitted[key] = jax.jit(
                functools.partial(self.model.apply, method=method, **kwargs))
        return self._jitted[key]

    def batches(self, split: str) -> Iterator[dict[str, Any]]:
        return iter(pipeline.eval_batches(
            self.data_config, split, batch_size=self.batch_size, tokenizer=self.tokenizer
        ))


class Evaluator:
    """One configured evaluator; ``__call__(variables, split) -> {metric: value}``.

    Subclasses set ``reads`` (the modalities the evaluator reads besides the label, so a run
    whose data lacks one fails at once naming the evaluator) and ``unprefixed`` (metrics also
    written without the ``<name>_`` prefix, as a classification task writes ``accuracy``).
    """

    reads: ClassVar[tuple[str, ...]] = ()
    unprefixed: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, cfg: Mapping[str, Any], env: Env):
        self.name = name
        self.cfg = dict(cfg)
        self.env = env
        self.task = self.cfg.get("task", "")
        heads = env.model_cfg["heads"]
        if self.task not in heads:
            raise ValueError(f"evals.{name}.task={self.task!r} is not a head of the model; "
                             f"heads: {sorted(heads)}")

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        raise NotImplementedError


def valid_rows(batch: Mapping[str, Any]) -> np.ndarray:
    """bool [B]: the batch's real rows (not the padding of a split's last batch)."""
    return np.asarray(batch["valid"]) > 0


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without its ``valid`` marks."""
    return {k: v for k, v in batch.items() if k != "valid"}


def text_of(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"ids": np.asarray(batch["text"]["ids"]), "mask": np.asarray(batch["text"]["mask"])}
