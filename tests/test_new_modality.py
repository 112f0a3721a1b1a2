"""A modality mmjax does not ship, added from this file alone: point clouds (``"points":
"p.csv"``, 16 (x, y) points per record) with their own decode op and tower, registered here.

With them, a folder model of points and questions trains, predicts, evaluates with the points
dropped, explains and exports through the library's own entry points, with no other file of
mmjax changed (docs/architecture.md follows the same steps). The questions need both
modalities: "are the points on the left ?" or "... at the top ?", answered by where the points'
mean lies, so a model that reads both answers far above chance and one without the points
cannot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import folder as folder_config
from mmjax import modalities
from mmjax.inference import export, predict
from mmjax.inference.checkpoint_metrics import checkpoint_metrics
from mmjax.interpret.explain import explain
from mmjax.modalities import base as modalities_base
from mmjax.models import encoders, layers
from mmjax.pp import ops
from mmjax.trainer import loop

N_POINTS = 16
ROOT = Path(__file__).resolve().parents[1]


# --- the modality: a decode op, the Modality, a tower ------------------------------------------


def read_points(path: str, length: int = N_POINTS) -> np.ndarray:
    """A CSV of ``x,y`` rows → float32 [length, 2] (cut, or padded by repeating the last)."""
    xy = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    if xy.shape[1] != 2 or not len(xy) or not np.isfinite(xy).all():
        raise ValueError(f"expected finite x,y rows, got shape {xy.shape}")
    return np.concatenate([xy, np.repeat(xy[-1:], max(length - len(xy), 0), 0)])[:length]


@ops.register("decode_points", cacheable=True)
def _decode_points(ctx: ops.Context, length: int = N_POINTS, key: str = "points") -> ops.OpFn:
    def fn(ex: ops.Example, rng: Any) -> ops.Example:
        value = ex[key]
        if isinstance(value, np.ndarray):  # decoded already (cached, or a placeholder)
            return ex
        return {**ex, key: read_points(value, length)}

    return fn


class PointsTower(nn.Module):
    """Each point embedded by a small MLP, plus a learned position per point."""

    width: int = 32
    opts: layers.Options = layers.Options()

    @nn.compact
    def __call__(self, points: jax.Array, *, train: bool = False) -> dict[str, Any]:
        x = nn.Dense(self.width, name="embed")(points.astype(jnp.float32))
        x = nn.Dense(self.width, name="mix")(nn.gelu(x))
        pos = self.param("pos", nn.initializers.normal(1.0), (1, points.shape[1], self.width))
        x = x + pos
        return {"tokens": x, "pooled": x.mean(axis=1), "mask": None}


POINTS = modalities.Modality(
    name="points",
    towers=("points_mlp",),
    load=lambda path, ctx: read_points(path),
    placeholder=lambda ctx: np.zeros((N_POINTS, 2), np.float32),
    required_ops=("decode_points",),
    default_pp="decode_points",
    synthetic=lambda b, ctx, tower, rng: rng.standard_normal((b, N_POINTS, 2)).astype(
        np.float32),
    describe=lambda leaf, dtype: f"{N_POINTS} (x, y) points, {dtype}",
)


def register_points() -> None:
    """What a module of your own does when imported (``config.imports`` names it)."""
    modalities.register(POINTS)
    encoders.ENCODERS.register("points_mlp", PointsTower)


# A module as a user would write it: config.imports names it, so every command knows points.
PLUGIN = "from tests.test_new_modality import register_points\n\nregister_points()\n"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The modality and its tower registered for this module's tests, and taken out after (so
    other tests see the built-in modalities only); yields the folder of the plugin module."""
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "points_plugin.py").write_text(PLUGIN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(modalities_base._REGISTRY, "points", POINTS)
        mp.setitem(encoders.ENCODERS._classes, "points_mlp", PointsTower)
        mp.syspath_prepend(str(plugins))
        yield plugins


# --- a folder dataset of points and questions -------------------------------------------------

QUESTIONS = {"are the points on the left ?": 0, "are the points at the top ?": 1}


def _write(root: Path, sizes: Mapping[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "pts").mkdir(parents=True)
    for split, n in sizes.items():
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                centre = rng.choice([-1.0, 1.0], size=2) * rng.uniform(0.3, 1.0, size=2)
                xy = centre + rng.normal(0, 0.3, size=(int(rng.integers(10, 20)), 2))
                name = f"pts/{split}_{i}.csv"
                np.savetxt(root / name, xy, delimiter=",", fmt="%.5f")
                question = str(rng.choice(list(QUESTIONS)))
                axis = QUESTIONS[question]  # left: x < 0; top: y > 0
                yes = centre[0] < 0 if axis == 0 else centre[1] > 0
                f.write(json.dumps({"points": name, "text": question,
                                    "label": "yes" if yes else "no"}) + "\n")
    return root


@pytest.fixture(scope="module")
def trained(registered, tmp_path_factory) -> tuple[Path, Path]:
    """(data, workdir) of configs/folder.py with a points tower, trained 300 steps."""
    base = tmp_path_factory.mktemp("points")
    data = _write(base / "data", {"train": 512, "val": 128, "test": 128})
    c = folder_config.get_config("tiny")
    with c.unlocked():
        c.model.encoders.points = {"kind": "points_mlp", "width": 32}
    c.data.path = str(data)
    c.data.pp_train = c.data.pp_eval = "tokenize|decode_points"
    c.imports = "points_plugin"
    c.total_steps, c.batch_size, c.eval_every, c.checkpoint_every = 300, 32, 300, 300
    c.optimizer.lr, c.optimizer.warmup_steps = 2e-3, 30
    loop.train_and_evaluate(c, base / "run")
    return data, base / "run"


@pytest.mark.slow
def test_a_registered_modality_trains_predicts_explains_and_exports(registered, trained,
                                                                    tmp_path):
    data, workdir = trained
    config = json.loads((workdir / "config.json").read_text())
    assert sorted(config["model"]["encoders"]) == ["points", "text"]  # the others removed

    # Evaluate: both modalities answer; without the points the model is at chance.
    full = checkpoint_metrics(workdir, split="test")
    dropped = checkpoint_metrics(workdir, split="test", drop_modalities=["points"])
    assert full["accuracy"] >= 0.9, full
    assert dropped["drop"] == ["points"] and dropped["accuracy"] <= 0.7, dropped

    # Predict on new records, written as a user would: the answers are the evaluated ones.
    out = predict.predict(workdir, data / "test.jsonl", tmp_path / "answers.jsonl", top_k=1)
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    gold = [json.loads(x)["label"] for x in (data / "test.jsonl").read_text().splitlines()]
    assert out["count"] == len(gold) == len(answers)
    hits = [a["predictions"][0]["label"] == g for a, g in zip(answers, gold, strict=True)]
    assert np.mean(hits) == pytest.approx(full["accuracy"], abs=1e-9)
    # The command line knows points too: the run's config.imports registers them there.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(registered)]),
           "JAX_PLATFORMS": "cpu"}
    cli = subprocess.run([sys.executable, "-m", "mmjax.predict", "--workdir", str(workdir),
                          "--input", str(data / "test.jsonl"), "--output",
                          str(tmp_path / "cli.jsonl"), "--top_k", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert (tmp_path / "cli.jsonl").read_text() == (tmp_path / "answers.jsonl").read_text()

    # Explain: every method gives the points a map over the input and the text its tokens.
    for method in ("relevance", "integrated_gradients", "occlusion"):
        result = explain(workdir, tmp_path / method, split="test", limit=4, method=method,
                         images=2)
        assert result["count"] == 4
        rec = json.loads((tmp_path / method / "explanations.jsonl").read_text().splitlines()[0])
        heat = np.asarray(rec["points"]["heatmap"])
        assert heat.ndim == 2 and np.isfinite(heat).all(), (method, heat)
        if method != "occlusion":  # occlusion zeroes 16 x 16 blocks: one for 16 points
            assert heat.size == N_POINTS * (2 if method == "integrated_gradients" else 1)
        assert len(rec["text"]["tokens"]) == len(rec["text"]["scores"]) > 0
        assert set(rec["modalities"]) == {"points", "text"}

    # Export: the artifact runs on jax alone and gives the in-process probabilities.
    info = export.export(workdir, tmp_path / "export", platforms=("cpu",))
    assert [x.split(".")[0] for x in info["inputs"]] == ["points", "text", "text"]
    exported = jax.export.deserialize((tmp_path / "export" / "model.jaxexport").read_bytes())
    x = np.load(tmp_path / "export" / "example_inputs.npz")
    probs = exported.call(*[x[f"arg{i}"] for i in range(len(x.files))])
    want = np.load(tmp_path / "export" / "example_outputs.npz")["probs"]
    np.testing.assert_allclose(np.asarray(probs), want, atol=1e-5)
    readme = (tmp_path / "export" / "README.md").read_text()
    assert f"{N_POINTS} (x, y) points, float32" in readme


def test_a_record_with_a_bad_points_file_is_named(registered, tmp_path):
    from mmjax.data import folder

    root = _write(tmp_path / "data", {"train": 4})
    (root / "pts" / "train_2.csv").write_text("1,2,3\n")
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:3: cannot decode points file"):
        folder.FolderSource(root, "train", ctx=ops.Context())
