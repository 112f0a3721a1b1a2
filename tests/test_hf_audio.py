"""Audio towers from Hugging Face: AST and the Whisper encoder against transformers.

Tiny random PyTorch models are built here with odd shapes (odd frame counts, non-default
strides, head sizes of 4 and 12, few layers) and every weight re-drawn (transformers initialises
AST's tokens and positions to zero, which would hide a mapping error); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from safetensors.numpy import load_file, save_file

from mmjax import hf
from mmjax.models import scan
from mmjax.models.audio import whisper_sinusoids
from mmjax.models.multimodal import build_model
from mmjax.trainer import transfer

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _randomise(model: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_positions" not in name:  # Whisper's are fixed sinusoids
                p.normal_(0.0, 0.3 if p.ndim > 1 else 0.1)


def _ast(path: Path, seed: int = 0, **kw: object) -> Path:
    cfg = transformers.ASTConfig(**{
        "hidden_size": 36, "num_hidden_layers": 2, "num_attention_heads": 3,
        "intermediate_size": 50, "max_length": 37, "num_mel_bins": 21, "patch_size": 16,
        "frequency_stride": 3, "time_stride": 7, "layer_norm_eps": 1e-6, **kw})
    model = transformers.ASTModel(cfg)
    _randomise(model, seed)
    model.save_pretrained(path)
    return path


def _whisper(path: Path, cls: str = "WhisperForConditionalGeneration", seed: int = 1,
             **kw: object) -> Path:
    cfg = transformers.WhisperConfig(**{
        "d_model": 36, "encoder_layers": 2, "encoder_attention_heads": 3,
        "encoder_ffn_dim": 50, "num_mel_bins": 11, "max_source_positions": 13,
        "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 24,
        "vocab_size": 40, "max_target_positions": 8, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "decoder_start_token_id": 1, **kw})
    model = getattr(transformers, cls)(cfg)
    _randomise(model, seed)
    model.save_pretrained(path)
    return path


def _bert(path: Path) -> Path:
    cfg = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=8)
    transformers.BertModel(cfg).save_pretrained(path)
    return path


def _check(rows: list[tuple[str, float]], outputs: tuple[str, ...], depth: int) -> float:
    names = [n for n, _ in rows]
    assert {*outputs, *(f"audio/layer_{i}" for i in range(depth))} <= set(names), names
    worst = max(d for _, d in rows)
    assert worst <= TOL, rows
    return worst


def _same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("kw", [
    {},  # 37 frames x 21 mels, strides (3, 7): a 2 x 4 patch grid; head size 12
    {"hidden_size": 20, "num_attention_heads": 5, "num_hidden_layers": 1, "max_length": 33,
     "num_mel_bins": 16, "frequency_stride": 10, "time_stride": 10, "qkv_bias": False,
     "hidden_act": "gelu_new", "layer_norm_eps": 1e-12},  # head size 4, one mel patch
])
def test_ast_matches_transformers(tmp_path: Path, kw: dict) -> None:
    src = _ast(tmp_path / "ast", **kw)
    model, variables = hf.load(src)
    cfg = json.loads(model.hf_config)
    x = hf.random_inputs(cfg, batch=2, seed=3)["input_values"]
    out = model.apply(variables, input_values=x)
    grid = ((cfg["num_mel_bins"] - 16) // cfg["frequency_stride"] + 1) * (
        (cfg["max_length"] - 16) // cfg["time_stride"] + 1)
    assert out["last_hidden_state"].shape == (2, grid + 2, cfg["hidden_size"])
    _check(hf.compare(src, model, variables, seed=3), ("last_hidden_state", "pooler_output"),
           cfg["num_hidden_layers"])
    hf.save(model, variables, tmp_path / "back")  # the same tensors, and transformers agrees
    _same_tensors(load_file(str(src / "model.safetensors")),
                  load_file(str(tmp_path / "back" / "model.safetensors")))
    _check(hf.compare(tmp_path / "back", seed=4), ("last_hidden_state",), 1)


def test_ast_classification_checkpoint_loads_its_tower(tmp_path: Path) -> None:
    cfg = transformers.ASTConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=30, max_length=20, num_mel_bins=16,
                                 num_labels=3)
    transformers.ASTForAudioClassification(cfg).save_pretrained(tmp_path / "cls")
    _, variables = hf.load(tmp_path / "cls")
    weights = load_file(str(tmp_path / "cls" / "model.safetensors"))
    tower = "audio_spectrogram_transformer.layernorm.weight"
    np.testing.assert_array_equal(
        variables["params"]["audio"]["encoder"]["final_norm"]["scale"], weights[tower])


@pytest.mark.slow
@pytest.mark.parametrize("cls,kw", [
    ("WhisperForConditionalGeneration", {}),  # model.encoder.*; 26 frames -> 13 tokens
    ("WhisperModel", {"d_model": 20, "encoder_attention_heads": 5, "encoder_layers": 1,
                      "num_mel_bins": 8, "max_source_positions": 9,
                      "activation_function": "gelu_new"}),  # encoder.*; head size 4
])
def test_whisper_encoder_matches_transformers(tmp_path: Path, cls: str, kw: dict) -> None:
    src = _whisper(tmp_path / "whisper", cls, **kw)
    model, variables = hf.load(src)
    cfg = json.loads(model.hf_config)
    _check(hf.compare(src, model, variables, seed=5), ("last_hidden_state",),
           cfg["encoder_layers"])
    # An odd number of frames, shorter than Whisper's padded length: ceil(T / 2) tokens.
    frames = 2 * cfg["max_source_positions"] - 5
    x = np.random.default_rng(6).standard_normal((2, cfg["num_mel_bins"], frames), np.float32)
    out = model.apply(variables, input_features=x)["last_hidden_state"]
    assert out.shape == (2, (frames + 1) // 2, cfg["d_model"])
    # Saved as an encoder-only folder: the encoder's tensors exactly, which transformers'
    # WhisperEncoder loads and runs the same.
    hf.save(model, variables, tmp_path / "back")
    prefix = "model.encoder." if cls == "WhisperForConditionalGeneration" else "encoder."
    src_w = {k.removeprefix(prefix): v for k, v in load_file(
        str(src / "model.safetensors")).items() if k.startswith(prefix)}
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    np.testing.assert_allclose(back.pop("embed_positions.weight"),
                               src_w.pop("embed_positions.weight"), atol=1e-6)
    _same_tensors(src_w, back)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == [
        "WhisperEncoder"]
    _check(hf.compare(tmp_path / "back", seed=7), ("last_hidden_state",), cfg["encoder_layers"])
    # The key bias mmjax's attention has (Whisper's k_proj has none) loads as zeros.
    key = variables["params"]["audio"]["encoder"]["layer_0"]["attn"]["key"]
    assert not np.any(np.asarray(key["bias"]))


def test_whisper_positions_are_checked(tmp_path: Path) -> None:
    reference = transformers.models.whisper.modeling_whisper.sinusoids
    for width in (384, 1280):  # whisper-tiny's and large's, at Whisper's 1500 positions
        ours, theirs = whisper_sinusoids(1500, width), reference(1500, width).numpy()
        # float32 angles pos·ω at pos ≈ 1500 are off the exact ones by up to ~1500·ω·2^-23
        # ≈ 1e-4 rad, and torch and numpy round ω differently: each table is within 1.1e-4 of
        # the float64 one, so within 2.5e-4 of each other (measured 1.2e-4 on this machine).
        half = width // 2
        exact = np.arange(1500)[:, None] * np.exp(-np.log(10000) / (half - 1) * np.arange(half))
        exact = np.concatenate([np.sin(exact), np.cos(exact)], axis=1)
        np.testing.assert_allclose(ours, exact, atol=1.1e-4)
        np.testing.assert_allclose(ours, theirs, atol=2.5e-4)
        np.testing.assert_allclose(ours[:100], theirs[:100], atol=2e-5)  # the same bound at 100
    src = _whisper(tmp_path / "w", "WhisperModel")
    weights = load_file(str(src / "model.safetensors"))
    weights["encoder.embed_positions.weight"] = weights["encoder.embed_positions.weight"] + 1e-3
    save_file(weights, str(src / "model.safetensors"))
    with pytest.raises(hf.HFError, match=r"embed_positions\.weight"):
        hf.load(src)


@pytest.mark.slow
def test_convert_verify_cli_and_checkpoint_round_trip(tmp_path: Path) -> None:
    src = _ast(tmp_path / "ast", seed=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "mmjax.convert", "--input", str(src), "--verify"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "audio/layer_1" in r.stdout and "pooler_output" in r.stdout, r.stdout
    assert "(ok)" in r.stdout, r.stdout
    # Whisper: HF -> mmjax checkpoint -> HF folder, verified against transformers.
    wsrc = _whisper(tmp_path / "whisper", "WhisperModel")
    hf.convert(str(wsrc), str(tmp_path / "ck"))
    rows = hf.convert(str(tmp_path / "ck"), str(tmp_path / "back"), verify=True)
    _check(rows, ("last_hidden_state",), 2)
    # The converted checkpoint starts a tower too, whatever the modality is called.
    tower = transfer.load_tower(str(tmp_path / "ck"), "speech", "whisper")
    assert tower["conv2"]["kernel"].shape == (3, 36, 36)
    with pytest.raises(transfer.TransferError, match="no tower for kind='whisper'"):
        transfer.encoder_overrides(str(_bert(tmp_path / "bert")), "whisper")


def _config(audio: dict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({"model": {
        "encoders": {
            "audio": audio,
            "text": {"kind": "text", "vocab_size": 11, "width": 16, "depth": 1, "num_heads": 2},
        },
        "fusion": {"kind": "cross_attention", "width": 16, "depth": 1, "num_heads": 2},
        "heads": {"answer": {"kind": "classification", "num_classes": 3}},
    }})
    c.lock()
    return c


def _batch(audio: np.ndarray) -> dict:
    return {"audio": audio, "text": {"ids": np.ones((2, 5), np.int32),
                                     "mask": np.ones((2, 5), np.int32)}}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ast", "whisper"])
def test_init_from_loads_an_audio_tower(tmp_path: Path, kind: str) -> None:
    src = _ast(tmp_path / "hf") if kind == "ast" else _whisper(tmp_path / "hf", "WhisperModel")
    config = _config({"kind": kind, "init_from": str(src)})
    transfer.apply_encoder_overrides(config)
    assert config.model.encoders.audio.width == 36 and config.model.encoders.audio.num_heads == 3
    _, ref = hf.load(src)
    x = hf.random_inputs(hf.read_config(src), batch=2, seed=8)
    x = next(iter(x.values()))
    model = build_model(config.model)
    fresh = jax.eval_shape(model.init, jax.random.key(0), _batch(x))["params"]
    params = transfer.apply_init_from(config, fresh)
    jax.tree.map(np.testing.assert_array_equal, params["audio"], ref["params"]["audio"])
    # The tower inside the multimodal model computes what the loaded HF tower computes.
    wrapper, _ = hf.load(src)
    want = wrapper.apply(ref, x)["last_hidden_state"]
    variables = {"params": {**model.init(jax.random.key(1), _batch(x))["params"],
                            "audio": params["audio"]}}
    got = model.apply(variables, _batch(x), method="encode")["audio"]["tokens"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    if kind == "whisper":  # into the stacked layout as well
        with config.unlocked():
            config.model.scan_layers = True
        stacked = transfer.apply_init_from(config, jax.eval_shape(
            build_model(config.model).init, jax.random.key(0), _batch(x))["params"])
        assert stacked["audio"]["encoder"][scan.SCANNED]["attn"]["query"]["kernel"].shape == (
            2, 36, 3, 12)
        jax.tree.map(np.testing.assert_array_equal, scan.unstack_all(stacked["audio"]),
                     ref["params"]["audio"])
    other = "whisper" if kind == "ast" else "ast"
    with pytest.raises(transfer.TransferError, match=f"kind='{kind}', not '{other}'"):
        transfer.apply_encoder_overrides(_config({"kind": other, "init_from": str(src)}))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ast", "whisper"])
def test_audio_towers_take_the_model_options(kind: str) -> None:
    """dtype, dropout, remat and scan_layers reach the audio towers (the one Options object)."""
    from mmjax.models import layers
    from mmjax.models.audio import AST, WhisperEncoder

    opts = layers.Options(dtype=jax.numpy.bfloat16, dropout=0.5, remat="nothing_saveable",
                          scan_layers=True)
    size = {"width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 32}
    if kind == "ast":
        tower = AST(**size, frequency_stride=4, time_stride=5, opts=opts)
        x = np.random.default_rng(0).standard_normal((2, 26, 20), np.float32)
    else:
        tower = WhisperEncoder(**size, max_len=8, opts=opts)
        x = np.random.default_rng(0).standard_normal((2, 6, 15), np.float32)
    params = jax.jit(tower.init)(jax.random.key(0), x)["params"]
    assert params["encoder"][scan.SCANNED]["mlp"]["fc1"]["kernel"].shape == (2, 16, 32)

    @jax.jit
    def step(params: dict, key: jax.Array) -> tuple:
        def loss(params: dict) -> tuple:
            y = tower.apply({"params": params}, x, train=True, rngs={"dropout": key})
            return (y["pooled"].astype(np.float32) ** 2).mean(), y
        return jax.value_and_grad(loss, has_aux=True)(params)

    (a, out), grads = step(params, jax.random.key(1))
    assert out["tokens"].dtype == jax.numpy.bfloat16 and out["mask"] is None
    assert out["pooled"].shape == (2, 16)
    assert a != step(params, jax.random.key(2))[0][0]  # dropout is on in training
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    # Remat and scan were applied: the layers run as one scan whose body is a jax.checkpoint
    # under the asked-for policy.
    jaxpr = jax.make_jaxpr(step)(params, jax.random.key(1))
    assert "scan" in _primitives(jaxpr.jaxpr)
    remats = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "remat2"]
    assert remats and all(
        e.params["policy"] is jax.checkpoint_policies.nothing_saveable for e in remats)


def _equations(jaxpr) -> list:
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' params."""
    out = []
    for e in jaxpr.eqns:
        out.append(e)
        for v in e.params.values():
            for sub in v if isinstance(v, (tuple, list)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _equations(inner)
    return out


def _primitives(jaxpr) -> set[str]:
    return {e.primitive.name for e in _equations(jaxpr)}


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_ast_position_embeddings_start_at_the_given_scale(std: float) -> None:
    """``pos_embedding_std`` sets the init's spread (AST's 0.02 by default); 77 tokens x 16
    channels give a sample standard deviation within 10 % of it."""
    from mmjax.models.audio import AST

    tower = AST(width=16, depth=0, num_heads=2, mlp_dim=32, patch_size=4, frequency_stride=4,
                time_stride=4, pos_embedding_std=std)
    x = np.random.default_rng(3).standard_normal((1, 60, 20), np.float32)
    pos = tower.init(jax.random.key(5), x)["params"]["pos_embedding"]
    assert pos.shape == (1, 2 + 15 * 5, 16)
    assert float(np.std(pos)) == pytest.approx(std, rel=0.1)
