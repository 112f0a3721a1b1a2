"""End-to-end training, resume, checkpoints and the CLI error contract, on the tiny default."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs.default import get_config
from mmjax import trainer
from mmjax.io.checkpoint import Checkpointer
from mmjax.io.writers import MetricWriter
from mmjax.trainer import loop

ROOT = Path(__file__).resolve().parents[1]


def _run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "mmjax.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def _lines(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_trains_writes_outputs_and_resumes(tmp_path):
    wd = tmp_path / "run"
    first = _run_cli("--config", "configs/default.py:tiny", "--workdir", str(wd))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "done: step 20" in first.stdout

    lines = _lines(wd)
    train = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for r in train:
        assert {"loss", "answer_loss", "lr", "steps_per_s"} <= set(r)
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["answer_loss"])
    val = [r for r in lines if r["split"] == "val"]
    assert [r["step"] for r in val] == [10, 20]
    for r in [*val, lines[-1]]:
        # The classification task's accuracy is the line's "accuracy", a mean over the 96
        # examples of the split alone: the 32 padding rows of the second eval batch (64) do not
        # count, so 96·accuracy is a whole number.
        assert r["accuracy"] == r["answer_accuracy"]
        assert abs(96 * r["accuracy"] - round(96 * r["accuracy"])) < 1e-4, r["accuracy"]
    assert [r["split"] for r in lines if r["step"] == 20][-1] == "test"
    assert sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == [
        10, 20,
    ]
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))

    second = _run_cli(
        "--config", "configs/default.py:tiny", "--workdir", str(wd), "--config.total_steps=30"
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from checkpoint step 20" in second.stderr
    new_train = [r for r in _lines(wd)[len(lines):] if r["split"] == "train"]
    assert [r["step"] for r in new_train] == [25, 30]


def test_cli_config_typo_names_key(tmp_path):
    result = _run_cli(
        "--config", "configs/default.py:tiny", "--workdir", str(tmp_path / "w"),
        "--config.no_such_key=1", timeout=120,
    )
    assert result.returncode != 0
    assert "no_such_key" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "w").exists()


def test_cli_unknown_config_argument_names_it(tmp_path):
    result = _run_cli(
        "--config", "configs/default.py:bogus_arg", "--workdir", str(tmp_path / "w"), timeout=120
    )
    assert result.returncode != 0
    assert "bogus_arg" in result.stderr.strip().splitlines()[-1]


def _tiny(**overrides) -> object:
    config = get_config("tiny")
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(tmp_path):
    config = _tiny(**{"optimizer.lr": 1e30, "optimizer.clip_norm": 0.0, "log_every": 1})
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step \d+"):
        trainer.train_and_evaluate(config, tmp_path)


def test_batch_size_not_divisible_by_devices_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 3)
    with pytest.raises(ValueError, match="batch_size=16"):
        trainer.setup(_tiny(), tmp_path)


def test_loss_without_head_is_named(tmp_path):
    config = get_config("tiny")
    config.unlock()
    config.losses.caption = 1.0
    with pytest.raises(ValueError, match=r"losses\.caption"):
        trainer.setup(config, tmp_path)


def _tree(rng: np.random.Generator) -> dict:
    w = rng.normal(size=(3, 4)).astype(np.float32)
    return {"w": w, "step": np.asarray(rng.integers(9), np.int32)}


def test_checkpointer_keeps_latest_and_best(tmp_path):
    rng = np.random.default_rng(0)
    ckpt = Checkpointer(tmp_path, keep=2, best_metric="accuracy")
    accuracy = {1: 0.5, 2: 0.9, 3: 0.6, 4: None, 5: 0.4, 6: None}
    trees = {}
    for step, acc in accuracy.items():
        trees[step] = _tree(rng)
        ckpt.save(step, trees[step], {"next_index": step},
                  None if acc is None else {"accuracy": acc})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]  # the newest two, and the best (0.9 at step 2)
    step, state, data = ckpt.restore_latest(trees[6])
    ckpt.close()
    assert step == 6 and data == {"next_index": 6}
    np.testing.assert_array_equal(state["w"], trees[6]["w"])


def test_restore_skips_a_damaged_newest_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    ckpt = Checkpointer(tmp_path, best_metric=None)
    trees = {s: _tree(rng) for s in (1, 2)}
    for s, t in trees.items():
        ckpt.save(s, t, {"next_index": s})
    ckpt.close()
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    ckpt = Checkpointer(tmp_path, best_metric=None)
    step, state, data = ckpt.restore_latest(trees[1])
    ckpt.close()
    assert step == 1 and data == {"next_index": 1}
    np.testing.assert_array_equal(state["w"], trees[1]["w"])


def test_metric_writer_drops_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n{"step": 2, "spl')
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(3, "val", {"accuracy": np.float32(0.5), "loss": float("nan")})
    writer.close()
    lines = _lines(tmp_path)
    assert [r["step"] for r in lines] == [1, 3]
    assert lines[1]["accuracy"] == 0.5 and lines[1]["loss"] == "nan"


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``logdir``, read record by record (TFRecord
    framing: a uint64 length, its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_gets_every_number_and_pytorch_is_not_imported(tmp_path):
    """The writer runs in a fresh interpreter (this one may hold torch already) with torch
    installed: TensorBoard's files get the numbers, and torch is never imported."""
    script = (
        "import sys\n"
        "from mmjax.io.writers import MetricWriter\n"
        f"w = MetricWriter({str(tmp_path)!r})\n"
        "w.write(10, 'val', {'accuracy': 0.75, 'retrieval_i2t_recall@5': 0.5, 'note': 'x'})\n"
        "w.write(20, 'train', {'loss': 1.25})\n"
        "w.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _tensorboard_scalars(tmp_path / "tensorboard") == {
        "val/accuracy": [(10, 0.75)], "val/retrieval_i2t_recall_at_5": [(10, 0.5)],
        "train/loss": [(20, 1.25)]}


