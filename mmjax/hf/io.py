"""Hugging Face folders on disk ↔ mmjax variables: config.json, weights, and the mapping (and
an audio folder's feature extractor).

Local folders only: nothing is downloaded. Every tensor goes through its architecture's weight
table, so a missing, unexpected or mis-shaped tensor is an error that names it, in both
directions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax.hf import registry
from mmjax.hf.common import HFError, max_abs_diff
from mmjax.pp.audio_features import FrontEnd

# Non-persistent buffers that older checkpoints still contain; they are not weights.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids", "num_batches_tracked")
# How far a stored tensor that mmjax computes (``Architecture.fixed``) may be from mmjax's:
# Whisper's sinusoids at angles up to 1500 rad differ by float32 rounding of the angle (an ulp
# there is 1.2e-4); anything that is not Whisper's table differs by O(1).
FIXED_TOL = 5e-4


def read_config(path: str | Path) -> dict[str, Any]:
    """The folder's config.json; an unsupported ``model_type`` is an error naming the file."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFError(f"{file}: not found (a Hugging Face folder needs config.json)")
    cfg = json.loads(file.read_text())
    kind = cfg.get("model_type")
    if kind not in registry.ARCHITECTURES:
        raise HFError(f"{file}: model_type={kind!r} is not supported; known: "
                      f"{registry.MODEL_TYPES}")
    return cfg


def read_weights(path: str | Path) -> dict[str, np.ndarray]:
    """``model.safetensors`` (preferred) or ``pytorch_model.bin`` as float32 numpy arrays."""
    path = Path(path)
    st = path / "model.safetensors"
    if st.is_file():
        from safetensors.numpy import load_file

        raw = load_file(str(st))
    elif (path / "pytorch_model.bin").is_file():
        import torch  # only needed for the legacy format

        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        raw = {k: v.float().numpy() for k, v in sd.items()}
    else:
        raise HFError(f"{path}: neither model.safetensors nor pytorch_model.bin found "
                      "(sharded checkpoints are not supported)")
    return {k: np.asarray(v, np.float32) for k, v in raw.items() if not k.endswith(_BUFFERS)}


def _path(p: tuple[str, ...]) -> str:
    return "/".join(p)


def variables_from_hf(
    model: nn.Module, weights: Mapping[str, np.ndarray], where: str = ""
) -> dict[str, Any]:
    """Maps Hugging Face tensors onto ``model``'s variables, checking names and shapes."""
    arch = registry.architecture_of(model)
    cfg = json.loads(model.hf_config)
    inputs = arch.inputs(cfg, np.random.default_rng(0), 1, 4)  # values do not matter
    expected = traverse_util.flatten_dict(
        jax.eval_shape(model.init, jax.random.key(0), **inputs))
    entries = arch.table(model)
    fixed, implied = arch.fixed(model), arch.implied(model)
    names = {e.hf for e in entries} | set(fixed)
    for name, value in fixed.items():
        got = weights.get(name)
        if got is not None and (got.shape != value.shape or max_abs_diff(got, value) > FIXED_TOL):
            diff = max_abs_diff(got, value) if got.shape == value.shape else float("nan")
            raise HFError(f"{where}weight {name!r} {tuple(got.shape)} is not what mmjax computes "
                          f"for it {tuple(value.shape)} (max |diff| {diff:.2e}; mmjax's tower "
                          "has no parameter for it)")
    for e in entries:
        if e.hf not in weights:
            raise HFError(f"{where}missing weight {e.hf!r} (mmjax {_path(e.mm)})")
    for name in weights:
        if name not in names:
            raise HFError(f"{where}unexpected weight {name!r} (no mmjax parameter takes it)")
    covered = {e.mm for e in entries} | set(implied)
    for p in expected:
        if p not in covered:
            raise HFError(f"mmjax parameter {_path(p)} has no Hugging Face source")
    flat = {}
    for e in entries:
        want = expected[e.mm].shape
        want_hf = jax.eval_shape(e.to_hf, jax.ShapeDtypeStruct(want, jnp.float32)).shape
        got = weights[e.hf]
        if tuple(got.shape) != tuple(want_hf):
            raise HFError(f"{where}weight {e.hf!r} has shape {tuple(got.shape)}, the config "
                          f"implies {tuple(want_hf)} (mmjax {_path(e.mm)})")
        flat[e.mm] = jnp.asarray(e.to_mm(got), jnp.float32)
    for p, value in implied.items():
        flat[p] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def load(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model, variables) for a local Hugging Face folder of a type in ``MODEL_TYPES``.

    ``model.apply(variables, **inputs)`` returns Hugging Face's output names; images are NHWC.
    """
    cfg = read_config(path)
    weights = registry.architecture(cfg).select_weights(read_weights(path))
    pooler = any(k.startswith("pooler.") for k in weights)
    model = registry.build(cfg, pooler=pooler)
    return model, variables_from_hf(model, weights, f"{path}: ")


def state_dict(model: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """mmjax variables → Hugging Face tensors (exact: transposes and reshapes only)."""
    flat = traverse_util.flatten_dict(dict(variables))
    fixed = registry.architecture_of(model).fixed(model)
    out = {k: np.asarray(v, np.float32) for k, v in fixed.items()}
    for e in registry.table(model):
        if e.mm not in flat:
            raise HFError(f"params have no {_path(e.mm)} (for {e.hf!r})")
        value = np.asarray(flat[e.mm])
        out[e.hf] = np.ascontiguousarray(np.asarray(e.to_hf(value), np.float32))
    return out


def save(model: nn.Module, variables: Mapping[str, Any], path: str | Path) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that ``transformers`` loads as-is."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(model.hf_config)
    cfg = registry.architecture(cfg).export_config(cfg)
    save_file(state_dict(model, variables), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return path


def load_feature_extractor(path: str | Path) -> FrontEnd:
    """The audio front end of a folder's ``preprocessor_config.json`` (AST or Whisper).

    ``fe(waveforms, sampling_rate=16000)`` returns what transformers' feature extractor returns
    for the same call: AST ``input_values`` [B, frames, mels], Whisper ``input_features``
    [B, mels, frames]; pure numpy (``mmjax.data.audio``).
    """
    file = Path(path) / "preprocessor_config.json"
    if not file.is_file():
        raise HFError(f"{file}: not found (an audio folder's feature extractor config)")
    try:
        return FrontEnd.from_config(json.loads(file.read_text()), f"{file}: ")
    except ValueError as e:
        raise HFError(str(e)) from None


def is_hf_folder(path: str | Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (a config.json with a model_type)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        return "model_type" in json.loads(file.read_text())
    except (OSError, ValueError):
        return False
