"""Hugging Face video towers (VideoMAE, ViViT): tiny random PyTorch models with odd shapes built
here, loaded through ``mmjax.hf.load``, run with ``pixel_values`` ``[B, T, C, H, W]`` against
transformers, saved back bit for bit, converted to an mmjax checkpoint and back with
``--verify``, and used as a training tower's ``init_from``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_collections
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it

import torch
import transformers

from mmjax import hf
from mmjax.models.multimodal import build_model
from mmjax.trainer import transfer

TOL = 1e-4


def _videomae(path: Path, **kw: object) -> Path:
    torch.manual_seed(4)
    cfg = transformers.VideoMAEConfig(**{
        "image_size": 12, "patch_size": 4, "num_channels": 3, "num_frames": 6,
        "tubelet_size": 3, "hidden_size": 30, "num_hidden_layers": 2, "num_attention_heads": 3,
        "intermediate_size": 44, "layer_norm_eps": 1e-7, **kw})
    transformers.VideoMAEModel(cfg).save_pretrained(path)
    return path


def _vivit(path: Path, **kw: object) -> Path:
    torch.manual_seed(5)
    cfg = transformers.VivitConfig(**{
        "image_size": 10, "num_frames": 4, "tubelet_size": [2, 5, 5], "num_channels": 3,
        "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 40, "layer_norm_eps": 1e-5, **kw})
    model = transformers.VivitModel(cfg)
    with torch.no_grad():  # transformers initialises these at zero: make them count
        model.embeddings.cls_token.normal_()
        model.embeddings.position_embeddings.normal_()
    model.save_pretrained(path)
    return path


def _torch(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x))
    return {k: v.numpy() for k, v in out.items() if v is not None and hasattr(v, "numpy")}


def _same_tensors(src: Path, dst: Path) -> None:
    from safetensors.numpy import load_file

    a, b = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("kind,kw", [
    ("videomae", {}),
    ("videomae", {"use_mean_pooling": False, "qkv_bias": False, "hidden_act": "gelu_new"}),
    ("vivit", {}),
    ("vivit", {"qkv_bias": False, "hidden_act": "gelu"}),
])
def test_video_towers_match_transformers(tmp_path: Path, kind: str, kw: dict) -> None:
    src = (_videomae if kind == "videomae" else _vivit)(tmp_path / kind, **kw)
    model, variables = hf.load(src)
    cfg = json.loads(model.hf_config)
    size = cfg["image_size"]
    x = np.random.default_rng(7).standard_normal(
        (3, cfg["num_frames"], 3, size, size)).astype(np.float32)
    out = model.apply(variables, pixel_values=x)
    ref = _torch(src, x)
    names = {"last_hidden_state", "pooler_output"} if kind == "vivit" else {"last_hidden_state"}
    assert set(out) == set(ref) == names
    for name in names:
        assert out[name].shape == ref[name].shape
        err = float(np.abs(np.asarray(out[name]) - ref[name]).max())
        assert err <= TOL, (name, err)
    hf.save(model, variables, tmp_path / "back")
    _same_tensors(src, tmp_path / "back")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["videomae", "vivit"])
def test_convert_verify_and_init_from(tmp_path: Path, kind: str) -> None:
    src = (_videomae if kind == "videomae" else _vivit)(tmp_path / kind)
    rows = hf.convert(str(src), str(tmp_path / "ck"), verify=True)
    assert rows and max(d for _, d in rows) <= TOL, rows
    rows = hf.convert(str(tmp_path / "ck"), str(tmp_path / "back"), verify=True)
    assert max(d for _, d in rows) <= TOL, rows
    _same_tensors(src, tmp_path / "back")

    # A training tower that names only kind and init_from starts from the folder's weights.
    model_cfg = ml_collections.ConfigDict({
        "encoders": {"video": {"kind": "vivit", "init_from": str(src)}},
        "fusion": {"kind": "concat"}, "heads": {"y": {"kind": "classification",
                                                        "num_classes": 3}}})
    enc = model_cfg.encoders.video
    with model_cfg.unlocked():
        enc.update(transfer.encoder_overrides(str(src), "vivit", "video"))
    tower = transfer.load_tower(str(src), "video", "vivit")
    _, variables = hf.load(src)
    np.testing.assert_array_equal(
        np.asarray(tower["embedding"]["kernel"]),
        np.asarray(variables["params"]["video"]["embedding"]["kernel"]))
    assert build_model(model_cfg) is not None


@pytest.mark.slow
def test_an_image_vit_folder_starts_a_video_tower(tmp_path: Path) -> None:
    """``model.encoders.video.init_from`` = an HF ViT folder: the patch kernel arrives
    inflated onto the tubelet's central frame, the blocks, positions, [CLS] and pooler as they
    are, the temporal positions fresh."""
    import jax

    torch.manual_seed(6)
    cfg = transformers.ViTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=40, image_size=12, patch_size=4,
                                 layer_norm_eps=1e-6)
    transformers.ViTModel(cfg).save_pretrained(tmp_path / "vit")
    config = ml_collections.ConfigDict({"model": {
        "encoders": {"video": {"kind": "vivit", "tubelet": 3, "init_from": str(tmp_path / "vit")},
                     "text": {"kind": "text", "variant": "mu", "vocab_size": 20, "max_len": 4}},
        "fusion": {"kind": "concat"},
        "heads": {"y": {"kind": "classification", "num_classes": 3}}}})
    transfer.apply_encoder_overrides(config)
    model = build_model(config.model)
    clip = np.random.default_rng(0).standard_normal((2, 6, 12, 12, 3)).astype(np.float32)
    text = {"ids": np.ones((2, 4), np.int32), "mask": np.ones((2, 4), np.int32)}
    fresh = jax.jit(model.init)(jax.random.key(0), {"video": clip, "text": text})["params"]
    params = transfer.apply_init_from(config, fresh)
    _, vit_vars = hf.load(tmp_path / "vit")
    want_kernel = np.asarray(vit_vars["params"]["image"]["embedding"]["kernel"])
    got = np.asarray(params["video"]["embedding"]["kernel"])
    assert got.shape == (3, *want_kernel.shape)
    np.testing.assert_array_equal(got[1], want_kernel)
    assert not got[0].any() and not got[2].any()

    for name in ("encoder", "pos_embedding", "cls", "pooler"):
        jax.tree.map(np.testing.assert_array_equal, params["video"][name],
                     vit_vars["params"]["image"][name])
    assert params["video"]["time_embedding"].shape == (1, 2, 24)  # kept fresh
