"""Folder datasets written by someone careless or hostile: lines that are not UTF-8 or JSON
Python can hold, headers that promise gigapixels or hours of audio, over-long lines, paths
that leave the dataset folder, values that would forge the final ``error:`` line.

Every file is written at test time (Pillow, soundfile, numpy, a hand-written PNG header for
the 13,000 x 13,000 image); records are loaded through ``FolderSource`` as training loads them,
and one case runs the train CLI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import soundfile
from PIL import Image

from mmjax.data import folder, records
from mmjax.pp import ops
from mmjax.runtime import cli
from tests.test_folder import make_dataset

REPO = Path(__file__).resolve().parents[1]
BOMB_SIDE = 13_000  # 169 megapixels, 20 KB as a 1-bit PNG


def _config(root: Path, **overrides) -> ml_collections.ConfigDict:
    """A data config without any of the limit keys (their defaults apply) unless given."""
    cfg = ml_collections.ConfigDict({
        "name": "folder", "path": str(root), "image_size": 16, "max_len": 8, "tokenizer": "",
        "vocab_size": 100, "skip_bad": False, "cache": False, "cache_mb": 64,
        "num_workers": 0, "pp_train": "decode|resize|normalize|tokenize",
        "pp_eval": "decode|resize|normalize|tokenize",
    })
    cfg.update(overrides)
    return cfg


def _load(root: Path, skip_bad: bool = False, **overrides) -> folder.FolderSource:
    cfg = _config(root, **overrides)
    return folder.FolderSource(root, "train", skip_bad=skip_bad, ctx=records.context(cfg, None))


def _write_lines(root: Path, lines: list[bytes | str | dict]) -> None:
    """``root/train.jsonl`` from raw bytes, text or records, one line each."""
    out = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        out += (line.encode() if isinstance(line, str) else line) + b"\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.jsonl").write_bytes(out)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = BOMB_SIDE, *, truncated: bool = False) -> bytes:
    """A valid black 1-bit PNG of ``side`` x ``side`` pixels (kilobytes that decode to
    ``3 * side**2`` bytes of RGB); ``truncated``: its pixel data cut short."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte, then the packed bits
    idat = zlib.compress(row * side, 9)
    if truncated:
        idat = idat[: len(idat) // 2]
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _image(path: Path, size: int = 16, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _good(name: str = "a.png") -> dict:
    return {"image": name, "text": "is it", "label": "yes"}


def _text(label: object = "yes") -> str:
    return json.dumps({"text": "a question", "label": label})


# --- lines Python's json cannot hold ---------------------------------------------------------

BAD_LINES = {  # (the line, what the message says)
    "not_utf8": (b'{"text": "caf\xe9 \xff", "label": "yes"}', "not UTF-8 text (byte 0xe9"),
    "huge_int": (('{"text": "t", "label": ' + "7" * 5000 + "}").encode(),
                 "malformed JSON (a number of more than 4300 digits"),
    "deep_nesting": (('{"text": "t", "label": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(),
                     "malformed JSON (nested too deeply)"),
    "malformed": (b'{"text": "t", "label": ', "malformed JSON (Expecting value"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_lines_json_cannot_hold_are_bad_records(tmp_path, case):
    line, why = BAD_LINES[case]
    _write_lines(tmp_path, [_text(), line, _text("no")])
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:2: ") as err:
        _load(tmp_path)
    assert why in str(err.value) and "\n" not in str(err.value)
    source = _load(tmp_path, skip_bad=True)
    assert source.skipped == 1 and source.lines == [1, 3]


# --- limits ----------------------------------------------------------------------------------


def test_an_overlong_line_is_refused_without_being_read_whole(tmp_path):
    big = json.dumps({"text": "x" * 20_000_000, "label": "yes"})
    _write_lines(tmp_path, [_text(), big, _text("no")])
    tracemalloc.start()
    try:
        with pytest.raises(folder.BadDataError) as err:  # the default limit (no key)
            _load(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "train.jsonl:2: " in str(err.value) and "data.max_record_bytes" in str(err.value)
    assert peak < 8_000_000, peak  # the 20 MB line never sits in memory
    source = _load(tmp_path, skip_bad=True)
    assert source.skipped == 1 and source.lines == [1, 3]  # later lines keep their numbers
    _write_lines(tmp_path, [_text(), json.dumps({"text": "y" * 300, "label": "no"})])
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:2: .*data\.max_record_bytes"):
        _load(tmp_path, max_record_bytes=200)
    assert len(_load(tmp_path, max_record_bytes=400)) == 2


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(png_bomb())
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, first
def test_an_image_over_max_pixels_is_refused_from_its_header(tmp_path, bomb):
    _image(tmp_path / "a.png")
    os.link(bomb, tmp_path / "bomb.png")
    (tmp_path / "cut.png").write_bytes(png_bomb(truncated=True))
    _write_lines(tmp_path, [_good(), _good("bomb.png"), _good(), _good("cut.png")])
    with pytest.raises(folder.BadDataError) as err:  # the default limit (no key)
        _load(tmp_path)
    message = str(err.value)
    assert "train.jsonl:2: " in message and "data.max_image_pixels" in message
    assert "image" in message and f"{BOMB_SIDE} x {BOMB_SIDE}" in message
    source = _load(tmp_path, skip_bad=True)
    assert source.skipped == 2 and source.lines == [1, 3]
    # Refused before decoding: a bomb whose pixel data is cut short gives the same refusal.
    _write_lines(tmp_path, [_good(), _good("cut.png")])
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:2: .*data\.max_image_pixels"):
        _load(tmp_path)
    # Over Pillow's own limit (about 179 megapixels): refused the same way, naming the key.
    (tmp_path / "huge.png").write_bytes(png_bomb(14_000, truncated=True))
    _write_lines(tmp_path, [_good(), _good("huge.png")])
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:2: image file .* refused: "
                       r".*data\.max_image_pixels=300000000"):
        _load(tmp_path, max_image_pixels=300_000_000)
    # The key sets the limit: 16 x 16 = 256 pixels.
    _write_lines(tmp_path, [_good(), _good()])
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:1: .*data\.max_image_pixels"):
        _load(tmp_path, max_image_pixels=255)
    assert len(_load(tmp_path, max_image_pixels=256)) == 2


@pytest.mark.parametrize("spec", ["decode|resize", "decode|random_crop"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_ops_apply_the_pixel_limit(tmp_path, spec, fmt):
    """The ops decode bytes (TFDS) and re-read files: Pillow's header and simplejpeg's."""
    path = _image(tmp_path / f"a.{fmt.lower()}", fmt=fmt)
    data = ml_collections.ConfigDict({"max_image_pixels": 255})
    chain = ops.parse(spec, ops.Context(image_size=8, data=data))
    for value in (str(path), path.read_bytes()):
        with pytest.raises(ValueError, match=r"16 x 16 .*data\.max_image_pixels=255"):
            ops.apply(chain, {"image": value}, np.random.default_rng(0))
    chain = ops.parse(spec, ops.Context(image_size=8, data=ml_collections.ConfigDict(
        {"max_image_pixels": 256})))
    assert ops.apply(chain, {"image": str(path)}, np.random.default_rng(0))["image"].shape == (
        8, 8, 3)


def test_audio_over_max_seconds_is_refused_from_its_header(tmp_path):
    soundfile.write(tmp_path / "a.wav", np.zeros(8000, np.int16), 8000)
    soundfile.write(tmp_path / "long.flac", np.zeros(601 * 8000, np.int16), 8000)  # 10 min 1 s
    rec = {"audio": "a.wav", "label": "yes"}
    _write_lines(tmp_path, [rec, {**rec, "audio": "long.flac"}, rec])
    with pytest.raises(folder.BadDataError) as err:  # the default limit (no key)
        _load(tmp_path)
    message = str(err.value)
    assert "train.jsonl:2: audio" in message and "data.max_audio_seconds" in message
    assert "601.0 s" in message
    source = _load(tmp_path, skip_bad=True)
    assert source.skipped == 1 and source.lines == [1, 3]
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:1: .*data\.max_audio_seconds"):
        _load(tmp_path, max_audio_seconds=0.5)


# --- paths leaving the folder ------------------------------------------------------------------


def _outside_case(case: str, root: Path, outside: Path) -> tuple[str, str]:
    """(the record's field, its value) of a path that leaves ``root`` to ``outside``."""
    field = case.split("_")[0]
    target = outside / {"image": "x.png", "audio": "x.wav", "series": "x.npy"}[field]
    if case.endswith("missing"):
        return field, str(outside / "nothing_here.png")
    if case.endswith("symlink"):
        (root / "sub").mkdir(exist_ok=True)
        (root / "sub" / "link").symlink_to(target)
        return field, "sub/link"
    if case.endswith("dotdot"):
        return field, "../" + os.path.relpath(target, root.parent)
    return field, str(target)  # absolute


OUTSIDE = ("image_absolute", "image_dotdot", "image_symlink", "image_missing",
           "audio_dotdot", "series_absolute", "series_symlink")


@pytest.mark.parametrize("case", OUTSIDE)
def test_paths_leaving_the_folder_are_refused(tmp_path, case):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _image(root / "a.png")
    _image(outside / "x.png")
    soundfile.write(outside / "x.wav", np.zeros(800, np.int16), 8000)
    np.save(outside / "x.npy", np.zeros((5, 2), np.float32))
    field, value = _outside_case(case, root, outside)
    _write_lines(root, [_good(), {field: value, "label": "no"}, _good()])
    with pytest.raises(folder.BadDataError) as err:
        _load(root)
    message = str(err.value)
    assert f"train.jsonl:2: {field} " in message and "data.allow_outside_paths" in message
    assert "not found" not in message  # checked before the file's existence
    source = _load(root, skip_bad=True)
    assert source.skipped == 1 and source.lines == [1, 3]
    if case.endswith("missing"):
        with pytest.raises(folder.BadDataError, match=r"train\.jsonl:2: image file .* not found"):
            _load(root, allow_outside_paths=True)
    else:
        assert len(_load(root, allow_outside_paths=True)) == 3


def test_paths_that_stay_inside_are_kept(tmp_path):
    _image(tmp_path / "img" / "a.png")
    (tmp_path / "alias.png").symlink_to(tmp_path / "img" / "a.png")
    _write_lines(tmp_path, [_good("img/../img/a.png"), _good("alias.png"),
                            _good(str(tmp_path / "img" / "a.png"))])
    assert len(_load(tmp_path)) == 3


# --- messages ----------------------------------------------------------------------------------


def test_record_values_cannot_forge_message_lines(tmp_path):
    _image(tmp_path / "a.png")
    forged = "x.png\n\x1b[1A\rerror: all good\u2028"
    _write_lines(tmp_path, [_good(), _good(forged)])
    with pytest.raises(folder.BadDataError) as err:
        _load(tmp_path)
    message = str(err.value)
    assert message.isprintable(), message
    assert r"x.png\n\x1b[1A\rerror: all good\u2028" in message
    _write_lines(tmp_path, [_text(["\x1b[2J"] * 3)])
    with pytest.raises(folder.BadDataError, match=r"train\.jsonl:1: label") as err:
        _load(tmp_path)
    assert str(err.value).isprintable()


def test_split_cache_keys_on_the_safety_settings(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _image(root / "a.png")
    _image(outside / "x.png")
    _write_lines(root, [_good(), _good("../elsewhere/x.png")])
    cfg = _config(root, allow_outside_paths=True)
    assert len(records.split_data(cfg, "train", labelled=False)) == 2
    with pytest.raises(folder.BadDataError, match=r"data\.allow_outside_paths"):
        records.split_data(_config(root), "train", labelled=False)


def test_an_unknown_label_is_quoted_short(tmp_path):
    _image(tmp_path / "a.png")
    _write_lines(tmp_path, [_good(), _good()])
    (tmp_path / "val.jsonl").write_text(json.dumps({**_good(), "label": "\x1b[2J" + "x" * 9999}))
    with pytest.raises(folder.BadDataError, match=r"val\.jsonl:1: label '\\x1b\[2Jxxx") as err:
        records.split_data(_config(tmp_path), "val")
    assert len(str(err.value)) < 500 and str(err.value).endswith("does not occur in train")


def test_the_error_line_escapes_terminal_controls(capsys, monkeypatch):
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # _fail replaces it
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    try:
        with pytest.raises(SystemExit) as exit_:
            cli._fail("bad path 'a\x1b[2K\rerror: fine\u2028' here")
    finally:
        asyncio_log.setLevel(level)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: bad path"), err
    assert "\x1b" not in err and "\r" not in err and "\u2028" not in err


def test_a_broken_labels_file_is_named(tmp_path):
    (tmp_path / folder.LABELS_FILE).write_text('["no", "ye')
    with pytest.raises(folder.BadDataError, match=rf"{tmp_path / folder.LABELS_FILE}: "):
        folder.label_vocab([], tmp_path)
    (tmp_path / folder.LABELS_FILE).write_text('{"no": 1}')
    with pytest.raises(folder.BadDataError, match=rf"{tmp_path / folder.LABELS_FILE}: "):
        folder.label_vocab([], tmp_path)


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (but ``skip``) → (its mode, a hash of its bytes)."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in files:
            path = Path(dirpath, name)
            data = b"" if path.is_symlink() else path.read_bytes()
            out[str(path)] = (path.lstat().st_mode, hashlib.sha256(data).hexdigest())
    return out


def test_cli_names_an_outside_path_on_one_clean_last_line(tmp_path):
    data = make_dataset(tmp_path / "data", {"train": 8, "val": 4, "test": 4}, image_size=16)
    _image(tmp_path / "outside.png")
    lines = (data / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[1])
    rec["image"] = "../outside.png\n\x1b[1Aerror: all good"
    lines[1] = json.dumps(rec)
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    work = tmp_path / "w"
    before = _tree(tmp_path, work)
    proc = subprocess.run(
        [sys.executable, "-m", "mmjax.train", "--config", "configs/folder.py:tiny",
         "--workdir", str(work), f"--config.data.path={data}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().split("\n")
    last = lines[-1]
    assert last.startswith("error: ") and "train.jsonl:2: image" in last, proc.stderr[-3000:]
    assert "data.allow_outside_paths" in last and r"\n\x1b[1Aerror: all good" in last
    assert "Traceback" not in proc.stderr and "\x1b" not in proc.stderr
    assert not any(line.startswith("error: all good") for line in lines)
    assert _tree(tmp_path, work) == before  # the dataset and its surroundings are untouched


def test_a_missing_split_file_is_named_not_blamed_on_the_workdir(tmp_path):
    from mmjax.errors import ExplainedError
    from mmjax.trainer import loop
    from tests.model_answers import folder_config

    data = make_dataset(tmp_path / "data", {"train": 8, "val": 4, "test": 4}, image_size=16)
    (data / "val.jsonl").unlink()
    with pytest.raises(folder.SplitNotFoundError) as e:
        loop.train_and_evaluate(folder_config(data), tmp_path / "w")
    assert isinstance(e.value, ExplainedError)  # the CLI prints its message, no traceback
    assert str(e.value).startswith(f"{data / 'val.jsonl'}: split file not found")
