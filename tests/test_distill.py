"""Distillation: the KL term against torch, where gradients go, a teacher trained here and a
smaller student taught by it (pmap and mesh), exact resume, and the errors for a teacher that
cannot teach. Expected values come from torch, from numpy, or from what the teacher's own run
logged: never from the code under test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.folder import get_config
from mmjax import trainer
from mmjax.data import pipeline
from mmjax.io.checkpoint import read_state
from mmjax.trainer import distill, loop
from mmjax.trainer import runs as runs_lib
from mmjax.trainer import step as step_lib
from tests.test_folder import make_dataset

WEIGHT, TEMPERATURE = 0.5, 2.0


def _torch_kl(student: np.ndarray, teacher: np.ndarray, t: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)) per example, by torch."""
    s = torch.tensor(student, dtype=torch.float64)
    log_p_t = F.log_softmax(torch.tensor(teacher, dtype=torch.float64) / t, dim=-1)
    kl = F.kl_div(F.log_softmax(s / t, dim=-1), log_p_t, log_target=True, reduction="none")
    return t * t * kl.sum(-1)


def test_kl_term_matches_torch_and_its_gradient():
    rng = np.random.default_rng()
    student = rng.normal(0, 3, (9, 6)).astype(np.float32)
    teacher = rng.normal(0, 3, (9, 6)).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], np.float32)
    for t in (1.0, 2.5):
        want = _torch_kl(student, teacher, t)[valid > 0].mean().item()
        got = float(distill.kl_term(jnp.asarray(student), jnp.asarray(teacher), t, valid))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
        # d/d student logits, against torch autograd of the same mean
        s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
        log_p_t = F.log_softmax(torch.tensor(teacher, dtype=torch.float64) / t, dim=-1)
        kl = F.kl_div(F.log_softmax(s / t, -1), log_p_t, log_target=True, reduction="none")
        (t * t * kl.sum(-1)[torch.tensor(valid > 0)].mean()).backward()
        grad = jax.grad(lambda x, t=t: distill.kl_term(x, jnp.asarray(teacher), t, valid))(
            jnp.asarray(student))
        np.testing.assert_allclose(np.asarray(grad), s.grad.numpy(), rtol=1e-4, atol=1e-6)
    same = float(distill.kl_term(jnp.asarray(teacher), jnp.asarray(teacher), TEMPERATURE))
    assert abs(same) < 1e-6


# --- a teacher trained here, a smaller student taught by it -------------------------------------


def _config(data: Path, **distill_cfg) -> object:
    c = get_config("tiny")
    c.data.path = str(data)
    c.checkpoint_every = 6
    c.model.dropout = 0.0  # pmap and mesh draw dropout masks from different rng folds
    for k, v in distill_cfg.items():
        c.distill[k] = v
    return c


def _student_config(data: Path, teacher: Path, *, mode: str = "pmap") -> object:
    c = _config(data, teacher=str(teacher), weight=WEIGHT, temperature=TEMPERATURE)
    for tower in ("image", "text"):  # another architecture: half the width, no image layer
        c.model.encoders[tower].width = 32
        c.model.encoders[tower].mlp_dim = 128
    c.model.encoders.image.depth = 0
    c.model.fusion.width = 32
    c.model.fusion.depth = 1
    c.parallel.mode = mode
    c.seed = 1
    return c


