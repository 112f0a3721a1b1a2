"""Hugging Face folder ↔ mmjax checkpoint (``python -m mmjax.convert``), with verification."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmjax.hf import registry
from mmjax.hf.common import HFError
from mmjax.hf.compare import compare, format_table
from mmjax.hf.io import is_hf_folder, load, read_config, save, state_dict, variables_from_hf
from mmjax.hf.vit import vit_image_options
from mmjax.io.checkpoint import (
    HF_CONFIG,
    checkpoint_state_dir,
    workdir_of,
    write_checkpoint,
)
from mmjax.models import scan
from mmjax.optim import lora


def _export_model(params: Mapping[str, Any], cfg: Mapping[str, Any], modality: str,
                  where: str) -> tuple[Any, dict[str, Any]]:
    """The HF wrapper and its variables for params read from an mmjax checkpoint."""
    params = scan.unstack_all(params)  # a model.scan_layers run saved stacked layers
    mt = cfg["model_type"]
    if mt == "clip":
        missing = [k for k in ("text", "image", "text_projection", "visual_projection",
                               "logit_scale") if k not in params]
        if missing:
            raise HFError(f"{where}: a CLIP export needs params/{missing[0]}")
        tree = {k: params[k] for k in ("text", "image", "text_projection", "visual_projection",
                                       "logit_scale")}
        return registry.build(cfg), {"params": tree}
    part = registry.architecture(cfg).tower  # "text" (BERT), "image" (ViT), "audio"
    name = modality or part
    if name not in params:
        raise HFError(f"{where}: the checkpoint has no params/{name} (it has "
                            f"{sorted(params)}); pick the tower with --modality")
    tower = params[name]
    pos = tower.get("pos_embedding")
    if mt == "vit" and pos is not None:  # trained at another resolution (see _fit_positions)
        grid = math.isqrt(pos.shape[1] - 1)
        if grid * grid == pos.shape[1] - 1:
            size = grid * vit_image_options(cfg)["patch_size"]
            if registry.image_size(cfg) != (size, size):
                cfg = {**cfg, "image_size": size}
    model = registry.build(cfg, pooler="pooler" in tower)
    return model, {"params": {part: tower}}


def convert(src: str, dst: str = "", *, verify: bool = False, like: str = "",
            modality: str = "", seed: int = 0) -> list[tuple[str, float]] | None:
    """Hugging Face folder → mmjax checkpoint, or mmjax checkpoint → Hugging Face folder.

    The direction follows ``src``. With ``verify`` the Hugging Face side (``src`` or the written
    ``dst``) is run against mmjax and the per-layer table is printed and returned.
    """
    if is_hf_folder(src):
        model, variables = load(src)
        hf_dir = src
        if dst:
            write_checkpoint(dst, variables["params"], json.loads(model.hf_config))
            print(f"wrote mmjax checkpoint {Path(dst) / 'checkpoints'} (init_from: {dst})")
    else:
        checkpoint_state_dir(src)  # fails first, naming src, if it is neither format
        work = workdir_of(Path(src))
        if like:
            cfg = read_config(like)
        elif work is not None and (work / HF_CONFIG).is_file():
            cfg = json.loads((work / HF_CONFIG).read_text())
        else:
            raise HFError(f"{src}: no {HF_CONFIG} next to the checkpoint; give --like "
                                "HF_DIR naming the architecture")
        params = lora.read_model_params(src)
        model, variables = _export_model(params, cfg, modality, src)
        # Validates names and shapes against the config before anything is written.
        variables_from_hf(model, state_dict(model, variables), f"{src}: ")
        if not dst:
            raise HFError("--output is required to verify an mmjax checkpoint (it is "
                                "compared through the Hugging Face folder written there)")
        save(model, variables, dst)
        print(f"wrote Hugging Face folder {dst}")
        hf_dir = dst
    if not verify:
        return None
    rows = compare(hf_dir, model, variables, seed=seed)
    print(format_table(rows))
    worst = max(d for _, d in rows)
    print(f"max abs difference {worst:.3e} ({'ok' if worst <= 1e-4 else 'ABOVE 1e-4'})")
    return rows