@pytest.mark.slow
def test_initial_state_loads_hf_bert_and_vit_towers(tmp_path):
    """config.model.{text,image}.init_from = HF folders: the towers take their architecture and
    weights from them (compared with transformers' own tensors), the rest starts fresh."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    bert_dir, vit_dir = tmp_path / "bert", tmp_path / "vit"
    transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=16,
    )).save_pretrained(bert_dir)
    transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=40,
    )).save_pretrained(vit_dir)

    config = _tiny(**{"model.encoders.text.init_from": str(bert_dir),
                      "model.encoders.image.init_from": str(vit_dir),
                      "total_steps": 6, "eval_every": 6, "log_every": 2})
    initial, _ = loop.initial_state(trainer.setup(config, tmp_path / "run"))
    bert = transformers.BertModel.from_pretrained(bert_dir)
    np.testing.assert_array_equal(
        np.asarray(initial.params["text"]["token_embedding"]["embedding"]),
        bert.embeddings.word_embeddings.weight.detach().numpy())
    vit = transformers.ViTModel.from_pretrained(vit_dir).state_dict()
    # layer 0's first MLP matrix (named "encoder.layer.0.intermediate.dense" or, in newer
    # transformers, "layers.0.mlp.fc1"); torch's [out, in] weight is flax's [in, out] kernel
    (fc1,) = [v for k, v in vit.items()
              if k.endswith(("0.intermediate.dense.weight", "0.mlp.fc1.weight"))]
    np.testing.assert_array_equal(
        np.asarray(initial.params["image"]["encoder"]["layer_0"]["mlp"]["fc1"]["kernel"]),
        fc1.detach().numpy().T)
    # The towers' architecture comes from the folders; the fusion and the head start fresh.
    assert config.model.encoders.text.width == 32 and config.model.encoders.image.depth == 1
    assert not np.any(np.asarray(initial.params["heads"]["answer"]["out"]["kernel"]))


@pytest.mark.slow
def test_a_config_in_another_folder_trains_and_its_neighbours_are_not_imported(tmp_path):
    """A config file anywhere imports only ``mmjax``; modules that lie beside it or above it
    (an ``optax.py``, a ``configs/common.py``) are never imported in its place."""
    exp = tmp_path / "exp"
    (tmp_path / "configs").mkdir(parents=True)
    exp.mkdir()
    (exp / "my_config.py").write_text((ROOT / "configs" / "default.py").read_text())
    marker = tmp_path / "imported.txt"
    stray = f"open({str(marker)!r}, 'a').write(__file__ + '\\n')\nraise ImportError('stray')\n"
    for path in (exp / "optax.py", exp / "jax.py", tmp_path / "optax.py",
                 tmp_path / "configs" / "__init__.py", tmp_path / "configs" / "common.py"):
        path.write_text(stray)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config", f"{exp / 'my_config.py'}:tiny",
         "--workdir", str(tmp_path / "run"), "--config.total_steps=2", "--config.eval_every=2",
         "--config.checkpoint_every=2", "--config.optimizer.warmup_steps=1"],
        cwd=ROOT / "tests", env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: step 2" in run.stdout
    assert not marker.exists(), marker.read_text()


def test_config_imports_are_imported_and_a_missing_one_is_named(tmp_path, monkeypatch):
    """``config.imports`` names modules that register parts of one's own; training and every
    command that reads a run back import them first."""
    from mmjax import config as config_lib

    (tmp_path / "my_parts.py").write_text("LOADED = []\nLOADED.append(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    c = get_config("tiny")
    with c.unlocked():
        c.imports = "my_parts"
    assert config_lib.import_modules(c) == ["my_parts"]
    assert sys.modules["my_parts"].LOADED == [1]
    with c.unlocked():
        c.imports = "my_parts, no_such_module_here"
    with pytest.raises(ImportError, match=r"config\.imports names 'no_such_module_here'"):
        config_lib.import_modules(c)
