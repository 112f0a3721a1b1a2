"""A run killed with SIGKILL after a checkpoint and restarted reproduces the uninterrupted run.

The data-iterator state is saved in every Orbax checkpoint, per-step randomness is
``fold_in(rng, step)`` and augmentations draw from ``(seed, step, row)``, so the train losses
from the restored checkpoint on must be *bit-identical*, and ``metrics.jsonl`` must stay valid
JSON lines even though the kill can land in the middle of a write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 60
# log_every=1: the trainer averages train lines over log_every steps; per-step lines compare
# every loss, not window means.
ARGS = [
    "--config", "configs/default.py:tiny", "--config.total_steps=60",
    "--config.log_every=1", "--config.checkpoint_every=10", "--config.eval_every=60",
]


def _cmd(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "mmjax.train", *ARGS, "--workdir", str(workdir)]


def _env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _train_losses(path: Path) -> list[tuple[int, float]]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)  # every line must parse, including after the kill
        assert isinstance(rec["step"], int) and rec["split"] in ("train", "val", "test")
        if rec["split"] == "train":
            out.append((rec["step"], rec["loss"]))
    return out


def _finished_checkpoints(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    if not d.exists():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigkill_and_restart_gives_identical_losses(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    devnull = subprocess.DEVNULL
    ref = subprocess.Popen(_cmd(ref_dir), cwd=REPO, env=_env(), stdout=devnull, stderr=devnull)
    victim = subprocess.Popen(_cmd(run_dir), cwd=REPO, env=_env(), stdout=devnull, stderr=devnull)
    try:
        deadline = time.time() + 300
        while not _finished_checkpoints(run_dir):
            assert victim.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = _finished_checkpoints(run_dir)[-1]
        before = _train_losses(run_dir / "metrics.jsonl")
        assert before and before[-1][0] < STEPS, "the kill came after the run had finished"

        restarted = subprocess.run(
            _cmd(run_dir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
        )
        assert restarted.returncode == 0, restarted.stderr[-3000:]
        assert ref.wait(timeout=300) == 0
    finally:
        for proc in (victim, ref):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    reference = dict(_train_losses(ref_dir / "metrics.jsonl"))
    assert sorted(reference) == list(range(1, STEPS + 1))
    lines = _train_losses(run_dir / "metrics.jsonl")
    # The first life's lines and the second life's (resuming at a checkpoint >= killed_at) both
    # match the reference exactly; together they cover every step.
    resumed = [(s, v) for s, v in lines[len(before) :]]
    assert resumed and resumed[0][0] > killed_at - 1 and resumed[-1][0] == STEPS
    for step, loss in lines:
        assert loss == reference[step], (step, loss, reference[step])
    assert {s for s, _ in lines} == set(range(1, STEPS + 1))
