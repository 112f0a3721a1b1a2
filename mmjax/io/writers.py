"""Where metrics go: ``WORKDIR/metrics.jsonl`` (the contract) and TensorBoard event files.

Each JSONL record is written with one ``write`` of a whole line and flushed, so a run killed at
any moment leaves a file of valid lines. Only process 0 writes (``enabled=False`` elsewhere).
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic | np.ndarray):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the line parseable
    return v


def json_line(record: dict[str, Any]) -> str:
    """One metrics record as the JSON line ``metrics.jsonl`` holds (numpy values as Python
    numbers, a non-finite value as a string)."""
    return json.dumps({k: _plain(v) for k, v in record.items()})


def _tb_name(key: str) -> str:
    """TensorBoard's allowed characters (it warns on each other one): "recall@1" → "recall_at_1"."""
    return re.sub(r"[^\w.\-/]", "_", key.replace("@", "_at_"))


def _summary_writer(logdir: Path) -> Any:
    """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports torch
    whenever it is installed, only to accept torch tensors, and that import is the largest part
    of a run's start-up. A ``None`` in ``sys.modules`` makes ``import torch`` fail for that one
    import; mmjax writes Python numbers only."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir))


class MetricWriter:
    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            self._tb = _summary_writer(Path(workdir) / "tensorboard")

    def _repair_tail(self) -> None:
        """Drops a last line cut short by a kill, so the file stays valid JSON lines."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("rb+") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        assert self._file is not None  # opened when enabled
        self._file.write(json_line(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, int | float):
                    self._tb.add_scalar(f"{split}/{_tb_name(k)}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar with loss and steps/s; silent where ``enabled`` is False (other processes)."""

    def __init__(self, start: int, total: int, *, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            mininterval=1.0)
        self.pos = start

    def update(self, step: int, loss: float | None = None,
               steps_per_s: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.pos)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{steps_per_s:.1f}")
        self.pos = step

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
