"""Parallelism changes nothing: 1 vs 8 devices, pmap vs mesh vs FSDP, 2 processes, accumulation.

Device counts and jax.distributed must be fixed before JAX starts, so every topology runs in a
subprocess (tests/equivalence_worker.py) on the tiny default with dropout 0 for 5 steps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from mmjax import trainer
from mmjax.data import pipeline
from mmjax.trainer import step as step_lib

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMJAX_")}
    env.update(
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        # conftest's compile-speed flags, and this worker's device count.
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                  f"--xla_force_host_platform_device_count={devices}".strip(),
        **extra,
    )
    return env


def _losses(stdout: str) -> dict[str, list[float]]:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("LOSSES "):
            _, spec, values = line.split(" ", 2)
            out[spec] = json.loads(values)
    return out


def _worker(devices: int, specs: list[str], eq_dir: Path) -> dict[str, list[float]]:
    result = subprocess.run(
        [sys.executable, "tests/equivalence_worker.py", *specs],
        cwd=ROOT, env=_env(devices, MMJAX_EQ_DIR=str(eq_dir)), capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return _losses(result.stdout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(specs: list[str], eq_dir: Path) -> dict[str, list[float]]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "tests/equivalence_worker.py", *specs],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(4, MMJAX_EQ_DIR=str(eq_dir), MMJAX_COORDINATOR=f"localhost:{port}",
                     MMJAX_NUM_PROCESSES="2", MMJAX_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return _losses(outs[0][0])


def _assert_close(name: str, got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == 5, (name, got)
    rel = np.abs(np.asarray(got) - np.asarray(want)) / np.abs(np.asarray(want))
    assert rel.max() <= RTOL, f"{name}: worst relative loss difference {rel.max():.2e}"


@pytest.mark.slow
def test_losses_agree_across_devices_modes_and_processes(tmp_path):
    single = _worker(1, ["pmap", "pmap:accum4"], tmp_path / "one")
    reference = single["pmap"]
    assert np.all(np.isfinite(reference)) and reference[0] != reference[-1]
    _assert_close("1 device, grad_accum_steps=4", single["pmap:accum4"], reference)

    eight = _worker(8, ["pmap", "mesh", "mesh:4"], tmp_path / "eight")
    _assert_close("8 devices pmap", eight["pmap"], reference)
    _assert_close("8 devices mesh data=8", eight["mesh"], reference)
    _assert_close("8 devices mesh data=2 x fsdp=4", eight["mesh:4"], reference)

    # Across processes the FSDP mesh is the demanding case: parameters are sharded over devices of
    # both processes and every step all-gathers and reduce-scatters through gloo.
    two = _two_processes(["mesh:4"], tmp_path / "two")
    _assert_close("2 processes x 4 devices mesh data=2 x fsdp=4", two["mesh:4"], reference)


@pytest.mark.slow
def test_gradcache_accumulation_matches_full_batch_for_contrastive_loss(tmp_path):
    config = get_config("tiny")
    config.unlock()
    config.data.text = "caption"
    config.model.heads.clip = {"kind": "contrastive", "embed_dim": 16}
    config.losses.clip = 0.5
    run = trainer.setup(config, tmp_path)  # vocabulary and classes from the data
    model, tasks, weights = run.model, run.tasks, run.weights
    batch = next(pipeline.train_iterator(config.data, batch_size=16, seed=3))
    params = model.init(jax.random.PRNGKey(7), batch)["params"]
    params = jax.tree.map(  # random head weights: the zero-initialised classifier hides errors
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params
    )
    rng, step = jax.random.PRNGKey(0), jnp.int32(3)
    common = dict(model=model, tasks=tasks, weights=weights)

    def full(p):
        return step_lib.loss_fn(p, {}, batch, rng, step, train=True, **common)

    (loss, (metrics, _)), want = jax.jit(jax.value_and_grad(full, has_aux=True))(params)
    got, got_metrics, _ = jax.jit(
        lambda p: step_lib.accumulated_grads(p, {}, batch, rng, step, accum_steps=4, **common)
    )(params)
    np.testing.assert_allclose(got_metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(got_metrics["clip_loss"], metrics["clip_loss"], rtol=1e-6)
    global_scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want))
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        # Relative to the leaf, floored at 1% of the largest gradient: some leaves (key biases)
        # have a true gradient of exactly zero, where only rounding noise remains.
        scale = max(float(jnp.abs(w).max()), 1e-2 * global_scale)
        err = float(jnp.abs(g - w).max()) / scale
        # float32 sums in another order (4 micro-batches, XLA's fusions) differ by ~1e-5; a wrong
        # GradCache share (a missing negative, a double-counted micro-batch) is > 1e-2.
        assert err < 3e-5, f"{jax.tree_util.keystr(path)}: relative gradient error {err:.2e}"
    assert float(jnp.abs(got["heads"]["clip"]["logit_scale"])) > 0


def _cli(devices: int, workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config", "configs/default.py:tiny",
         "--workdir", str(workdir), *overrides],
        cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_checkpoints_move_between_topologies_and_modes(tmp_path):
    steps = [("8", "pmap", "1", 10), ("1", "mesh", "1", 15), ("8", "mesh", "4", 20)]
    previous = None
    for devices, mode, fsdp, total in steps:
        result = _cli(int(devices), tmp_path, f"--config.total_steps={total}",
                      f"--config.parallel.mode={mode}", f"--config.parallel.fsdp={fsdp}")
        assert result.returncode == 0, result.stderr[-4000:]
        if previous is not None:
            assert f"resumed from checkpoint step {previous}" in result.stderr
        previous = total
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in lines if r["split"] == "train"]
    assert train_steps == [5, 10, 15, 20]


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_zero(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmjax.train", "--config", "configs/default.py:tiny",
         "--workdir", str(tmp_path), "--config.total_steps=100000",
         "--config.checkpoint_every=100000", "--config.eval_every=100000",
         "--config.log_every=2"],
        cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n")):
        time.sleep(0.5)
    assert metrics.exists(), "training never logged a step"
    time.sleep(1.0)
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert time.time() - sent < 30
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= last_logged

    resumed = _cli(1, tmp_path, f"--config.total_steps={saved[-1] + 2}",
                   "--config.log_every=2", "--config.eval_every=100000")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint step {saved[-1]}" in resumed.stderr


@pytest.mark.parametrize("bad", ["--config.parallel.mode=ring", "--config.parallel.fsdp=3"])
def test_bad_parallel_config_is_named(tmp_path, bad):
    extra = ["--config.parallel.mode=mesh"] if "fsdp" in bad else []
    result = _cli(8, tmp_path, bad, *extra)
    assert result.returncode != 0
    assert "parallel." in result.stderr.strip().splitlines()[-1]


def test_fsdp_never_shards_the_layer_axis_of_stacked_leaves():
    """A scanned encoder slices one layer per iteration: its stacked leaves are split along a
    feature axis, even where the layer axis is the largest divisible one."""
    from jax.sharding import PartitionSpec as P

    from mmjax.runtime import parallel

    assert parallel.fsdp_spec((48, 32), 4) == P("fsdp", None)
    assert parallel.fsdp_spec((48, 32), 4, stacked=True) == P(None, "fsdp")
    assert parallel.fsdp_spec((48, 6), 4, stacked=True) == P()  # only the layer axis divides
    # The path decides: shardings() marks leaves under layers/ or co_layers/ as stacked, in the
    # params and in the optimizer state that mirrors them. (A 1-device mesh; fsdp=4 is set on
    # the instance only to choose the specs, which is all this checks.)
    mesh = parallel.MeshParallel(1)
    mesh.fsdp = 4
    rng = np.random.default_rng(0)
    leaf = rng.standard_normal((48, 32)).astype(np.float32)
    state = {"params": {"text": {"encoder": {"layers": {"mlp": {"kernel": leaf}},
                                             "final_norm": {"scale": leaf}}},
                        "fusion": {"co_layers": {"image": {"kernel": leaf}}}},
             "opt_state": ({"mu": {"text": {"encoder": {"layers": {"mlp": {"kernel": leaf}}}}}},)}
    specs = jax.tree.map(lambda s: s.spec, mesh.shardings(state))
    assert specs["params"]["text"]["encoder"]["layers"]["mlp"]["kernel"] == P(None, "fsdp")
    assert specs["params"]["fusion"]["co_layers"]["image"]["kernel"] == P(None, "fsdp")
    assert specs["opt_state"][0]["mu"]["text"]["encoder"]["layers"]["mlp"]["kernel"] == P(
        None, "fsdp")
    assert specs["params"]["text"]["encoder"]["final_norm"]["scale"] == P("fsdp", None)
