"""Data and parameter parallelism: the pmap path, the mesh (+FSDP) path, multi-host start-up.

Both paths run the same pure step functions of ``mmjax.trainer``; what differs is where arrays
live and who averages:

- ``PmapParallel`` (``parallel.mode="pmap"``): the state is replicated with a leading axis of
  size ``local_device_count`` and the step is ``jax.pmap(axis_name="data")``; gradients and
  metrics are averaged with ``lax.pmean`` inside the step. Since JAX 0.10 ``pmap`` is
  ``jit(shard_map)`` and ``device_put_replicated`` is gone, so the layout is built here.
- ``MeshParallel`` (``parallel.mode="mesh"``): ``jax.jit`` over a ``Mesh`` with axes
  ``("data", "fsdp")``. The batch is split over both axes; with ``parallel.fsdp`` > 1 every
  parameter and optimizer-state leaf is split along its largest ``fsdp``-divisible dimension
  (ZeRO-3 style; never the layer axis of a scanned encoder's stacked leaves) and XLA inserts
  the all-gathers and reduce-scatters. The step sees global arrays, so its means are global
  means and no explicit collective is written.

Checkpoints always hold one logical copy as a global ``jax.Array``: replicated on the pmap path,
sharded on the mesh path. Restoring passes the current run's target shardings, so a checkpoint
saved on 8 devices restores on 1 and back, and pmap checkpoints restore under mesh.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax.models import scan
from mmjax.models.paths import path_str

log = logging.getLogger(__name__)

AXIS = "data"
FSDP_AXIS = "fsdp"
MODES = ("pmap", "mesh")


def detected_cluster() -> str:
    """The multi-process cluster environment this process runs in, as JAX detects it ("" if
    none): SLURM (``srun``: ``SLURM_NTASKS`` > 1), Open MPI (``mpirun``:
    ``OMPI_COMM_WORLD_SIZE`` > 1), a Cloud TPU pod (``TPU_WORKER_HOSTNAMES`` lists several
    hosts), or any environment JAX knows when ``MMJAX_DISTRIBUTED=auto`` (Kubernetes included,
    which needs the ``kubernetes`` client)."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return "SLURM"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "TPU pod"
    if env.get("MMJAX_DISTRIBUTED", "") == "auto":
        return "auto"
    return ""


def maybe_initialize_distributed(
    coordinator: str = "", num_processes: int = 0, process_id: int = -1
) -> str:
    """Starts ``jax.distributed`` when flags or the environment describe a multi-process job,
    and returns how the topology was found: ``"flags"``, ``"environment"``, the cluster's
    name, or ``"single process"``.

    One path, in this order: explicit arguments (``--coordinator_address`` ...); else
    ``MMJAX_COORDINATOR``/``MMJAX_NUM_PROCESSES``/``MMJAX_PROCESS_ID``; else the cluster JAX
    detects itself (:func:`detected_cluster`), whose variables give the coordinator, the process
    count and this process's index; else one process. On a CPU the cross-process collectives
    use gloo. The topology (processes, devices) is logged.
    """
    how = "flags" if coordinator else ""
    if not coordinator and os.environ.get("MMJAX_COORDINATOR"):
        how = "environment"
    coordinator = coordinator or os.environ.get("MMJAX_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("MMJAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("MMJAX_PROCESS_ID", "-1"))
    cluster = "" if coordinator else detected_cluster()
    if coordinator or cluster:
        platforms = jax.config.jax_platforms  # type: ignore[attr-defined]
        if platforms == "cpu" or (platforms in (None, "") and not cluster):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"multi-process start needs num_processes >= 1 and 0 <= process_id < "
                f"num_processes, got {num_processes=} {process_id=}"
            )
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif cluster:
        how = cluster
        jax.distributed.initialize()
    else:
        how = "single process"
    log.info("topology (%s): process %d of %d, %d local / %d global devices (%s)", how,
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count(), jax.default_backend())
    return how


def _first_local(x: jax.Array) -> np.ndarray:
    """Host copy of a replicated value (works when the array spans other processes too)."""
    return np.asarray(x.addressable_data(0))


