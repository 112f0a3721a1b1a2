"""Orbax checkpoints of the train state and the data-iterator state.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``; the newest ``keep`` steps and the best by
validation metric are preserved. Orbax writes a step under a temporary name and renames it when
complete, so a killed save never looks like a finished checkpoint. Saves are asynchronous (the
disk write overlaps training); a write that fails (a full disk) surfaces at the next save or at
the end, named with its own step, and leaves no temporary folder. Checkpoints that no longer
restore are moved aside, never deleted (:meth:`Checkpointer.restore_latest`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from mmjax import files
from mmjax.errors import ExplainedError

log = logging.getLogger(__name__)

HF_CONFIG = "hf_config.json"  # written next to an mmjax checkpoint converted from Hugging Face


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run's state."""

    summary = ""  # the cause in one line, for logs


class CheckpointWriteError(OSError, ExplainedError):
    """A checkpoint could not be written (full disk, lost permission, read-only mount); the
    message names the workdir and the step."""


class CheckpointReadError(ValueError):
    """A path is not a readable mmjax checkpoint; the message names it."""


# The validation metrics of a step are saved with it as this item (JSON), so that "best" can be
# found again after the run (``saved_steps``). Not Orbax's own ``metrics`` (what ``best_fn``
# writes): Orbax reads those for every step when a manager starts, and one damaged file would
# stop training before the damaged checkpoint could be set aside.
VAL_ITEM = "val"


def _drop_read_only_warning(record: logging.LogRecord) -> bool:
    """Orbax warns that a manager opened read-only (``saved_steps``) is read-only."""
    return "Given directory is read only" not in record.getMessage()


class Checkpointer:
    def __init__(
        self,
        workdir: str | Path,
        *,
        keep: int = 3,
        best_metric: str | None = "accuracy",
        best_mode: str = "max",
        asynchronous: bool = True,
    ):
        self.directory = Path(workdir).absolute() / "checkpoints"
        preserve: list[Any] = [policies.LatestN(n=keep)]
        if best_metric:
            sign = 1.0 if best_mode == "max" else -1.0
            preserve.append(
                policies.BestN(
                    get_metric_fn=lambda m: sign * float(m[best_metric]),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            enable_async_checkpointing=asynchronous,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", VAL_ITEM), options=options
        )
        self.best_metric = best_metric
        self._pending: int | None = None  # the step of an asynchronous save not yet finished

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict[str, Any] | None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Saves ``state`` (a single-copy pytree) and the JSON data-iterator state at ``step``,
        and ``metrics`` (the step's validation metrics, if it ran validation) with them.

        The previous asynchronous save is finished first, so a write that failed in the
        background is reported with its own step. A failed write leaves no temporary folder
        behind and raises :class:`CheckpointWriteError`; older checkpoints are untouched.
        """
        self.wait()
        items = {"state": ocp.args.StandardSave(state),
                 "data": ocp.args.JsonSave(data_state or {})}
        if metrics is not None:
            items[VAL_ITEM] = ocp.args.JsonSave({k: float(v) for k, v in metrics.items()})
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None
        self._pending = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(**items),
                metrics=metrics,
                force=True,
            )
        except Exception as e:  # orbax raises many types for one cause: the write failed
            self._write_failed(e)

    def _write_failed(self, error: BaseException) -> None:
        step, self._pending = self._pending, None
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)
        cause = " ".join(f"{type(error).__name__}: {error}".split())
        raise CheckpointWriteError(
            f"cannot save checkpoint step {step} in workdir {self.directory.parent}: "
            f"{cause[:400]}") from error

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` into the structure, shapes and shardings of ``target``.

        ``target`` holds arrays or ``jax.ShapeDtypeStruct``s; their shardings decide where the
        restored arrays live, which is what lets a checkpoint move between topologies.
        """
        to_abstract = ocp.utils.to_shape_dtype_struct
        abstract = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else to_abstract(x), target
        )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types; all mean "this step is unusable"
            where = f"checkpoint step {step} in {self.directory / str(step)}"
            hint = ""
            if "mismatch" in str(e).lower() or "partial_restore" in str(e):
                # Orbax ends with "pass partial_restore=True", which is not what a user wants here.
                hint = (" its params/optimizer tree differs from this run's model (a changed "
                        "model config, e.g. model.scan_layers or a depth?): resume with the "
                        "config it was written with, or start a new workdir with "
                        "config.init_from set to this one (which converts scanned/unrolled "
                        "layers); the checkpoint is left as it is")
            error = CheckpointError(
                f"{where} cannot be restored: {type(e).__name__}: {e}\n"
                f"{where} cannot be restored:{hint or ' see the lines above'}"
            )
            error.summary = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            raise error from e
        return restored.state, dict(restored.data or {})

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest step that loads; None when there is no checkpoint.

        Steps that fail are tried newest first, one log line each. When an older step then
        restores into the same state, the newer ones are damaged (the model is the same) and
        are moved aside to ``checkpoints/<step>.damaged-<n>``, never deleted, so training can
        pass those steps again. If no step loads (e.g. the model config changed), nothing is
        moved and the newest step's error is raised.
        """
        steps = self.all_steps()
        if not steps:
            return None
        failed: list[tuple[int, CheckpointError]] = []
        for step in reversed(steps):
            try:
                state, data = self.restore(step, target)
            except CheckpointError as e:
                log.warning("checkpoint step %d cannot be restored: %s", step, e.summary)
                failed.append((step, e))
                continue
            for bad, error in failed:
                self._set_aside(bad, error.summary)
            if failed:
                self.manager.reload()
                log.warning("resuming from older checkpoint step %d", step)
            return step, state, data
        raise failed[0][1]

    def _set_aside(self, step: int, reason: str) -> Path:
        src = self.directory / str(step)
        n = 1
        while (dst := self.directory / f"{step}.damaged-{n}").exists():
            n += 1
        src.rename(dst)
        log.warning("checkpoint step %d is damaged (%s): moved to %s", step, reason, dst)
        return dst

    def wait(self) -> None:
        """Waits for the pending asynchronous save; its write error, if any, names its step."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._write_failed(e)
        self._pending = None

    def close(self) -> None:
        """Waits for pending asynchronous saves, then releases the manager."""
        try:
            self.wait()
        finally:
            self.manager.close()


# -------------------------------------------------- reading params without a train state


def workdir_of(path: Path) -> Path | None:
    """The workdir above a checkpoint path (for its hf_config.json / config.json), if any."""
    for p in (path, *path.parents[:3]):
        if (p / "checkpoints").is_dir():
            return p
    return None


def checkpoint_state_dir(path: str | Path) -> Path:
    """``…/checkpoints/<newest step>/state`` for a workdir, a step directory or a state dir."""
    p = Path(path)
    if p.name != "state" and not (p / "state").is_dir():
        steps_dir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        steps = sorted(int(s.name) for s in steps_dir.glob("*") if s.name.isdigit())
        if not steps:
            raise CheckpointReadError(f"{path}: neither a Hugging Face folder (config.json) nor "
                                      "an mmjax checkpoint (DIR/checkpoints/<step>/state)")
        p = steps_dir / str(steps[-1])
    if p.name != "state":
        p = p / "state"
    if not p.is_dir():
        raise CheckpointReadError(f"{path}: no checkpoint state at {p}")
    return p


def read_state(state_dir: str | Path,
               keys: tuple[str, ...] = ("params",)) -> dict[str, Any]:
    """The subtrees ``keys`` of a saved state (those present), as host numpy arrays.

    The target is built from the checkpoint's own metadata with numpy leaves, so the saved
    shardings are never used: a checkpoint written on 8 devices (mesh, FSDP) reads on 1, and
    the optimizer state is not read at all when ``keys`` leaves it out.
    """
    state_dir = Path(state_dir).absolute()
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
        wanted = {k: meta[k] for k in keys if k in meta}
        if "params" in keys and "params" not in wanted:
            raise CheckpointReadError(f"{state_dir}: the checkpoint has no 'params'")
        item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted)
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
        tree = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    except CheckpointReadError:
        raise
    except Exception as e:  # orbax raises many types; all mean "unusable"
        raise CheckpointReadError(
            f"{state_dir}: cannot be restored: {type(e).__name__}: {e}") from e
    return {k: jax.tree.map(np.asarray, v) for k, v in tree.items()}


