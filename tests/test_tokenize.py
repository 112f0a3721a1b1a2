"""The tokenizer interface and its Hugging Face adapter.

The HF tokenizer is built offline: a WordPiece trained here with the ``tokenizers`` library on a
few sentences, wrapped by transformers and saved with left padding and left truncation, which
the adapter must override (the text towers read masks as right padding). Expected ids come
from transformers' own encoding of the same folder with right padding and from the trained
vocabulary, never from the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import transformers
from PIL import Image
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from mmjax import evaluators, hf
from mmjax.data import pipeline, tokenize
from mmjax.data.tokenize import (
    HFTokenizer,
    WordPieceTokenizer,
    load_hf_tokenizer,
    shapes_tokenizer,
)
from mmjax.models.multimodal import build_model

SENTENCES = ["is there a red disc", "a blue square and a green disc", "what colour is the circle",
             "the square is left of the disc", "is there a yellow triangle"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_hf_tokenizer(path: Path, texts: list[str]) -> Path:
    """A BERT-style WordPiece tokenizer trained on ``texts``, saved padding and truncating on
    the left."""
    raw = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.decoder = decoders.WordPiece()
    raw.train_from_iterator(texts * 3, trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False))
    vocab = raw.get_vocab()
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, vocab[t]) for t in ("[CLS]", "[SEP]")])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", padding_side="left", truncation_side="left",
    ).save_pretrained(path)
    return path


def _reference(path: Path, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own encoding of the folder, told to pad and truncate on the right."""
    ref = transformers.AutoTokenizer.from_pretrained(
        str(path), padding_side="right", truncation_side="right")
    enc = ref(texts, padding="max_length", truncation=True, max_length=max_len)
    return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


def test_hf_adapter_pads_and_truncates_on_the_right(tmp_path: Path) -> None:
    path = save_hf_tokenizer(tmp_path / "tok", SENTENCES)
    saved = transformers.AutoTokenizer.from_pretrained(str(path))
    assert (saved.padding_side, saved.truncation_side) == ("left", "left")  # what is overridden
    vocab = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]

    tok = load_hf_tokenizer(path)
    rng = np.random.default_rng()
    words = " ".join(SENTENCES).split()
    # Fresh texts of 1-9 known words, one with an unknown word; rows longer than 6 truncate.
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 10)))) for _ in range(6)]
    texts.append("the zebra is left")
    ids, mask = tok.encode(texts, 8)
    ref_ids, ref_mask = _reference(path, texts, 8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(texts), 8)
    np.testing.assert_array_equal(ids, ref_ids, err_msg=str(texts))
    np.testing.assert_array_equal(mask, ref_mask, err_msg=str(texts))
    # The same, spelled out from the trained vocabulary: [CLS] words [SEP], then [PAD]s.
    for row, m, text in zip(ids, mask, texts, strict=True):
        pieces = [vocab.get(w, vocab["[UNK]"]) for w in text.split()][:6]
        want = [vocab["[CLS]"], *pieces, vocab["[SEP]"]]
        want += [vocab["[PAD]"]] * (8 - len(want))
        assert row.tolist() == want, text
        assert m.tolist() == [1] * (len(pieces) + 2) + [0] * (6 - len(pieces))
    specials = [tok.PAD, tok.UNK, tok.CLS, tok.SEP, tok.MASK]
    assert specials == [vocab[s] for s in SPECIALS]
    assert tok.vocab_size == len(vocab)


def test_hf_adapter_decode_round_trips(tmp_path: Path) -> None:
    tok = load_hf_tokenizer(save_hf_tokenizer(tmp_path / "tok", SENTENCES))
    texts = ["Is there a RED disc", "the circle", "a blue square and a green disc"]
    ids, _ = tok.encode(texts, 10)
    assert tok.decode(ids) == [t.lower() for t in texts]
    assert tok.decode(ids[1]) == ["the circle"]  # one row gives a list of one
    assert tok.encode([], 5)[0].shape == (0, 5)
    with pytest.raises(TypeError, match="sequence of texts"):
        tok.encode("the circle", 5)


