"""Orbax checkpoints of the train state and the data-iterator state.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``. Saves are asynchronous (the device→host copy
happens before ``save`` returns, the disk write in the background); the newest ``keep`` steps and
the best by validation metric are preserved. Orbax writes a step under a temporary name and
renames it when complete, so a killed save never looks like a finished checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored into this run's state."""


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
            self.directory, item_names=("state", "data"), options=options
        )
        self.best_metric = best_metric

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
        """Saves ``state`` (a single-copy pytree) and the JSON data-iterator state at ``step``."""
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state or {}),
            ),
            metrics=metrics,
            force=True,
        )

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
            raise CheckpointError(
                f"{where} cannot be restored: {type(e).__name__}: {e}\n"
                f"{where} cannot be restored:{hint or ' see the lines above'}"
            ) from e
        return restored.state, dict(restored.data or {})

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Restores the newest step that loads; None when there is no checkpoint.

        A step that fails (truncated files, a different model) is reported and the next older
        one is tried; if none loads, the newest step's error is raised.
        """
        steps = self.all_steps()
        if not steps:
            return None
        first_error: CheckpointError | None = None
        for step in reversed(steps):
            try:
                state, data = self.restore(step, target)
                if first_error is not None:
                    log.warning("resuming from older checkpoint step %d", step)
                return step, state, data
            except CheckpointError as e:
                log.warning("%s", e)
                first_error = first_error or e
        assert first_error is not None
        raise first_error

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending asynchronous saves, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