def _lines(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The data, a teacher (configs/folder.py:tiny, 12 steps) and its student (12 steps)."""
    base = tmp_path_factory.mktemp("distill")
    data = make_dataset(base / "data", {"train": 64, "val": 24, "test": 40}, image_size=32)
    trainer.train_and_evaluate(_config(data), base / "teacher")
    trainer.train_and_evaluate(_student_config(data, base / "teacher"), base / "student")
    return {"data": data, "teacher": base / "teacher", "student": base / "student"}


def _logits(run: runs_lib.Run, batch: dict) -> np.ndarray:
    task, _ = runs_lib.output_task(run.config)
    inputs = {k: v for k, v in batch.items() if k != "valid"}
    out = jax.jit(run.build_model().apply)(run.variables(), inputs)
    return np.asarray(out[task]["logits"], np.float64)


@pytest.mark.slow
def test_student_logs_the_term_and_agreement_matches_an_independent_count(runs):
    lines = _lines(runs["student"])
    train = [r for r in lines if r["split"] == "train"]
    assert train
    for r in train:
        assert r["answer_distill_loss"] > 0
        assert r["loss"] == pytest.approx(r["answer_loss"] + WEIGHT * r["answer_distill_loss"],
                                          rel=1e-5)
    test = [r for r in lines if r["split"] == "test"][-1]
    teacher_test = [r for r in _lines(runs["teacher"]) if r["split"] == "test"][-1]
    assert test["distill_teacher_accuracy"] == pytest.approx(teacher_test["accuracy"], abs=1e-9)

    # Agreement and KL recomputed from both checkpoints, read back from their workdirs.
    student, teacher = runs_lib.load(runs["student"]), runs_lib.load(runs["teacher"])
    same, kls = [], []
    for batch in pipeline.eval_batches(student.config.data, "test", batch_size=16,
                                       tokenizer=student.tokenizer):
        keep = np.asarray(batch["valid"]) > 0
        s, t = _logits(student, batch)[keep], _logits(teacher, batch)[keep]
        same += list(s.argmax(1) == t.argmax(1))
        kls += list(_torch_kl(s, t, 1.0).numpy())
    assert len(same) == 40
    assert test["distill_agreement"] == pytest.approx(np.mean(same), abs=1e-9)
    assert test["distill_kl"] == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_gradients_reach_the_student_only(runs):
    s = loop.setup(_student_config(runs["data"], runs["teacher"]), runs["student"])
    student = runs_lib.load(runs["student"])
    batch = next(iter(pipeline.eval_batches(s.config.data, "val", batch_size=8,
                                            tokenizer=s.tokenizer)))
    teacher_vars = jax.tree.map(jnp.asarray, s.teacher.variables)

    def loss(params, teacher, spec):
        return step_lib.loss_fn(params, student.model_state, batch, None, jnp.int32(0),
                                model=s.model, tasks=s.tasks, weights=s.weights, train=False,
                                teacher=teacher, distill=spec)[0]

    g_student, g_teacher = jax.jit(jax.grad(lambda p, t: loss(p, t, s.teacher.spec),
                                            argnums=(0, 1)))(student.params, teacher_vars)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_teacher))
    g_plain = jax.jit(jax.grad(lambda p: loss(p, None, None)))(student.params)
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(g_student), jax.tree.leaves(g_plain), strict=True))
    assert diff > 1e-6  # the term moves the student


@pytest.mark.slow
def test_resume_with_distillation_equals_the_uninterrupted_run(runs, tmp_path):
    wd = tmp_path / "resumed"
    shutil.copytree(runs["student"], wd)
    shutil.rmtree(wd / "checkpoints" / "12")
    (wd / "metrics.jsonl").unlink()
    trainer.train_and_evaluate(_student_config(runs["data"], runs["teacher"]), wd)
    want = read_state(runs["student"] / "checkpoints" / "12" / "state")["params"]
    got = read_state(wd / "checkpoints" / "12" / "state")["params"]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = {r["step"]: r for r in _lines(wd) if r["split"] == "train"}
    first = {r["step"]: r for r in _lines(runs["student"]) if r["split"] == "train"}
    assert sorted(resumed) == [9, 12]
    for step, r in resumed.items():
        assert r["answer_distill_loss"] == first[step]["answer_distill_loss"]


@pytest.mark.slow
def test_mesh_path_computes_what_pmap_does(runs, tmp_path):
    trainer.train_and_evaluate(
        _student_config(runs["data"], runs["teacher"], mode="mesh"), tmp_path / "mesh")
    mesh = [r for r in _lines(tmp_path / "mesh") if r["split"] == "train"]
    pmap = [r for r in _lines(runs["student"]) if r["split"] == "train"]
    assert [r["step"] for r in mesh] == [r["step"] for r in pmap] == [3, 6, 9, 12]
    for a, b in zip(mesh, pmap, strict=True):
        for key in ("loss", "answer_loss", "answer_distill_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


def _relabelled(data: Path, root: Path) -> Path:
    """``data`` with answers "true"/"false" instead of "yes"/"no" (the same images, copied:
    a link out of the dataset folder is refused)."""
    root.mkdir()
    shutil.copytree(data / "img", root / "img")
    for split in ("train", "val", "test"):
        lines = [json.loads(x) for x in (data / f"{split}.jsonl").read_text().splitlines()]
        (root / f"{split}.jsonl").write_text("".join(
            json.dumps({**r, "label": {"yes": "true", "no": "false"}[r["label"]]}) + "\n"
            for r in lines))
    return root


@pytest.mark.slow
def test_a_teacher_over_other_labels_or_inputs_is_refused(runs, tmp_path):
    c = _config(_relabelled(runs["data"], tmp_path / "data"))
    c.total_steps = c.eval_every = c.checkpoint_every = c.log_every = 1
    c.optimizer.warmup_steps = 0
    trainer.train_and_evaluate(c, tmp_path / "other")
    with pytest.raises(distill.DistillError, match="label vocabulary"):
        loop.setup(_student_config(runs["data"], tmp_path / "other"), tmp_path / "s1")
    c = _student_config(runs["data"], runs["teacher"])
    c.data.image_size = 24
    with pytest.raises(distill.DistillError, match=r"data\.image_size=32"):
        loop.setup(c, tmp_path / "s2")
    c = _student_config(runs["data"], runs["teacher"])
    c.grad_accum_steps = 2
    with pytest.raises(distill.DistillError, match="grad_accum_steps"):
        loop.setup(c, tmp_path / "s3")
    c = _student_config(runs["data"], tmp_path / "nowhere")
    with pytest.raises(distill.DistillError, match="nowhere"):
        loop.setup(c, tmp_path / "s4")


@pytest.mark.slow
def test_the_student_reads_text_with_the_teachers_tokenizer(runs, tmp_path):
    theirs = (runs["teacher"] / "tokenizer.json").read_bytes()
    c = _student_config(runs["data"], runs["teacher"])
    distill.adopt_tokenizer(c, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "tokenizer.json").read_bytes() == theirs
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "tokenizer.json").write_text("{}")  # a resumed run keeps its own
    distill.adopt_tokenizer(c, tmp_path / "own")
    assert (tmp_path / "own" / "tokenizer.json").read_text() == "{}"
