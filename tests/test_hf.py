"""Hugging Face towers: tiny random PyTorch models built here, loaded into mmjax, compared.

Every model is built at test time with odd shapes (head counts, depths, qkv without bias,
non-default LayerNorm eps, non-square images, padded text), so nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it

import torch
import transformers

from mmjax import hf
from mmjax.io import checkpoint
from mmjax.models import scan
from mmjax.models.multimodal import build_model
from mmjax.trainer import transfer

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _bert(path: Path, pooler: bool = True, **kw: object) -> Path:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**{
        "vocab_size": 67, "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 3,
        "intermediate_size": 72, "max_position_embeddings": 24, "type_vocab_size": 3,
        "layer_norm_eps": 1e-7, **kw})
    transformers.BertModel(cfg, add_pooling_layer=pooler).save_pretrained(path)
    return path


def _vit(path: Path, **kw: object) -> Path:
    torch.manual_seed(1)
    cfg = transformers.ViTConfig(**{
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "image_size": [24, 16], "patch_size": 8, "qkv_bias": False,
        "layer_norm_eps": 1e-5, **kw})
    transformers.ViTModel(cfg).save_pretrained(path)
    return path


def _clip(path: Path, eos: int = 7) -> Path:
    torch.manual_seed(2)
    cfg = transformers.CLIPConfig(
        text_config={"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "intermediate_size": 48,
                     "max_position_embeddings": 12, "eos_token_id": eos, "bos_token_id": 1,
                     "pad_token_id": 0, "layer_norm_eps": 1e-6},
        vision_config={"hidden_size": 48, "num_hidden_layers": 1, "num_attention_heads": 3,
                       "intermediate_size": 64, "image_size": 20, "patch_size": 5,
                       "layer_norm_eps": 1e-6},
        projection_dim=16)
    transformers.CLIPModel(cfg).save_pretrained(path)
    return path


def _check(rows: list[tuple[str, float]], outputs: tuple[str, ...]) -> None:
    names = [n for n, _ in rows]
    for o in outputs:
        assert o in names, (o, names)
    assert any("layer_" in n for n in names)
    worst = max(rows, key=lambda r: r[1])
    assert worst[1] <= TOL, rows


def _round_trip(src: Path, dst: Path) -> None:
    """mmjax → HF folder: the same tensors bit for bit, and transformers runs it the same."""
    from safetensors.numpy import load_file

    model, variables = hf.load(src)
    hf.save(model, variables, dst)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    a = {k: v for k, v in a.items() if not k.endswith("num_batches_tracked")}  # a counter
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (json.loads((dst / "config.json").read_text())["model_type"]
            == json.loads((src / "config.json").read_text())["model_type"])


@pytest.mark.slow
@pytest.mark.parametrize("kw,pooler", [
    ({}, True),
    ({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
      "hidden_act": "gelu_new", "layer_norm_eps": 1e-5}, False),
])
def test_bert_matches_transformers(tmp_path: Path, kw: dict, pooler: bool) -> None:
    src = _bert(tmp_path / "bert", pooler, **kw)
    rows = hf.compare(src, batch=3, seed=3)  # rows 2 and 3 are padded
    _check(rows, ("last_hidden_state", "pooler_output") if pooler else ("last_hidden_state",))
    _round_trip(src, tmp_path / "back")
    _check(hf.compare(tmp_path / "back", seed=4), ("last_hidden_state",))


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    {},
    {"image_size": 12, "patch_size": 4, "num_attention_heads": 2, "num_hidden_layers": 1,
     "qkv_bias": True, "layer_norm_eps": 1e-9},
])
def test_vit_matches_transformers(tmp_path: Path, kw: dict) -> None:
    src = _vit(tmp_path / "vit", **kw)
    model, variables = hf.load(src)
    pixels = hf.random_inputs(json.loads(model.hf_config), batch=2, seed=5)["pixel_values"]
    out = model.apply(variables, pixel_values=pixels)
    assert out["last_hidden_state"].shape[0] == 2
    _check(hf.compare(src, model, variables, seed=5), ("last_hidden_state", "pooler_output"))
    _round_trip(src, tmp_path / "back")


@pytest.mark.slow
@pytest.mark.parametrize("eos", [7, 2])  # eos pooling, and the legacy argmax pooling
def test_clip_matches_transformers(tmp_path: Path, eos: int) -> None:
    src = _clip(tmp_path / "clip", eos)
    rows = hf.compare(src, batch=3, seed=6)
    _check(rows, ("text_embeds", "image_embeds", "logits_per_image", "logits_per_text"))
    _round_trip(src, tmp_path / "back")


@pytest.mark.parametrize("kw", [
    {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
    {"embedding_size": 4, "hidden_sizes": [16, 32, 64, 128], "depths": [2, 2, 2, 2],
     "layer_type": "bottleneck"},  # the "26" variant, narrow
])
def test_resnet_matches_transformers(tmp_path: Path, kw: dict) -> None:
    torch.manual_seed(3)
    model = transformers.ResNetModel(transformers.ResNetConfig(**kw))
    with torch.no_grad():  # non-trivial BatchNorm statistics, so inference mode is tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    model.save_pretrained(tmp_path / "resnet")
    rows = hf.compare(tmp_path / "resnet", seed=7)
    assert {"image/stage1", "last_hidden_state", "pooler_output"} <= {n for n, _ in rows}
    assert max(d for _, d in rows) <= TOL, rows
    _round_trip(tmp_path / "resnet", tmp_path / "back")


def test_bad_folders_name_the_culprit(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    src = _bert(tmp_path / "bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    weights = load_file(str(src / "model.safetensors"))

    def variant(name: str, change: dict) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((src / "config.json").read_text())
        save_file({k: v for k, v in {**weights, **change}.items() if v is not None},
                  str(d / "model.safetensors"))
        return d

    name = "encoder.layer.0.attention.self.key.weight"
    with pytest.raises(hf.HFError, match=f"missing weight '{name}'"):
        hf.load(variant("missing", {name: None}))
    with pytest.raises(hf.HFError, match=r"unexpected weight 'extra\.weight'"):
        hf.load(variant("extra", {"extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(hf.HFError, match=f"weight '{name}' has shape"):
        hf.load(variant("shape", {name: np.zeros((32, 31), np.float32)}))
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(hf.HFError, match="model_type='gpt2'"):
        hf.load(other)


@pytest.mark.slow
def test_convert_cli_round_trip_and_verify(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    src = _vit(tmp_path / "vit")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mmjax.convert", *a], cwd=ROOT,
                                    env=env, capture_output=True, text=True, timeout=120)
    r = run("--input", str(src), "--output", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "ck" / "checkpoints" / "0" / "state").is_dir()
    r = run("--input", str(tmp_path / "ck"), "--output", str(tmp_path / "back"), "--verify")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "image/layer_1" in r.stdout and "pooler_output" in r.stdout, r.stdout
    assert "(ok)" in r.stdout, r.stdout
    a, b = load_file(str(src / "model.safetensors")), load_file(
        str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # The converted checkpoint serves as a tower's init_from as well.
    tower = transfer.load_tower(str(tmp_path / "ck"), "image", "vit")
    assert tower["encoder"]["layer_1"]["attn"]["query"]["kernel"].shape == (32, 4, 8)
    with pytest.raises(checkpoint.CheckpointReadError, match="nowhere"):
        hf.convert(str(tmp_path / "nowhere"), str(tmp_path / "x"))


def _config(text_from: str, image_from: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({"model": {
        "encoders": {
            "text": {"kind": "text", "init_from": text_from, "vocab_size": 0},
            "image": {"kind": "vit", "variant": "mu/8", "width": 32, "depth": 0, "num_heads": 2,
                      "init_from": image_from},
        },
        "fusion": {"kind": "cross_attention", "width": 32, "depth": 1, "num_heads": 2},
        "heads": {"answer": {"kind": "classification", "num_classes": 5}},
        "dropout": 0.0, "dtype": "float32",
    }})
    c.lock()
    return c


def _init(config: ml_collections.ConfigDict, image: int = 16) -> dict:
    model = build_model(config.model)
    batch = {"image": np.ones((2, image, image, 3), np.float32),
             "text": {"ids": np.ones((2, 6), np.int32), "mask": np.ones((2, 6), np.int32)}}
    # Tracing for shapes is enough (apply_init_from only sees the tree); compiling the whole
    # model's init would dominate this test's time on a 2-core machine.
    shapes = jax.eval_shape(model.init, jax.random.key(0), batch)["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


def test_apply_init_from_loads_only_its_tower(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                              ) -> None:
    src = _bert(tmp_path / "bert", num_hidden_layers=1)
    config = _config(str(src))
    transfer.apply_encoder_overrides(config)
    text = config.model.encoders.text
    assert text.width == 48 and text.num_heads == 3
    assert text.layer_norm_eps == pytest.approx(1e-7)
    assert text.pre_norm is False and text.pooler is True
    fresh = _init(config)
    with caplog.at_level(logging.INFO):
        params = transfer.apply_init_from(config, fresh, logging.getLogger("test"))
    _, ref = hf.load(src)
    jax.tree.map(np.testing.assert_array_equal, params["text"], ref["params"]["text"])
    for part in ("image", "fusion", "heads"):
        assert params[part] is fresh[part]
    assert "fresh ['fusion', 'heads', 'image']" in caplog.text
    # A tower whose shapes do not fit the folder fails naming the tensor.
    bad = {**fresh, "text": jax.tree.map(lambda x: x, fresh["text"])}
    bad["text"]["embed_norm"]["scale"] = np.zeros(5, np.float32)
    with pytest.raises(transfer.TransferError, match="text/embed_norm/scale has shape"):
        transfer.apply_init_from(config, bad)


def test_vit_init_from_resizes_positions(tmp_path: Path) -> None:
    src = _vit(tmp_path / "vit", image_size=16)  # a 2x2 patch grid; the run uses 32 px (4x4)
    config = _config("", str(src))
    transfer.apply_encoder_overrides(config)
    image = config.model.encoders.image
    assert image.patch_size == 8 and image.qkv_bias is False
    _, ref = hf.load(src)
    image = jax.tree.map(np.asarray, ref["params"]["image"])
    fresh = {"image": {**image, "pos_embedding": np.zeros((1, 17, 32), np.float32)},
             "heads": {}}
    params = transfer.apply_init_from(config, fresh)
    assert params["image"]["pos_embedding"].shape == (1, 17, 32)
    np.testing.assert_array_equal(params["image"]["pos_embedding"][0, 0],
                                  image["pos_embedding"][0, 0])  # the class token's is kept


def test_tokenizer_from_folder(tmp_path: Path) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "colour", "is", "the", "circle"]
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(
        tmp_path / "tok")
    tok = hf.load_tokenizer(tmp_path / "tok")
    assert tok.vocab_size == len(vocab)
    ids, mask = tok.encode(["what colour is the circle", "the square"], max_len=8)
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (2, 8)
    assert ids[0, :7].tolist() == [2, 5, 6, 7, 8, 9, 3] and ids[0, 7] == 0
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]


def test_hf_tower_into_a_scanned_model_and_back(tmp_path: Path) -> None:
    """model.scan_layers=True: a HF BERT loads into the stacked layout with its tensors intact
    (tests/test_scan.py shows the layouts compute the same), and a checkpoint saved stacked
    exports to the same HF tensors."""
    from safetensors.numpy import load_file

    src = _bert(tmp_path / "bert")
    config = _config(str(src))
    transfer.apply_encoder_overrides(config)
    with config.unlocked():
        config.model.scan_layers = True
    params = transfer.apply_init_from(config, _init(config))
    stacked = params["text"]["encoder"][scan.SCANNED]
    assert stacked["attn"]["query"]["kernel"].shape == (2, 48, 3, 16)
    # apply_init_from checked names and shapes against the scanned model; the values must be
    # the HF tensors, which hf.load gives in the unrolled layout.
    wrapper, ref = hf.load(src)
    jax.tree.map(np.testing.assert_array_equal, scan.unstack_all(params["text"]),
                 ref["params"]["text"])

    checkpoint.write_checkpoint(tmp_path / "ck", {"text": params["text"]},
                                json.loads(wrapper.hf_config))
    hf.convert(str(tmp_path / "ck"), str(tmp_path / "back"))
    a = load_file(str(src / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
