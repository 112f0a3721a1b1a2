"""Tokenizer and model folders and TFDS datasets are data, not code: a folder that asks for its
own Python (``auto_map``) is refused even when someone answers "y" to transformers' prompt, an
unprepared TFDS dataset is never downloaded, and a tokenizer that knows none of the dataset's
words stops the run, naming ``data.tokenizer`` and the rate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_folder import make_dataset

ROOT = Path(__file__).resolve().parents[1]

# A module that leaves a mark when it is imported: the folder's "custom code" (transformers
# copies it into its modules cache before importing it, so the mark's path is absolute).
_PAYLOAD = """
from pathlib import Path
Path({marker!r}).write_text("custom code ran")
{body}
"""


def _custom_tokenizer_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "tok.py").write_text(_PAYLOAD.format(
        marker=str(path / "RAN"), body="from transformers import PreTrainedTokenizerFast as Tok"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Tok", "auto_map": {"AutoTokenizer": [None, "tok.Tok"]}}))
    return path


def _custom_model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "model.py").write_text(_PAYLOAD.format(marker=str(path / "RAN"), body=(
        "from transformers import BertConfig, BertModel\n"
        "class C(BertConfig):\n    model_type = 'mystery'\n"
        "class M(BertModel):\n    config_class = C\n")))
    (path / "config.json").write_text(json.dumps({
        "model_type": "mystery", "architectures": ["M"],
        "auto_map": {"AutoConfig": "model.C", "AutoModel": "model.M"}}))
    return path


_LOAD = {
    "tokenizer": "from mmjax.data.tokenize import load_hf_tokenizer as f; f(sys.argv[1])",
    "model": "from mmjax.hf.common import Architecture as A; A.reference_model(None, sys.argv[1])",
}


@pytest.mark.parametrize("kind", ["tokenizer", "model"])
def test_a_folder_with_its_own_code_is_refused_even_if_a_user_says_yes(tmp_path, kind):
    folder = (_custom_tokenizer_folder if kind == "tokenizer" else _custom_model_folder)(
        tmp_path / kind)
    # "y" on stdin: transformers' interactive prompt would take it as consent.
    result = subprocess.run([sys.executable, "-c", f"import sys; {_LOAD[kind]}", str(folder)],
                            cwd=ROOT, input="y\n", capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                 "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert not (folder / "RAN").exists(), result.stdout + result.stderr[-2000:]
    assert result.returncode != 0
    assert "trust_remote_code" in result.stderr, result.stderr[-2000:]


def test_an_unprepared_tfds_dataset_is_named_not_downloaded(tmp_path, capfd):
    import ml_collections

    from mmjax.data import tfds_source

    cfg = ml_collections.ConfigDict({"name": "tfds", "tfds_name": "mnist",
                                     "data_dir": str(tmp_path / "tfds")})
    with pytest.raises(tfds_source.TfdsNotPreparedError,
                       match=r"data.tfds_name='mnist': no prepared data in data.data_dir="):
        tfds_source._data_source(cfg, "train")
    out, err = capfd.readouterr()
    assert "Downloading" not in out + err
    assert not (tmp_path / "tfds" / "downloads").exists()


def _bert_folder_without_words(path: Path, words: list[str]) -> Path:
    """What ``BertTokenizerFast(vocab_file=...)`` saves under transformers 5: the vocab file is
    ignored, so the saved tokenizer knows the special tokens only."""
    from transformers import BertTokenizerFast

    vocab = path.with_suffix(".txt")
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(path))
    return path


def test_a_tokenizer_that_knows_no_words_stops_the_run(tmp_path):
    from mmjax.data import pipeline
    from mmjax.data.tokenize import TokenizerCoverageError
    from tests.model_answers import folder_config

    data = make_dataset(tmp_path / "data", {"train": 24, "val": 8, "test": 8}, image_size=16)
    train = [json.loads(line) for line in (data / "train.jsonl").open()]
    train[0]["text"] += " please"  # one rare word: 1 of the 121 train words
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    words = sorted({w for r in train for w in r["text"].split()})
    folder = _bert_folder_without_words(tmp_path / "tok", words)
    c = folder_config(data)
    c.data.tokenizer = str(folder)
    tok = pipeline.build_tokenizer(c.data)
    ids, _ = tok.encode(words, 4)
    assert (ids[:, 1] == tok.UNK).all()  # the premise: every train word is unknown to it
    with pytest.raises(TokenizerCoverageError, match=(
            rf"data.tokenizer='{folder}' maps 100.0% of the train words to its unknown token")):
        pipeline.dataset_info(c.data, tok)
    # A tokenizer that misses the one rare word is within the default limit, and over a limit
    # set below its rate.
    from transformers import PreTrainedTokenizerFast

    good = tmp_path / "good"
    specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                "sep_token": "[SEP]", "mask_token": "[MASK]"}
    PreTrainedTokenizerFast(tokenizer_object=_wordlevel([w for w in words if w != "please"]),
                            **specials).save_pretrained(str(good))
    c.data.tokenizer = str(good)
    tok = pipeline.build_tokenizer(c.data)
    rate = 1 / sum(len(r["text"].split()) for r in train)
    assert 0 < rate < 0.05
    assert pipeline.dataset_info(c.data, tok)["num_classes"] == 2
    with c.unlocked():
        c.data.max_unk_rate = rate / 2
    with pytest.raises(TokenizerCoverageError, match=rf"{rate:.1%}"):
        pipeline.dataset_info(c.data, tok)


def _wordlevel(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    table = {w: i for i, w in enumerate(names)}
    tok = Tokenizer(models.WordLevel(table, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok
