"""What every Hugging Face architecture shares: the error type, config helpers, random inputs,
and ``Architecture``, the interface one module per ``model_type`` implements.

An architecture module (``bert.py``, ``vit.py``...) turns a ``config.json`` into options of an
mmjax tower, wraps the tower to return Hugging Face's output names, lists its weight table, and
says how transformers' outputs line up with mmjax's for ``compare``. Loading, saving and
comparing (``io.py``, ``compare.py``) go through this interface only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import numpy as np

from mmjax import modalities
from mmjax.hf.table import Entry

Rows = list[tuple[str, float]]

# Hugging Face activation names → mmjax's (layers.ACTIVATIONS).
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


class HFError(ValueError):
    """A Hugging Face folder that cannot be loaded; the message names the file or tensor."""


def activation(cfg: Mapping[str, Any], where: str, default: str = "gelu") -> str:
    """mmjax's name for ``cfg["hidden_act"]``; ``where`` prefixes the error (e.g. the file)."""
    act = cfg.get("hidden_act", default)
    if act not in ACTIVATIONS:
        raise HFError(f"{where}hidden_act={act!r} has no mmjax equivalent; known: "
                      f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def pair(v: Any) -> tuple[int, int]:
    """A size given as one int or a [h, w] list, as (h, w)."""
    return (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))


def text_inputs(rng: np.random.Generator, batch: int, length: int, vocab: int,
                eos: int | None = None) -> dict[str, np.ndarray]:
    """Random ids; rows after the first are right-padded to different lengths. With ``eos``
    each row's last real token is ``eos`` (models that pool there)."""
    ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
    lengths = np.maximum(length - 2 * np.arange(batch), 1)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    if eos is not None:
        ids[np.arange(batch), lengths - 1] = eos
    return {"input_ids": ids, "attention_mask": mask}


def pixel_inputs(rng: np.random.Generator, batch: int, size: tuple[int, int],
                 channels: int) -> dict[str, np.ndarray]:
    """Standard-normal NHWC pixels."""
    h, w = size
    return {"pixel_values": rng.standard_normal((batch, h, w, channels)).astype(np.float32)}


def max_abs_diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


class Architecture:
    """One Hugging Face ``model_type`` mapped onto mmjax modules.

    Subclasses set the class attributes and implement ``build``, ``table`` and ``inputs``; the
    defaults of ``reference`` and ``layer_rows`` fit a single transformer tower (BERT, ViT).
    An instance in ``registry.ARCHITECTURES`` is all that loading, saving and comparing need.
    """

    model_type: ClassVar[str]
    hf_class: ClassVar[str]  # transformers class written to a saved config's "architectures"
    wrapper: ClassVar[type[nn.Module]]  # the module ``build`` returns
    prefix: ClassVar[str] = ""  # base-model prefix that task models' checkpoints carry
    tower: ClassVar[str] = "text"  # the mmjax tower of a single-tower model
    captured: ClassVar[tuple[str, ...]] = ("layer_", "embed_norm")  # names compare records

    def build(self, cfg: Mapping[str, Any], hf_config: str, pooler: bool = True) -> nn.Module:
        """The wrapper for ``cfg``; ``hf_config`` is kept so that export writes it back."""
        raise NotImplementedError

    def table(self, model: Any) -> list[Entry]:
        """Weight table of a wrapper ``build`` made; mmjax paths start at the collection."""
        raise NotImplementedError

    def inputs(self, cfg: Mapping[str, Any], rng: np.random.Generator, batch: int,
               length: int) -> dict[str, np.ndarray]:
        """Random inputs for ``model.apply`` (images NHWC), also used for ``init`` shapes."""
        raise NotImplementedError

    def options(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The mmjax encoder options of the folder's (single) tower."""
        raise NotImplementedError

    def tower_options(self, cfg: Mapping[str, Any], kind: str | None) -> tuple[str, dict]:
        """(tower name in the folder, encoder options) for a training tower of ``kind``
        (``config.model.encoders.<modality>.init_from``); an error when the folder has no
        such tower."""
        if kind is not None and modalities.of_tower(kind) != self.tower:
            raise HFError(f"a {self.model_type} model has no tower for kind={kind!r}")
        if kind == "resnet":
            raise HFError(f"Hugging Face {self.model_type} towers load into kind='vit', not "
                          "resnet")
        return self.tower, self.options(cfg)

    def image_size(self, cfg: Mapping[str, Any]) -> tuple[int, int]:
        """(height, width) the position embeddings were made for."""
        raise HFError(f"model_type={self.model_type!r} takes no images")

    def select_weights(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The folder's tensors that the weight table covers: a task model's base-model
        ``prefix`` (``bert.``, ``vit.``) is removed."""
        p = self.prefix
        if p and any(k.startswith(f"{p}embeddings.") for k in weights):
            return {k.removeprefix(p): v for k, v in weights.items()}
        return weights

    def fixed(self, model: Any) -> dict[str, np.ndarray]:
        """Hugging Face tensors that mmjax computes instead of storing (Whisper's sinusoidal
        positions): loading checks the folder's against them, saving writes them."""
        return {}

    def implied(self, model: Any) -> dict[tuple[str, ...], np.ndarray]:
        """mmjax variables (paths below the collection) with no Hugging Face tensor and no effect
        on the outputs (Whisper's key bias, which softmax cancels): loading sets these values,
        saving leaves them out."""
        return {}

    def export_config(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The config.json ``save`` writes: the folder's own, with ``architectures`` if absent."""
        return {**cfg, "architectures": cfg.get("architectures") or [self.hf_class]}

    def reference_model(self, path: Any) -> Any:
        """transformers' PyTorch module of a folder, run by ``compare``."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)

    def reference(self, out: Any, to_numpy: Callable[[Any], np.ndarray]
                  ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
        """transformers' output object → ({output name: array}, {tower: hidden states})."""
        names = ("last_hidden_state", "pooler_output")
        outputs = {n: to_numpy(getattr(out, n)) for n in names
                   if getattr(out, n, None) is not None}
        return outputs, {self.tower: [to_numpy(h) for h in out.hidden_states]}

    def layer_rows(self, tower: str, captured: Mapping[str, Any],
                   states: list[np.ndarray]) -> Rows:
        """Max |difference| per layer: mmjax's captured outputs against HF's hidden states.

        ``captured`` is the tower's subtree of ``capture_intermediates``; ``states[0]`` is the
        embedding output and ``states[i + 1]`` layer i's.
        """
        rows = []
        if "embed_norm" in captured:
            rows.append((f"{tower}/embeddings",
                         max_abs_diff(captured["embed_norm"]["__call__"][0], states[0])))
        enc = captured.get("encoder", {})
        for i in range(len(states) - 1):
            rows.append((f"{tower}/layer_{i}",
                         max_abs_diff(enc[f"layer_{i}"]["__call__"][0], states[i + 1])))
        return rows