class PmapParallel:
    mode = "pmap"
    axis_name: str | None = AXIS

    def __init__(self) -> None:
        self.n_local = jax.local_device_count()
        local_mesh = Mesh(np.asarray(jax.local_devices()), (AXIS,))
        self._local = NamedSharding(local_mesh, PartitionSpec(AXIS))
        self._global = NamedSharding(Mesh(np.asarray(jax.devices()), (AXIS,)), PartitionSpec())

    def checkpoint_target(self, state: Any) -> Any:
        """Abstract state with the sharding checkpoints are saved and restored with."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self._global), state
        )

    def put_state(self, state: Any) -> Any:
        """One logical state (host, or a restored global array) → replicated on local devices."""

        def put(x: Any) -> jax.Array:
            x = _first_local(x) if isinstance(x, jax.Array) else np.asarray(x)
            return jax.device_put(np.broadcast_to(x, (self.n_local, *x.shape)), self._local)

        return jax.tree.map(put, state)

    def state_for_checkpoint(self, rstate: Any) -> Any:
        """Replicated pmap state → one global fully-replicated array per leaf (no host copy)."""

        def gather(x: jax.Array) -> jax.Array:
            shards = [s.data.reshape(s.data.shape[1:]) for s in x.addressable_shards]
            return jax.make_array_from_single_device_arrays(x.shape[1:], self._global, shards)

        return jax.tree.map(gather, rstate)

    def put_batch(self, batch: Any) -> Any:
        """Per-process batch [B, ...] → [local_devices, B / local_devices, ...] on device.

        The copy starts at once (asynchronously), so preparing the next batch overlaps the step.
        """

        def put(x: Any) -> jax.Array:
            x = np.asarray(x)
            if x.shape[0] % self.n_local:
                raise ValueError(
                    f"per-process batch of {x.shape[0]} does not split over {self.n_local} "
                    "local devices (batch_size must be a multiple of the device count)"
                )
            return jax.device_put(
                x.reshape(self.n_local, x.shape[0] // self.n_local, *x.shape[1:]), self._local
            )

        return jax.tree.map(put, batch)

    def put_frozen(self, tree: Any) -> Any:
        """A read-only tree the step takes as an extra argument (a distillation teacher's
        variables): replicated on the local devices like the state."""
        return self.put_state(tree)

    def compile_train(self, fn: Callable, frozen: Any = None) -> Callable:
        """``fn(state, batch[, frozen])``: pmap maps every argument, ``frozen`` included."""
        return jax.pmap(fn, axis_name=AXIS, donate_argnums=(0,))

    def compile_eval(self, fn: Callable) -> Callable:
        return jax.pmap(fn, axis_name=AXIS)

    def fetch(self, tree: Any) -> Any:
        """Host values of replicated step outputs (metrics), from the first local device."""
        return jax.tree.map(lambda x: _first_local(x)[0], tree)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**10, *,
              stacked: bool = False) -> PartitionSpec:
    """Shards the largest dimension divisible by ``fsdp``; small or indivisible leaves replicate.

    ``stacked`` (a leaf of a scanned encoder, ``[depth, ...]``) never shards the layer axis: the
    scan slices one layer per iteration, and a layer axis split over devices would make every
    iteration gather the whole stack (MaxText leaves its ``layers`` axis unsharded likewise).
    """
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    for dim in sorted(range(int(stacked), len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return PartitionSpec(*spec)
    return PartitionSpec()


class MeshParallel:
    mode = "mesh"
    axis_name: str | None = None

    def __init__(self, fsdp: int = 1) -> None:
        n = jax.device_count()
        if fsdp < 1 or n % fsdp:
            raise ValueError(f"parallel.fsdp={fsdp} must divide the {n} devices")
        self.fsdp = fsdp
        devices = np.asarray(jax.devices()).reshape(n // fsdp, fsdp)
        self.mesh = Mesh(devices, (AXIS, FSDP_AXIS))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec((AXIS, FSDP_AXIS)))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self._state_shardings: Any = None

    def shardings(self, state: Any) -> Any:
        def spec(path: tuple, x: Any) -> NamedSharding:
            stacked = scan.is_stacked(path_str(path)) and np.ndim(x) > 0
            return NamedSharding(self.mesh, fsdp_spec(np.shape(x), self.fsdp, stacked=stacked))

        return jax.tree_util.tree_map_with_path(spec, state)

    def checkpoint_target(self, state: Any) -> Any:
        shardings = self.shardings(state)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings
        )

    def put_state(self, state: Any) -> Any:
        self._state_shardings = self.shardings(state)

        def put(x: Any, s: NamedSharding) -> jax.Array:
            if isinstance(x, jax.Array) and x.sharding == s:
                return x
            if isinstance(x, jax.Array) and not x.is_fully_addressable:
                return jax.jit(lambda y: y, out_shardings=s)(x)
            return jax.device_put(np.asarray(x), s)

        return jax.tree.map(put, state, self._state_shardings)

    def state_for_checkpoint(self, state: Any) -> Any:
        return state

    def put_batch(self, batch: Any) -> Any:
        """This process's rows of the global batch → one global array sharded over the mesh."""
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(x)),
            batch,
        )

    def put_frozen(self, tree: Any) -> Any:
        """A read-only tree the step takes as an extra argument (a distillation teacher's
        variables), sharded like params (``parallel.fsdp``)."""
        return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree,
                            self.shardings(tree))

    def compile_train(self, fn: Callable, frozen: Any = None) -> Callable:
        """``fn(state, batch[, frozen])``; ``frozen``: the tree ``put_frozen`` placed."""
        if self._state_shardings is None:
            raise RuntimeError("put_state must run before compile_train (it fixes the shardings)")
        extra = () if frozen is None else (jax.tree.map(lambda x: x.sharding, frozen),)
        return jax.jit(
            fn,
            in_shardings=(self._state_shardings, self.batch_sharding, *extra),
            out_shardings=(self._state_shardings, self.replicated),
            donate_argnums=(0,),
        )

    def compile_eval(self, fn: Callable) -> Callable:
        return jax.jit(
            fn,
            in_shardings=(self._state_shardings, self.batch_sharding),
            out_shardings=self.replicated,
        )

    def fetch(self, tree: Any) -> Any:
        return jax.tree.map(_first_local, tree)


def make_parallel(parallel_cfg: Any) -> PmapParallel | MeshParallel:
    """The strategy named by ``config.parallel.mode`` (and ``parallel.fsdp`` for mesh)."""
    mode = parallel_cfg.mode
    fsdp = int(parallel_cfg.get("fsdp", 1) or 1)
    if mode == "pmap":
        if fsdp != 1:
            raise ValueError(f"parallel.fsdp={fsdp} needs parallel.mode='mesh'")
        return PmapParallel()
    if mode == "mesh":
        return MeshParallel(fsdp)
    raise ValueError(f"parallel.mode={mode!r} is not one of {MODES}")