def test_one_hf_adapter_and_every_tokenizer_has_the_interface(tmp_path: Path) -> None:
    path = save_hf_tokenizer(tmp_path / "tok", SENTENCES)
    assert hf.HFTokenizer is HFTokenizer and hf.load_tokenizer is load_hf_tokenizer
    toks = [shapes_tokenizer(), WordPieceTokenizer.train(SENTENCES, 100), load_hf_tokenizer(path)]
    for tok in toks:
        for name in [*tokenize.Tokenizer.__annotations__, "vocab_size", "encode", "decode"]:
            assert hasattr(tok, name), (type(tok).__name__, name)
        ids, mask = tok.encode(["the circle", "what colour is the red square"], 6)
        assert mask[0].tolist() == [1, 1, 1, 1, 0, 0], type(tok).__name__  # right padding
        assert ids[0, 4] == tok.PAD and ids[0, 0] == tok.CLS and ids[0, 3] == tok.SEP
        assert tok.decode(ids) == ["the circle", "what colour is the"]  # truncated on the right


# --- the evaluators that decode, on a folder dataset with an HF tokenizer --------------------


def _folder(root: Path) -> Path:
    """train/val JSONL + PNGs: yes/no questions about random images (content is irrelevant)."""
    rng = np.random.default_rng()
    (root / "img").mkdir(parents=True)
    for split, n in (("train", 6), ("val", 5)):
        lines = []
        for i in range(n):
            name = f"img/{split}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(root / name)
            thing = ("disc", "square", "triangle")[i % 3]
            lines.append({"image": name, "text": f"is there a red {thing}",
                          "label": ("yes", "no")[i % 2]})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[evaluators.Env, dict]:
    """An untrained model with a QA and a caption head, reading the folder through the HF
    tokenizer (``data.tokenizer``), as the trainer builds it."""
    root = tmp_path_factory.mktemp("hf_evals")
    tok_dir = save_hf_tokenizer(root / "tok", SENTENCES)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    data = ml_collections.ConfigDict({
        "name": "folder", "path": str(_folder(root / "data")), "image_size": 16,
        "max_len": 8, "tokenizer": str(tok_dir), "pp_train": "decode|resize|normalize|tokenize",
        "pp_eval": "decode|resize|normalize|tokenize", "skip_bad": False, "cache": False,
        "num_workers": 0})
    tok = pipeline.build_tokenizer(data)
    v = tok.vocab_size
    model_cfg = {
        "encoders": {
            "image": {"kind": "vit", "variant": "mu/8", "width": 32, "depth": 0, "num_heads": 2},
            "text": {"kind": "text", "width": 32, "depth": 0, "num_heads": 2, "vocab_size": v,
                     "max_len": 8},
        },
        "fusion": {"kind": "cross_attention", "width": 32, "depth": 1, "num_heads": 2},
        "heads": {
            "answer": {"kind": "classification", "num_classes": 2},
            "caption": {"kind": "caption", "width": 32, "depth": 1, "num_heads": 2,
                        "vocab_size": v, "max_len": 8, "bos_id": vocab["[CLS]"],
                        "eos_id": vocab["[SEP]"], "pad_id": vocab["[PAD]"]},
        },
        "dropout": 0.0, "dtype": "float32",
    }
    model = build_model(model_cfg)
    env = evaluators.Env(model=model, model_cfg=model_cfg, data_config=data, tokenizer=tok,
                         label_names=pipeline.label_names(data), batch_size=4)
    batch = next(env.batches("val"))
    variables = model.init(jax.random.key(0), {k: v for k, v in batch.items() if k != "valid"})
    return env, variables


@pytest.mark.slow
def test_qa_evaluator_with_an_hf_tokenizer(env: tuple[evaluators.Env, dict]) -> None:
    env_, variables = env
    qa = evaluators.build({"qa": {"kind": "qa", "task": "answer"}}, env_)
    out = evaluators.run_all(qa, variables, "val")
    # Every val question starts "is there": the question type comes from the decoded ids.
    assert set(out) == {"qa_accuracy", "qa_accuracy_is_there"}
    assert out["qa_accuracy"] == out["qa_accuracy_is_there"]
    assert out["qa_accuracy"] in {k / 5 for k in range(6)}  # 5 val examples


def _scored(hyps: list[np.ndarray], refs: list[np.ndarray], tok_dir: str) -> dict:
    """Exact match and corpus BLEU-4 of id rows, decoded by transformers, scored by nltk."""
    from nltk.translate.bleu_score import corpus_bleu

    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tok_dir)
    words = lambda rows: [hf_tok.decode(r, skip_special_tokens=True).split() for r in rows]
    h, r = words(hyps), words(refs)
    bleu = corpus_bleu([[x] for x in r], h) if any(h) else 0.0
    return {"exact_match": float(np.mean([a == b for a, b in zip(h, r, strict=True)])),
            "bleu": float(bleu)}


