"""Pretrained towers in training: ``config.model.encoders.<modality>.init_from``.

A tower starts from a Hugging Face folder (BERT, ViT, either tower of CLIP, AST, the encoder of
a Whisper model) or from an mmjax checkpoint (a workdir written by ``python -m mmjax.convert`` or
by training, a step directory, or its ``state`` item). Only that tower's subtree
``params[<modality>]`` is replaced; everything else keeps its fresh initialisation, and the log
says which is which. ``encoder_overrides`` reads the architecture from the source, so a config
that names only ``kind`` and ``init_from`` builds a tower whose shapes fit.

A whole model (or any set of its subtrees) starts from an earlier run with the top-level
``config.init_from`` and ``config.init_subtrees``; see :func:`apply_config_init_from`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mmjax import hf, modalities
from mmjax.io.checkpoint import (
    HF_CONFIG,
    CheckpointReadError,
    checkpoint_state_dir,
    workdir_of,
)
from mmjax.models import scan
from mmjax.models import video as video_model
from mmjax.optim import lora


class TransferError(ValueError):
    """A tower cannot start from its ``init_from``; the message names the key and tensor."""


def _hf_tower(cfg: Mapping[str, Any], kind: str | None, where: str) -> tuple[str, dict]:
    """(tower name in the folder, encoder options) for ``kind``, from the architecture registry."""
    try:
        return hf.registry.architecture(cfg).tower_options(cfg, kind)
    except hf.HFError as e:
        raise TransferError(f"{where}: {e}") from None


def encoder_overrides(init_from: str, kind: str | None = None,
                      modality: str | None = None) -> dict[str, Any]:
    """Encoder config options implied by ``init_from`` (width, depth, heads, norms, pooling...).

    ``kind`` ("text"/"vit") picks the tower of a CLIP folder. For an mmjax checkpoint the
    options come from its ``hf_config.json`` (written by ``mmjax.convert``) or, for a training
    workdir, from ``config.json``'s ``model.encoders.<modality>``; the BERT/ViT pooler is
    assumed present.
    """
    where = f"init_from={init_from!r}"
    if hf.is_hf_folder(init_from):
        cfg = hf.read_config(init_from)
        out = dict(_hf_tower(cfg, kind, where)[1])
        if cfg["model_type"] in ("bert", "vit"):
            pooled = any(k.startswith(("pooler.", f"{cfg['model_type']}.pooler."))
                         for k in _weight_names(init_from))
            out["pooler"] = pooled
        return out
    work = workdir_of(Path(init_from))
    if work is not None and (work / HF_CONFIG).is_file():
        cfg = json.loads((work / HF_CONFIG).read_text())
        return dict(_hf_tower(cfg, kind, where)[1])
    if work is not None and (work / "config.json").is_file() and modality:
        model = json.loads((work / "config.json").read_text()).get("model", {})
        enc = dict((model.get("encoders") or model).get(modality) or {})
        # (model-wide keys that older configs repeated per tower are dropped too)
        for key in ("kind", "init_from", "dropout", "dtype", "attn_implementation", "remat",
                    "padding", "scan_layers", "scan_unroll"):
            enc.pop(key, None)
        return enc
    return {}


def _weight_names(path: str | Path) -> list[str]:
    st = Path(path) / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), "np") as f:
            return list(f.keys())
    return list(hf.read_weights(path))


def encoder_entries(model_cfg: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """``{modality: encoder config}`` of ``config.model.encoders``."""
    return dict(model_cfg.get("encoders") or {})


def apply_encoder_overrides(config: Any, log: logging.Logger | None = None) -> None:
    """Writes ``encoder_overrides`` into every ``config.model.encoders.<modality>`` with an
    ``init_from``.

    The source's architecture wins over values in the config (a pretrained tower cannot change
    shape); a changed value is logged.
    """
    log = log or logging.getLogger(__name__)
    towers: dict[str, Any] = encoder_entries(config.model)  # the config's own (mutable) entries
    for modality, enc in towers.items():
        init_from = enc.get("init_from", "")
        if not init_from:
            continue
        over = encoder_overrides(init_from, enc.get("kind"), modality)
        ctx = config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext()
        with ctx:
            for key, value in over.items():
                old = enc.get(key, None)
                if old not in (None, 0, "") and old != value:
                    log.info("model.encoders.%s.%s=%r replaced by %r from %s", modality, key,
                             old, value, init_from)
                try:
                    enc[key] = value
                except (TypeError, AttributeError) as e:
                    raise TransferError(f"model.encoders.{modality}.{key}: cannot take "
                                        f"{value!r} from {init_from}: {e}") from e


def load_tower(init_from: str, modality: str, kind: str | None = None) -> dict[str, Any]:
    """The params subtree of one tower from a Hugging Face folder or an mmjax checkpoint."""
    where = f"model.encoders.{modality}.init_from={init_from!r}"
    if hf.is_hf_folder(init_from):
        cfg = hf.read_config(init_from)
        part = _hf_tower(cfg, kind, where)[0]
        _, variables = hf.load(init_from)
        return jax.tree.map(np.asarray, variables["params"][part])
    params = lora.read_model_params(init_from)
    if modality in params:
        return params[modality]
    reads = modalities.of_tower(kind)
    if reads is not None and reads in params:  # a converted checkpoint names its tower by the
        return params[reads]  # modality it reads
    raise TransferError(f"{where}: the checkpoint has no params/{modality} "
                        f"(it has {sorted(params)})")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a/b/c": leaf}`` (with ``prefix`` in front of every key)."""
    return {prefix + k: v for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _check_shape(where: str, name: str, got: Any, want: Any) -> None:
    if tuple(np.shape(got)) != tuple(np.shape(want)):
        raise TransferError(f"{where}: tensor {name} has shape {tuple(np.shape(got))}, "
                            f"the model expects {tuple(np.shape(want))}")


def _check_fit(loaded: Mapping[str, Any], fresh: Mapping[str, Any], modality: str,
               where: str) -> None:
    got, want = _flat(loaded, f"{modality}/"), _flat(fresh, f"{modality}/")
    for name in sorted(want):
        if name not in got:
            raise TransferError(f"{where}: missing tensor {name}")
    for name in sorted(got):
        if name not in want:
            raise TransferError(f"{where}: unexpected tensor {name} (the config's tower has "
                                "no such parameter)")
        _check_shape(where, name, got[name], want[name])


def _fit_positions(tower: dict[str, Any], fresh: Mapping[str, Any], modality: str,
                   where: str, log: logging.Logger) -> dict[str, Any]:
    """Resizes a ViT's position embeddings to this run's square patch grid (bilinear).

    A pretrained ViT is tied to its training resolution only through ``pos_embedding``;
    resampling the grid, as the ViT paper does for fine-tuning, lets it read other image sizes.
    """
    old, new = tower.get("pos_embedding"), fresh.get("pos_embedding")
    if old is None or new is None or np.shape(old) == np.shape(new):
        return tower
    extra = 1 if "cls" in tower else 0
    n_old, n_new = old.shape[1] - extra, new.shape[1] - extra
    g_old, g_new = math.isqrt(n_old), math.isqrt(n_new)
    if g_old**2 != n_old or g_new**2 != n_new or old.shape[2] != new.shape[2]:
        raise TransferError(f"{where}: tensor {modality}/pos_embedding has shape {old.shape}, "
                            f"the model expects {tuple(new.shape)} (only square grids resize)")
    grid = np.asarray(old[:, extra:]).reshape(1, g_old, g_old, -1)
    grid = jax.image.resize(grid, (1, g_new, g_new, grid.shape[-1]), "bilinear")
    pos = np.concatenate([np.asarray(old[:, :extra]), np.asarray(grid).reshape(1, n_new, -1)], 1)
    log.info("%s: position embeddings resized from a %dx%d to a %dx%d patch grid", where,
             g_old, g_old, g_new, g_new)
    return {**tower, "pos_embedding": pos}


def _inflated(tower: dict[str, Any], fresh: Mapping[str, Any], how: str, where: str,
              log: logging.Logger) -> dict[str, Any]:
    """An image ViT's params as a video tower's: the patch kernel inflated into the fresh
    tower's tubelet (``models.video.inflate``: ``how`` is ``model.encoders.video.inflate``),
    the temporal positions kept fresh. A video tower's own params pass unchanged."""
    kernel = np.asarray(tower.get("embedding", {}).get("kernel", np.zeros(0)))
    want = np.shape(fresh.get("embedding", {}).get("kernel", np.zeros(0)))
    if kernel.ndim != 4 or len(want) != 5:
        return tower
    try:
        out = video_model.inflate_params(tower, int(want[0]), how)
    except ValueError as e:
        raise TransferError(f"{where}: {e}") from None
    for name in ("time_embedding",):
        if name in fresh and name not in out:
            out[name] = np.asarray(fresh[name])
    log.info("%s: image patch kernel inflated to %d frames (%s)", where, want[0], how)
    return out


def apply_init_from(config: Any, params: Mapping[str, Any],
                    log: logging.Logger | None = None) -> dict[str, Any]:
    """``params`` with every tower that has ``init_from`` replaced by its pretrained subtree.

    Shapes and names are checked against the freshly initialised subtree, so a mismatch fails
    before training with the tensor named. The loaded and fresh top-level names are logged.
    """
    import jax.numpy as jnp

    log = log or logging.getLogger(__name__)
    out = dict(params)
    loaded_names = []
    for modality, enc in encoder_entries(config.model).items():
        init_from = enc.get("init_from", "")
        if not init_from:
            continue
        where = f"model.encoders.{modality}.init_from={init_from!r}"
        if modality not in params:
            raise TransferError(f"{where}: the model has no params/{modality}")
        tower = scan.match_layers(load_tower(init_from, modality, enc.get("kind")),
                                    params[modality])  # scanned model or checkpoint
        if enc.get("kind") == "vivit":
            tower = _inflated(tower, params[modality], str(enc.get("inflate", "central")),
                              where, log)
        if enc.get("kind") in ("vit", "vivit"):
            tower = _fit_positions(tower, params[modality], modality, where, log)
        _check_fit(tower, params[modality], modality, where)
        dtypes = _flat(params[modality])
        out[modality] = _unflat({k: jnp.asarray(v, dtypes[k].dtype)
                                 for k, v in _flat(tower).items()})
        loaded_names.append(modality)
        log.info("%s: loaded %d tensors into params/%s", where, len(_flat(tower)), modality)
    fresh = sorted(k for k in out if k not in loaded_names)
    if loaded_names:
        log.info("init_from: loaded %s; fresh %s", sorted(loaded_names), fresh)
    return out


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


DEFAULT_EXCLUDED = ("heads",)  # not loaded by config.init_from unless init_subtrees names them


@dataclasses.dataclass
class InitReport:
    """What :func:`load_subtrees` did: loaded leaves per subtree, missing and unexpected keys.

    ``missing``: in a listed subtree of the model but not in the checkpoint (kept fresh).
    ``unexpected``: in a listed subtree of the checkpoint but not in the model (ignored).
    """

    source: str
    loaded: dict[str, int]
    missing: list[str]
    unexpected: list[str]

    def summary(self, limit: int = 10) -> str:
        def names(keys: list[str]) -> str:
            more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        loaded = ", ".join(f"{k}: {n}" for k, n in self.loaded.items())
        return (f"init_from={self.source!r}: loaded leaves {{{loaded}}}; "
                f"{len(self.missing)} missing (kept fresh){': ' if self.missing else ''}"
                f"{names(self.missing)}; {len(self.unexpected)} unexpected (ignored)"
                f"{': ' if self.unexpected else ''}{names(self.unexpected)}")


def parse_subtrees(spec: str | Sequence[str] | None, params: Mapping[str, Any]) -> list[str]:
    """``"image,heads/clip"`` → ``["image", "heads/clip"]``; empty → every top-level name of
    ``params`` except ``heads`` (a new task's head rarely fits the old one)."""
    if isinstance(spec, str):
        spec = [s.strip().strip("/") for s in spec.split(",")]
    names = [s for s in (spec or []) if s]
    if not names:
        names = [k for k in params if k not in DEFAULT_EXCLUDED]
    return list(dict.fromkeys(names))


def _subtree(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _flat_at(tree: Any, path: str) -> dict[str, Any]:
    """``{full path: leaf}`` below ``path`` (a single leaf is its own subtree)."""
    node = _subtree(tree, path)
    if node is None:
        return {}
    return _flat(node, f"{path}/") if isinstance(node, Mapping) else {path: node}


def load_subtrees(source: str | Path, params: Mapping[str, Any],
                  subtrees: str | Sequence[str] | None = None) -> tuple[dict[str, Any], InitReport]:
    """``params`` with the listed subtrees replaced by an mmjax checkpoint's values, and a report.

    ``source`` is a training workdir, ``WORKDIR/checkpoints/<step>`` or its ``state`` item (the
    newest step of a workdir). Keys present on both sides are loaded (cast to the fresh dtype);
    a shape difference raises :class:`TransferError` naming the key and both shapes, and so does
    a listed subtree found on neither side. Keys on one side only are reported, not fatal, so a
    model that grew a parameter (or lost one) still starts from the rest.
    """
    import jax.numpy as jnp

    where = f"init_from={str(source)!r}"
    if hf.is_hf_folder(source):
        raise TransferError(f"{where}: {source} is a Hugging Face folder; config.init_from takes "
                            "an mmjax checkpoint (use model.encoders.<modality>.init_from for a "
                            "HF tower)")
    try:  # fails first, naming the path, if it is not a checkpoint
        checkpoint_state_dir(source)
    except CheckpointReadError as e:
        raise TransferError(f"{where}: {e}") from None
    ckpt = scan.match_layers(lora.read_model_params(source), params)  # scanned or unrolled
    names = parse_subtrees(subtrees, params)
    fresh = _flat(params)
    loaded: dict[str, int] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    replace: dict[str, Any] = {}
    for name in names:
        want, got = _flat_at(params, name), _flat_at(ckpt, name)
        if not want and not got:
            raise TransferError(f"{where}: init_subtrees names {name!r}, which is in neither the "
                                f"model's params (top level {sorted(params)}) nor the "
                                f"checkpoint's (top level {sorted(ckpt)})")
        missing += [k for k in want if k not in got]
        unexpected += [k for k in got if k not in want]
        count = 0
        for key in want:
            if key not in got:
                continue
            _check_shape(where, key, got[key], want[key])
            replace[key] = jnp.asarray(got[key], fresh[key].dtype)
            count += 1
        loaded[name] = count
    out = _unflat({k: replace.get(k, v) for k, v in fresh.items()})
    report = InitReport(str(source), loaded, sorted(set(missing)), sorted(set(unexpected)))
    return out, report


def apply_config_init_from(config: Any, params: Mapping[str, Any],
                           log: logging.Logger | None = None) -> dict[str, Any]:
    """``params`` with ``config.init_subtrees`` loaded from ``config.init_from`` (fine-tuning).

    ``config.init_from`` (default ``""`` = fresh) names an mmjax checkpoint (see
    :func:`load_subtrees`); ``config.init_subtrees`` (default ``""`` = every top-level subtree
    but ``heads``) is a comma-separated list of param paths such as ``"image,text,fusion"`` or
    ``"image,heads/clip"``. Only params are loaded: the optimizer state and the step start
    fresh. A resumed run is not affected: the trainer restores its own checkpoint over this
    state. The report (loaded leaves per subtree, missing and unexpected keys) is logged.
    """
    log = log or logging.getLogger(__name__)
    source = config.get("init_from", "") or ""
    if not source:
        return dict(params)
    subtrees = config.get("init_subtrees", "") or ""
    out, report = load_subtrees(source, params, subtrees)
    towers = {m for m, enc in encoder_entries(config.model).items() if enc.get("init_from")}
    overridden = sorted(t for t in towers if any(n.split("/")[0] == t for n in report.loaded))
    if overridden:
        log.warning("config.init_from=%r replaces towers %s that "
                    "model.encoders.<modality>.init_from loaded", source, overridden)
    log.info("%s", report.summary())
    if report.missing or report.unexpected:
        log.warning("config.init_from=%r: %d missing keys keep their fresh init, %d unexpected "
                    "keys are ignored (see the line above)", source, len(report.missing),
                    len(report.unexpected))
    return out