def read_checkpoint_params(path: str | Path) -> dict[str, Any]:
    """The ``params`` tree of an mmjax checkpoint as saved, as numpy arrays, without a target
    structure (:func:`read_state`): a training checkpoint (with optimizer state) and a
    converted one (params only) load alike, under any device count. A LoRA run's adapters stay
    as they are (``mmjax.optim.lora.read_model_params`` merges them)."""
    return jax.tree.map(np.asarray, read_state(checkpoint_state_dir(path))["params"])


def _saved_metrics(step_dir: Path) -> dict[str, float] | None:
    try:
        metrics = ocp.JsonCheckpointHandler().restore(epath.Path(step_dir / VAL_ITEM))
    except Exception:  # absent (no validation at that step, an older run) or damaged
        return None
    return dict(metrics) if isinstance(metrics, Mapping) else None


def saved_steps(workdir: str | Path) -> dict[int, dict[str, float] | None]:
    """``{step: the validation metrics saved with it, or None}`` of a training workdir.

    Read with a read-only Orbax manager: nothing is created, cleaned up or locked, so this is
    safe while a run is writing. Steps moved aside as damaged are not steps.
    """
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        return {}
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    logging.getLogger("absl").addFilter(_drop_read_only_warning)
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"), options=options)
    try:
        steps = sorted(manager.all_steps())
    finally:
        manager.close()
    return {int(step): _saved_metrics(directory / str(step)) for step in steps}


def write_checkpoint(workdir: str | Path, params: Mapping[str, Any],
                     hf_config: Mapping[str, Any] | None = None, step: int = 0) -> Path:
    """Writes ``{"params": params}`` as ``workdir/checkpoints/<step>/state`` (trainer layout)."""
    ckpt = Checkpointer(workdir, best_metric=None, asynchronous=False)
    ckpt.save(step, {"params": dict(params)}, {})
    ckpt.close()
    if hf_config is not None:
        files.write_atomic(Path(workdir) / HF_CONFIG,
                           json.dumps(dict(hf_config), indent=2) + "\n")
    return Path(workdir)