class _Captioner(evaluators.Env):
    """An Env whose "model" captions each row with ``rows(batch)``: stand-ins of known output."""

    def __init__(self, env: evaluators.Env, rows) -> None:
        super().__init__(model=env.model, model_cfg=env.model_cfg, data_config=env.data_config,
                         tokenizer=env.tokenizer, label_names=env.label_names, batch_size=4)
        self.rows = rows

    def batches(self, split):
        for batch in super().batches(split):
            self.last = batch
            yield batch

    def apply(self, method, **kwargs):
        if method == "generate":
            return lambda variables, inputs: self.rows(self.last)
        return super().apply(method, **kwargs)


@pytest.mark.slow
def test_caption_evaluator_with_an_hf_tokenizer(env: tuple[evaluators.Env, dict]) -> None:
    env_, variables = env
    tok_dir = env_.data_config.tokenizer
    cfg = {"greedy": {"kind": "caption", "task": "caption", "max_len": 8}}
    out = evaluators.run_all(evaluators.build(cfg, env_), variables, "val")
    # The same numbers from the model's own greedy ids, decoded and scored independently.
    hyps, refs = [], []
    for batch in env_.batches("val"):
        keep = np.asarray(batch["valid"]) > 0
        ids = env_.model.apply(variables, {"image": batch["image"]}, task="caption", max_len=8,
                               method="generate")
        hyps += list(np.asarray(ids)[keep])
        refs += list(np.asarray(batch["text"]["ids"])[keep])
    want = _scored(hyps, refs, tok_dir)
    assert out["greedy_exact_match"] == want["exact_match"]
    assert out["greedy_bleu"] == pytest.approx(want["bleu"], abs=1e-9)

    # Captioners of known output: every reference (exactly 1), and the reference on even rows
    # with its words in reverse order on odd ones (nltk's BLEU of the same rows).
    def half(batch):
        ids = np.asarray(batch["text"]["ids"]).copy()
        for i in range(1, len(ids), 2):
            n = int(np.asarray(batch["text"]["mask"])[i].sum())
            ids[i, 1:n - 1] = ids[i, 1:n - 1][::-1]
        return ids

    cfg = {"greedy": {"kind": "caption", "task": "caption"}}
    perfect = _Captioner(env_, lambda batch: np.asarray(batch["text"]["ids"]))
    assert evaluators.build(cfg, perfect)["greedy"](variables, "val") == {
        "exact_match": 1.0, "bleu": 1.0}
    halves = _Captioner(env_, half)
    got = evaluators.build(cfg, halves)["greedy"](variables, "val")
    hyps, refs = [], []
    for batch in env_.batches("val"):
        keep = np.asarray(batch["valid"]) > 0
        hyps += list(half(batch)[keep])
        refs += list(np.asarray(batch["text"]["ids"])[keep])
    want = _scored(hyps, refs, tok_dir)
    assert 0 < want["bleu"] < 1 and 0 < want["exact_match"] < 1, want
    assert got["exact_match"] == pytest.approx(want["exact_match"])
    assert got["bleu"] == pytest.approx(want["bleu"], abs=1e-9)


def test_word_piece_training_gives_one_vocabulary() -> None:
    """The trainer breaks frequency ties by symbol numbers it assigns in hash order; fixed
    numbers make training a function of the texts (two runs, or two processes of one run,
    get the same ids). These texts, with ties, gave several vocabularies before."""
    rng = np.random.default_rng(0)
    words = ("red", "blue", "green", "left", "right", "small", "big", "is", "it", "a")
    texts = [" ".join(rng.choice(words, int(rng.integers(2, 6)))) for _ in range(30)]
    vocabs = {tuple(sorted(WordPieceTokenizer.train(texts, 60)._tok.get_vocab().items()))
              for _ in range(8)}
    assert len(vocabs) == 1
    tok = WordPieceTokenizer.train(texts, 60)
    ids, _ = tok.encode(["small green", "big red"], 8)
    assert tok.decode(ids) == ["small green", "big red"]
