"""Faults lose nothing: one writer per workdir, damaged checkpoints set aside, failed writes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.io.checkpoint import Checkpointer, CheckpointError
from mmjax.trainer import workdir as workdir_lib

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "configs/default.py:tiny", "--config.total_steps=20",
        "--config.checkpoint_every=10", "--config.eval_every=10"]


def _train(workdir: Path, *extra: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m mmjax.train`` on the tiny default; ``prelude`` runs first in the process."""
    code = prelude + "\nimport runpy, sys\nsys.argv = ['mmjax.train'] + sys.argv[1:]\n" \
        "runpy.run_module('mmjax.train', run_name='__main__')\n"
    return subprocess.run([sys.executable, "-c", code, *TINY, "--workdir", str(workdir), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def _lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# --- one writer per workdir ----------------------------------------------------------------


def test_second_lock_names_the_holder_and_a_dead_holder_frees_it(tmp_path):
    with (workdir_lib.lock(tmp_path), pytest.raises(workdir_lib.WorkdirInUseError) as info,
          workdir_lib.lock(tmp_path)):
        pass
    assert str(tmp_path) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    # A holder killed with SIGKILL leaves the file but not the lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom mmjax.trainer import workdir\n"
         "with workdir.lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)",
         str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with (pytest.raises(workdir_lib.WorkdirInUseError, match=f"pid {holder.pid}"),
          workdir_lib.lock(tmp_path)):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir_lib.lock(tmp_path):
        assert (tmp_path / workdir_lib.LOCK_FILE).is_file()


def test_train_on_a_workdir_in_use_stops_before_writing(tmp_path):
    # JAX logs every compilation: the second run must stop before its first one.
    with workdir_lib.lock(tmp_path):
        run = _train(tmp_path, prelude="import jax\njax.config.update('jax_log_compiles', True)")
    assert run.returncode != 0
    last = _last_line(run.stderr)
    assert last.startswith("error: WorkdirInUseError") and str(tmp_path) in last, last
    assert f"pid {os.getpid()}" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir_lib.LOCK_FILE]
    assert "Compiling" not in run.stderr, run.stderr[-2000:]  # nothing compiled before the lock


# --- damaged checkpoints are set aside -------------------------------------------------------


def _state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32)),
            "step": jnp.asarray(seed, jnp.int32)}


def _truncate(step_dir: Path) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            with f.open("r+b") as fh:
                fh.truncate(32)


def test_damaged_newest_checkpoint_is_set_aside_and_its_step_saved_again(tmp_path):
    ckpt = Checkpointer(tmp_path, best_metric=None)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"next_index": step})
    ckpt.close()
    _truncate(tmp_path / "checkpoints" / "3")
    _truncate(tmp_path / "checkpoints" / "2")

    ckpt = Checkpointer(tmp_path, best_metric=None)
    step, state, data = ckpt.restore_latest(_state(0))
    assert step == 1 and data == {"next_index": 1}
    np.testing.assert_array_equal(state["w"], _state(1)["w"])
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["1", "2.damaged-1", "3.damaged-1"]
    ckpt.save(2, _state(2), {"next_index": 2})  # the step can be written again
    ckpt.close()
    assert Checkpointer(tmp_path, best_metric=None).all_steps() == [1, 2]


def test_checkpoints_of_another_model_are_not_set_aside(tmp_path):
    ckpt = Checkpointer(tmp_path, best_metric=None)
    ckpt.save(1, _state(1), {})
    ckpt.save(2, _state(2), {})
    ckpt.close()
    other = {"w": jnp.zeros((8, 8)), "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(CheckpointError, match="step 2"):
        Checkpointer(tmp_path, best_metric=None).restore_latest(other)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


@pytest.mark.slow
def test_train_resumes_past_a_truncated_newest_checkpoint(tmp_path):
    first = _train(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    _truncate(tmp_path / "checkpoints" / "20")
    again = _train(tmp_path, "--config.total_steps=30")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "moved to" in again.stderr and "Traceback" not in again.stderr
    assert (tmp_path / "checkpoints" / "20.damaged-1").is_dir()
    assert {"20", "30"} <= {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert max(d["step"] for d in _lines(tmp_path)) == 30


# --- a write that fails ----------------------------------------------------------------------

# Orbax's save made to fail at step 20 as a full disk does: a temporary folder is left behind and
# an OSError(ENOSPC) raised.
_FULL_DISK = textwrap.dedent(f"""
    import errno, os
    import orbax.checkpoint as ocp
    _save = ocp.CheckpointManager.save
    def save(self, step, *args, **kwargs):
        if step == 20:
            os.makedirs(os.path.join(self.directory, "20.orbax-checkpoint-tmp-7"), exist_ok=True)
            raise OSError({errno.ENOSPC}, "No space left on device")
        return _save(self, step, *args, **kwargs)
    ocp.CheckpointManager.save = save
""")


@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_cleanly_and_the_run_resumes(tmp_path):
    run = _train(tmp_path, prelude=_FULL_DISK)
    assert run.returncode != 0
    last = _last_line(run.stderr)
    assert last.startswith("error: CheckpointWriteError") and "step 20" in last, last
    assert str(tmp_path) in last and "No space left on device" in last
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
    before = (tmp_path / "metrics.jsonl").read_text()

    again = _train(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from checkpoint step 10" in again.stderr
    assert (tmp_path / "metrics.jsonl").read_text().startswith(before)  # only appended
    assert {"10", "20"} <= {p.name for p in (tmp_path / "checkpoints").iterdir()}
