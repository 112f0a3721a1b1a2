"""Evaluators: metrics over a whole split that a per-batch loss cannot give (big_vision's idea).

Configured by ``config.evals`` (absent or empty = none): ``evals.<name> = {"kind": ..., options}``.
The trainer runs every evaluator after each validation pass and on the test split at the end;
its metrics go into the same ``metrics.jsonl`` line as ``<name>_<metric>``.

A kind is a module, loaded by name as big_vision loads its evaluators: ``kind="qa"`` is
``mmjax.evaluators.qa``, and a dotted kind (``"my_project.my_eval"``) is that module, so an
evaluator of your own needs no change to mmjax. The module defines ``Evaluator``, a subclass of
:class:`mmjax.evaluators.base.Evaluator`. The kinds shipped: ``retrieval``, ``video_retrieval``,
``zeroshot``, ``qa``, ``agreement`` and ``caption`` (each module's docstring says what it
measures).

Evaluators run the model with ``jax.jit`` on the first local device, on params copied to it
once per evaluation; fine for the model sizes of the embedded configs, and the reason
evaluators are refused with more than one process (the trainer says so).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from mmjax.evaluators.base import Env, Evaluator

KINDS = ("retrieval", "video_retrieval", "zeroshot", "qa", "agreement", "caption")

__all__ = ["KINDS", "Env", "Evaluator", "build", "get", "run_all"]


def get(kind: Any, where: str = "evals") -> type[Evaluator]:
    """The ``Evaluator`` class of ``kind``: module ``mmjax.evaluators.<kind>``, or the module a
    dotted ``kind`` names."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{where}.kind={kind!r}; known: {KINDS} or a module path")
    name = kind if "." in kind else f"mmjax.evaluators.{kind}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name.startswith(e.name):  # the module itself is missing
            raise ValueError(f"{where}.kind={kind!r}: no module {name}; known: {KINDS} or a "
                             "module path") from None
        raise
    cls = getattr(module, "Evaluator", None)
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        raise ValueError(f"{where}.kind={kind!r}: module {name} defines no Evaluator class "
                         "(a subclass of mmjax.evaluators.base.Evaluator)")
    return cls


def build(evals_cfg: Mapping[str, Any] | None, env: Env) -> dict[str, Evaluator]:
    """``{name: evaluator}`` of ``config.evals``; a bad kind or task fails here, before
    training."""
    out: dict[str, Evaluator] = {}
    for name, cfg in (evals_cfg or {}).items():
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        out[name] = get(cfg.get("kind"), f"evals.{name}")(name, cfg, env)
    return out


def run_all(evaluators: Mapping[str, Evaluator], variables: Mapping[str, Any],
            split: str) -> dict[str, float]:
    """Every evaluator's metrics as ``<name>_<metric>`` (plus its ``unprefixed`` ones)."""
    out: dict[str, float] = {}
    for name, ev in evaluators.items():
        metrics = ev(variables, split)
        out.update({f"{name}_{k}": float(v) for k, v in metrics.items()})
        for key in ev.unprefixed:
            out.setdefault(key, float(metrics[key]))
    return out
