"""Shards and many hosts on one machine: folder vs shards, and processes started as SLURM does.

Two processes on localhost get SLURM's variables (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_LOCALID``) and no mmjax flags, so ``jax.distributed``
finds the coordinator, the process count and each index itself, as under ``srun``. They must
train to the losses of one process with the same global batch, and after one of them is killed
mid-run (and the job with it, as ``srun`` does), the relaunched job must resume exactly. The
one-process runs (on the folder, and on its shards, which must give the same losses) run in
this process while the two-process job runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests import realdata

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
# Twenty steps after the first checkpoint: the kill lands mid-run even on a loaded machine.
STEPS, EVERY = 30, 10


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MMJAX_", "SLURM_", "OMPI_", "TPU_"))}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **extra)
    return env


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free now."""
    for port in np.random.default_rng().permutation(np.arange(61440, 65536)).tolist():
        with socket.socket() as s:
            try:
                s.bind(("localhost", port))
            except OSError:
                continue
        return port - 61440
    raise RuntimeError("no free port in JAX's SLURM range")


def _train(workdir: Path, data: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmjax.train", "--config", "configs/folder.py:tiny",
           "--workdir", str(workdir), f"--config.data.path={data}",
           f"--config.total_steps={STEPS}", "--config.log_every=1",
           f"--config.checkpoint_every={EVERY}", f"--config.eval_every={STEPS}",
           "--config.model.dropout=0"]  # dropout masks are drawn per device
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _srun(workdir: Path, data: Path) -> list[subprocess.Popen]:
    job = str(_slurm_job_id())
    return [_train(workdir, data, SLURM_JOB_ID=job, SLURM_STEP_NODELIST="localhost",
                   SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
            for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def _losses(workdir: Path) -> dict[int, list[float]]:
    """Every train loss logged per step (a step logged before a kill and again after the
    resume has two)."""
    out: dict[int, list[float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["split"] == "train":
            out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def _in_process(workdir: Path, data: Path) -> dict[int, list[float]]:
    """One process: this one, with configs/folder.py:tiny as the subprocesses run it."""
    from configs.folder import get_config
    from mmjax import trainer

    cfg = get_config("tiny")
    with cfg.unlocked():
        cfg.data.path = str(data)
        cfg.total_steps, cfg.log_every, cfg.checkpoint_every = STEPS, 1, EVERY
        cfg.eval_every, cfg.model.dropout = STEPS, 0.0
    trainer.train_and_evaluate(cfg, workdir)
    return _losses(workdir)


def _kill_after_checkpoint(workdir: Path, job: list[subprocess.Popen]) -> threading.Thread:
    """Kills process 1 once the first checkpoint is committed and a later step logged; srun
    then ends the whole step, so process 0 goes too."""

    def watch() -> None:
        deadline = time.time() + 500
        while not ((workdir / "checkpoints" / str(EVERY)).is_dir()
                   and max(_losses(workdir) if (workdir / "metrics.jsonl").exists() else [0])
                   > EVERY):
            if time.time() > deadline or job[0].poll() is not None:
                return
            time.sleep(0.05)
        job[1].send_signal(signal.SIGKILL)
        job[0].send_signal(signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_shards_train_like_the_folder_and_slurm_processes_like_one(tmp_path):
    realdata.digits_colour(tmp_path / "digits", num_train=200, num_val=40, num_test=40)
    shard = subprocess.run(
        [sys.executable, "-m", "mmjax.data.shard", "--input", str(tmp_path / "digits"),
         "--output", str(tmp_path / "shards"), "--shard_mb", "0.05"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert shard.returncode == 0, shard.stderr[-3000:]
    assert "train: 200 records in" in shard.stdout

    two = _srun(tmp_path / "two", tmp_path / "shards")
    killer = _kill_after_checkpoint(tmp_path / "two", two)
    # Meanwhile, one process here: on the folder, then on its shards.
    folder_losses = _in_process(tmp_path / "folder", tmp_path / "digits")
    reference = _in_process(tmp_path / "one", tmp_path / "shards")
    killer.join(timeout=600)
    for p in two:
        p.communicate(timeout=60)
    before = _losses(tmp_path / "two")
    assert max(before) < STEPS, "the job finished before it was killed"

    errs = _finish(_srun(tmp_path / "two", tmp_path / "shards"))
    assert f"resumed from checkpoint step {EVERY}" in errs[0]
    assert "topology (SLURM): process 1 of 2" in errs[1]

    resumed = _losses(tmp_path / "two")
    assert sorted(reference) == sorted(resumed) == sorted(folder_losses) == \
        list(range(1, STEPS + 1))
    want = np.asarray([reference[s][0] for s in range(1, STEPS + 1)])
    assert want[0] != want[-1]
    from_folder = np.asarray([folder_losses[s][0] for s in range(1, STEPS + 1)])
    assert np.abs(from_folder - want).max() <= 1e-6, "folder and shards: different losses"
    got = np.asarray([resumed[s][-1] for s in range(1, STEPS + 1)])
    rel = np.abs(got - want) / np.abs(want)
    assert rel.max() <= RTOL, f"1 vs 2 processes: worst relative loss difference {rel.max():.2e}"
    for step, values in resumed.items():  # logged before the kill and again after the resume
        assert np.ptp(values) <= 1e-7 * abs(values[0]), (step, values)
    assert any(len(v) == 2 for v in resumed.values())
