"""Student-teacher agreement under distillation (``config.distill.teacher``).

How often the student's top-1 class is the teacher's (``agreement``), the mean KL(teacher ‖
student) of their softmax at temperature 1 in nats (``kl``), and the teacher's own accuracy
(``teacher_accuracy``); ``task`` defaults to the head the teacher teaches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mmjax.evaluators import base


class Evaluator(base.Evaluator):
    def __init__(self, name: str, cfg: Mapping[str, Any], env: base.Env):
        if env.teacher is None:
            raise ValueError(f"evals.{name}.kind='agreement' needs a teacher: set "
                             "config.distill.teacher")
        super().__init__(name, {"task": env.teacher.spec.task, **cfg}, env)
        self._teacher_logits = jax.jit(env.teacher.spec.teacher_logits)
        self._teacher_vars: Any = None

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        fwd = self.env.apply("__call__")
        if self._teacher_vars is None:  # on device once, not per batch
            self._teacher_vars = jax.device_put(self.env.teacher.variables)
        target = self.env.model_cfg["heads"][self.task].get("target", "label")
        same = kl = right = 0.0
        n = 0
        for batch in self.env.batches(split):
            keep = base.valid_rows(batch)
            inputs = base.model_inputs(batch)
            s = np.asarray(fwd(variables, inputs)[self.task]["logits"], np.float32)[keep]
            t = np.asarray(self._teacher_logits(self._teacher_vars, inputs), np.float32)[keep]
            log_s, log_t = (np.asarray(jax.nn.log_softmax(x, axis=1), np.float64) for x in (s, t))
            same += float((s.argmax(1) == t.argmax(1)).sum())
            kl += float((np.exp(log_t) * (log_t - log_s)).sum())
            right += float((t.argmax(1) == np.asarray(batch[target])[keep]).sum())
            n += int(keep.sum())
        n = max(n, 1)
        return {"agreement": same / n, "kl": kl / n, "teacher_accuracy": right / n}
