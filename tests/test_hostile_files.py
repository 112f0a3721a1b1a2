"""Files written whole, commands that write only where they should, and the workdir lock.

A file another command reads is written under a unique temporary name and renamed into place:
a fixed temporary name (``labels.json.tmp``) is one that another process writing the same
workdir, or a link planted there, occupies too; a file written in place is one a reader can
see half-written. An output folder is swapped in whole. Commands other than training never
write into a training workdir, and the lock never writes through a link. Every check uses
real files, and files outside the command's output are hashed before and after.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections
import pytest

from mmjax import files
from mmjax.data import folder, pipeline, records
from mmjax.errors import ExplainedError
from mmjax.trainer import runs
from mmjax.trainer import workdir as workdir_lib
from tests.test_folder import make_dataset
from tests.test_inference import ROOT, _cli, _env, _train


def _hashes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) → sha256 of its bytes, or its target."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _victim(root: Path) -> tuple[Path, str]:
    victim = root / "victim.txt"
    victim.write_text("the user's own file\n")
    return victim, victim.read_text()


def _last_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    return last


# --- the lock (fast) ---------------------------------------------------------------------------


def test_lock_refuses_a_planted_link_and_leaves_its_target_alone(tmp_path):
    """``.lock`` opened without following links and without truncating: a link (or a hard
    link) to another file is refused by name, and that file keeps its bytes."""
    victim, before = _victim(tmp_path)
    work = tmp_path / "run"
    work.mkdir()
    (work / workdir_lib.LOCK_FILE).symlink_to(victim)
    with pytest.raises(workdir_lib.WorkdirLockError, match=r"\.lock is a symbolic link"), \
            workdir_lib.lock(work):
        pass
    assert victim.read_text() == before
    (work / workdir_lib.LOCK_FILE).unlink()
    os.link(victim, work / workdir_lib.LOCK_FILE)
    with pytest.raises(workdir_lib.WorkdirLockError, match="hard link"), workdir_lib.lock(work):
        pass
    assert victim.read_text() == before


def test_lock_on_a_filesystem_without_flock_names_the_workdir(tmp_path, monkeypatch):
    """No filesystem without ``flock`` is available to tests, so ``fcntl.flock`` is replaced by
    one that fails as such a filesystem does (ENOLCK): the run must stop with an error naming
    the workdir, not run unlocked or fail with a bare OSError."""
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ExplainedError, match=re.escape(str(tmp_path.absolute()))) as info, \
            workdir_lib.lock(tmp_path):
        pass
    assert "file locks" in str(info.value)


# --- files written whole (fast) ----------------------------------------------------------------


def test_tokenizer_and_labels_never_use_a_fixed_temporary_name(tmp_path):
    """Another writer's temporary file (here a planted link to a file outside) at the old fixed
    names ``tokenizer.json.tmp`` / ``labels.json.tmp`` is not written through: each write has
    its own temporary name, so the saved files are whole and the outside file is unchanged."""
    data = make_dataset(tmp_path / "data", {"train": 12, "val": 4, "test": 4}, image_size=32)
    victim, before = _victim(tmp_path)
    work = tmp_path / "run"
    work.mkdir()
    for name in ("tokenizer.json.tmp", "labels.json.tmp"):
        (work / name).symlink_to(victim)
    cfg = ml_collections.ConfigDict({
        "name": "folder", "path": str(data), "image_size": 32, "max_len": 8, "tokenizer": "",
        "vocab_size": 100, "pp_train": "decode|resize|normalize|tokenize",
        "pp_eval": "decode|resize|normalize|tokenize", "skip_bad": False, "cache": False,
        "cache_mb": 64, "num_workers": 0})
    tok = pipeline.build_tokenizer(cfg, workdir=work)
    pipeline.dataset_info(cfg, tok, workdir=work)
    assert victim.read_text() == before
    assert json.loads((work / folder.LABELS_FILE).read_text()) == ["no", "yes"]
    assert json.loads((work / records.TOKENIZER_FILE).read_text())["model"]["type"] == "WordPiece"
    assert sorted(p.name for p in work.iterdir()) == sorted(
        ["labels.json", "tokenizer.json", "labels.json.tmp", "tokenizer.json.tmp"])


def test_inspect_with_a_workdir_writes_nothing_there(tmp_path):
    """``mmjax.data.inspect --workdir W`` only reads W: a W without a saved tokenizer or label
    vocabulary gets none (only training writes them, under the lock)."""
    from mmjax.data import inspect as data_inspect

    data = make_dataset(tmp_path / "data", {"train": 12, "val": 4, "test": 4}, image_size=32,
                        seed=1)
    work = tmp_path / "run"
    work.mkdir()
    config = ml_collections.ConfigDict({"seed": 0, "batch_size": 4, "data": {
        "name": "folder", "path": str(data), "image_size": 32, "max_len": 8, "tokenizer": "",
        "vocab_size": 100, "pp_train": "decode|resize|normalize|tokenize",
        "pp_eval": "decode|resize|normalize|tokenize", "skip_bad": False, "cache": False,
        "cache_mb": 64, "num_workers": 0}})
    lines = data_inspect.show(config, "val", 2, str(tmp_path / "grid.png"), str(work))
    assert len(lines) == 2 and (tmp_path / "grid.png").is_file()
    assert list(work.iterdir()) == []
    # Its grid neither: --out inside a training workdir is refused before anything is read.
    (work / "metrics.jsonl").write_text("")
    with pytest.raises(workdir_lib.InsideWorkdirError, match=re.escape(str(work.resolve()))):
        data_inspect.show(config, "val", 2, str(work / "grid.png"), str(work))
    assert sorted(p.name for p in work.iterdir()) == ["metrics.jsonl"]


def test_truncated_config_json_is_named(tmp_path):
    """A config.json cut short (a run killed while writing it, before it was written whole)
    is an error naming the file, which the CLIs print as their last line."""
    (tmp_path / "config.json").write_text('{"seed": 0, "data": {"name": "fol')
    with pytest.raises(runs.RunFileError, match=re.escape(str(tmp_path / "config.json"))):
        runs.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(runs.RunFileError, match="expected a JSON object"):
        runs.read_config(tmp_path)


def test_atomic_writes_leave_the_old_file_or_folder_when_interrupted(tmp_path):
    target = tmp_path / "out.json"
    files.write_atomic(target, "old\n")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    out = tmp_path / "art"
    with files.replaced_dir(out, owned=("a", "b")) as d:
        (d / "a").write_text("1")
        (d / "b").write_text("1")
    with pytest.raises(RuntimeError), files.replaced_dir(out, owned=("a", "b")) as d:
        (d / "a").write_text("2")
        raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "1", "b": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "out.json"]
    (out / "mine.txt").write_text("user's")
    with pytest.raises(files.OutputFolderError, match=r"mine\.txt"), \
            files.replaced_dir(out, owned=("a", "b")):
        pass
    assert (out / "mine.txt").read_text() == "user's"


# --- commands on a trained run (slow) ----------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """configs/folder.py:tiny trained for 12 steps in a workdir where ``config.json`` was a
    link to a file outside (planted before the run): training writes a file of its own and
    leaves the outside file as it was."""
    base = tmp_path_factory.mktemp("hostile")
    data = make_dataset(base / "data", {"train": 32, "val": 8, "test": 8}, image_size=32)
    victim, before = _victim(base)
    work = base / "run"
    work.mkdir()
    (work / "config.json").symlink_to(victim)
    _train(data, work)
    return {"base": base, "data": data, "work": work, "victim": victim, "before": before}


@pytest.mark.slow
def test_training_writes_config_json_as_a_new_file(trained):
    work = trained["work"]
    assert trained["victim"].read_text() == trained["before"]
    assert not (work / "config.json").is_symlink()
    assert runs.read_config(work).data.name == "folder"


@pytest.mark.slow
def test_predict_export_explain_refuse_outputs_inside_a_workdir(trained):
    from mmjax.inference import export, predict
    from mmjax.interpret.explain import explain

    work, data = trained["work"], trained["data"]
    before = _hashes(trained["base"])
    inputs = data / "test.jsonl"
    for name, call, output in [
        ("predict", lambda out: predict.predict(work, inputs, out, progress=False),
         work / "labels.json"),
        ("predict", lambda out: predict.predict(work, inputs, out, progress=False),
         work / "sub" / "answers.jsonl"),
        ("export", lambda out: export.export(work, out), work),
        ("export", lambda out: export.export(work, out), work / "artifact"),
        ("explain", lambda out: explain(work, out, limit=2), work / "gallery"),
    ]:
        with pytest.raises(workdir_lib.InsideWorkdirError) as err:
            call(output)
        assert str(work.resolve()) in str(err.value), (name, str(err.value))
    # On the command line: evaluate --report, refused on the last stderr line.
    result = _cli("mmjax.evaluate", "--workdir", str(work), "--corrupt", "gaussian_noise:1",
                  "--report", str(work / "report"))
    last = _last_error(result)
    assert "InsideWorkdirError" in last and str(work.resolve()) in last, last
    assert _hashes(trained["base"]) == before


@pytest.mark.slow
def test_truncated_labels_or_config_stop_predict_and_evaluate_naming_the_file(trained,
                                                                             tmp_path):
    """A reader of a workdir whose labels.json, tokenizer.json or config.json is cut short
    stops with the file's name on the last stderr line (not a bare JSON decoding error)."""
    predict = ["--input", str(trained["data"] / "test.jsonl"), "--output",
               str(tmp_path / "o.jsonl")]
    for name, module, args in [("labels.json", "mmjax.predict", predict),
                               ("tokenizer.json", "mmjax.predict", predict),
                               ("config.json", "mmjax.evaluate", [])]:
        work = tmp_path / f"run-{name}"
        shutil.copytree(trained["work"], work)
        text = (work / name).read_text()
        (work / name).write_text(text[: len(text) // 2])
        last = _last_error(_cli(module, "--workdir", str(work), *args))
        assert str(work / name) in last, (name, last)
        assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.slow
def test_predict_writes_its_answers_under_a_name_of_its_own(trained, tmp_path):
    """The old fixed temporary name ``OUT.tmp``, taken by another writer (a planted link to a
    file outside), is not written through; the answers arrive whole."""
    from mmjax.inference import predict

    victim, before = _victim(tmp_path)
    out = tmp_path / "answers.jsonl"
    (tmp_path / "answers.jsonl.tmp").symlink_to(victim)
    predict.predict(trained["work"], trained["data"] / "test.jsonl", out, progress=False)
    assert victim.read_text() == before
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == list(range(8))


@pytest.mark.slow
def test_an_interrupted_export_leaves_the_previous_artifact_whole(trained, tmp_path,
                                                                 monkeypatch):
    from mmjax.inference import artifact, export

    out = tmp_path / "art"
    export.export(trained["work"], out, num_examples=2, platforms=("cpu",))
    first = _hashes(out)
    assert "model.jaxexport" in first and "README.md" in first

    def killed(*args, **kwargs):  # the last file an export writes
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "readme", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export(trained["work"], out, num_examples=3, platforms=("cpu",))
    assert _hashes(out) == first  # example_inputs.npz of 3 rows would differ
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no temporary folder left
    (out / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(files.OutputFolderError, match=r"notes\.txt"):
        export.export(trained["work"], out, num_examples=2, platforms=("cpu",))
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.jaxexport").is_file()


@pytest.mark.slow
def test_explain_into_a_used_folder_shows_only_its_own_pictures(trained, tmp_path):
    from mmjax.interpret.explain import explain

    out = tmp_path / "gallery"
    explain(trained["work"], out, split="test", limit=3, batch_size=3, layers=True)
    assert (out / "img" / "00002_image.png").is_file()
    stale = out / "layers" / "00000_image.encoder.stale_layer.png"  # a previous model's layer
    shutil.copyfile(next((out / "layers").glob("00000_*.png")), stale)
    explain(trained["work"], out, split="test", limit=1, batch_size=1, layers=True)
    page = (out / "index.html").read_text()
    assert "stale_layer" not in page and not stale.exists()
    assert not (out / "img" / "00002_image.png").exists()  # from the 3-example run
    assert len((out / "explanations.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_train_and_convert_respect_the_lock(trained, tmp_path):
    """A training run stops at a planted ``.lock`` link, naming it; ``mmjax.convert`` writing
    a checkpoint waits its turn like a second run, and never writes a Hugging Face folder into
    a workdir."""
    from tests.test_hf import _vit

    victim, before = _victim(tmp_path)
    work = tmp_path / "run"
    work.mkdir()
    (work / workdir_lib.LOCK_FILE).symlink_to(victim)
    result = _cli("mmjax.train", "--config", "configs/folder.py:tiny", "--workdir", str(work),
                  f"--config.data.path={trained['data']}")
    assert str(work / workdir_lib.LOCK_FILE) in _last_error(result)
    assert victim.read_text() == before
    assert sorted(p.name for p in work.iterdir()) == [workdir_lib.LOCK_FILE]

    src = _vit(tmp_path / "vit")
    env = {**_env(), "HF_HUB_OFFLINE": "1"}
    convert = lambda *a: subprocess.run([sys.executable, "-m", "mmjax.convert", *a], cwd=ROOT,
                                        env=env, capture_output=True, text=True, timeout=300)
    ck = tmp_path / "ck"
    with workdir_lib.lock(ck):
        last = _last_error(convert("--input", str(src), "--output", str(ck)))
    assert "WorkdirInUseError" in last and str(ck) in last
    assert not (ck / "checkpoints").exists()
    (ck / "hf_config.json").symlink_to(victim)  # written as a new file, not through the link
    assert convert("--input", str(src), "--output", str(ck)).returncode == 0
    assert victim.read_text() == before
    assert json.loads((ck / "hf_config.json").read_text())["model_type"] == "vit"
    before_ck = _hashes(ck)
    last = _last_error(convert("--input", str(ck), "--output", str(ck / "hf")))
    assert "InsideWorkdirError" in last and not (ck / "hf").exists()
    assert _hashes(ck) == before_ck
