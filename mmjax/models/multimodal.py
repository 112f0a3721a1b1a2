"""MultimodalModel: one encoder per modality, a fusion, and task heads.

Parameters sit under ``<modality>/…`` (one subtree per tower, named after the batch key it
reads), ``fusion/…`` and ``heads/<task>/…``, so a pretrained tower loads into its own subtree and
a third modality is one more entry in ``config.model``. One method per use:

- ``__call__(batch, train)``: every head's outputs (what the losses read);
- ``encode(batch)``: the towers' ``{"tokens", "pooled", "mask"}``;
- ``embed(batch, task)``: a contrastive head's normalised embeddings of the modalities present;
- ``generate(batch, task)``: greedy captions of a caption head.

Pretraining objectives (ITM, MLM, MIM, captioning) need inputs built with extra passes through
the same towers and fusion; ``objectives.py`` builds them, so this module only composes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import modalities
from mmjax.models import encoders as encoders_lib
from mmjax.models import fusion as fusion_lib
from mmjax.models import heads as heads_lib
from mmjax.models import layers, objectives, views

Array = jax.Array

# config.model keys besides encoders, fusion and heads: the model-wide options.
MODEL_OPTIONS = (
    "dropout", "dtype", "attn_implementation", "remat", "scan_layers", "scan_unroll",
    "gpu_rewrites", "modality_dropout", "complete_input_weight", "modality_dropout_start",
)
MODEL_KEYS = ("encoders", "fusion", "heads", *MODEL_OPTIONS)


def make_head(task: str, cfg: Mapping[str, Any], opts: layers.Options, **kw: Any) -> nn.Module:
    """The head module of ``cfg["kind"]`` (``kw``: e.g. ``name`` or ``parent=None``)."""
    return heads_lib.HEADS.build(cfg, f"model.heads.{task}", opts=opts, **kw)


class Heads(nn.Module):
    """Container so that every head's parameters sit under ``heads/<task>/``."""

    specs: Mapping[str, Mapping[str, Any]]
    opts: layers.Options = layers.Options()

    def setup(self) -> None:
        self.by_task = {t: make_head(t, c, self.opts, name=t) for t, c in self.specs.items()}

    def __call__(self, task: str, features: Mapping[str, Any], *, train: bool = False,
                 **kwargs: Any) -> dict[str, Any]:
        return self.by_task[task](features, train=train, **kwargs)


class MultimodalModel(nn.Module):
    """Encoders → fusion → heads.

    ``encoders``: modality → {"kind": one of ``ENCODERS``, **module options}; the batch holds
    the modality's input under the same name (an array, or a dict of keyword arguments such as
    ``{"ids", "mask"}`` for text). ``fusion``: {"kind": ... | "none", **options}; "none" makes a
    two-tower model whose heads read the towers' pooled features. ``heads``: task → {"kind":
    ..., **options}. ``opts``: the settings every layer shares.

    Missing modalities: ``batch["present"]`` (optional) maps a modality to bool [B], False where
    an example lacks it (its batch entry is then a placeholder). In training,
    ``modality_dropout`` = P also drops each modality of an example with probability P, never
    all of an example's modalities. The fusion replaces an absent modality by a learned token.
    ``complete_input_weight`` is read by the train step (``trainer.step``): with modality
    dropout, the loss on every example's complete input is added with this weight (after the
    run's ``modality_dropout_start``; before it, the step trains on complete inputs alone).
    """

    encoders: Mapping[str, Mapping[str, Any]]
    fusion: Mapping[str, Any]
    heads: Mapping[str, Mapping[str, Any]]
    opts: layers.Options = layers.Options()
    modality_dropout: float = 0.0
    complete_input_weight: float = 0.0

    def setup(self) -> None:
        self.towers = {m: encoders_lib.tower(m, cfg, self.opts, name=m)
                       for m, cfg in self.encoders.items()}
        self.fuser = fusion_lib.build(self.fusion, self.opts, name="fusion")
        self.task_heads = Heads(self.heads, self.opts, name="heads")

    def inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return prepare(batch, self.encoders)

    def encode_one(self, modality: str, batch: Mapping[str, Any], *, train: bool = False,
                   **extra: Any) -> dict[str, Any]:
        """One tower on ``batch[modality]``: ``{"tokens", "pooled", "mask"}``."""
        if modality not in batch:
            raise ValueError(f"the batch has no {modality!r} input for encoder {modality!r}; "
                             f"batch keys: {sorted(batch)}")
        x = modalities.get(modality).to_model(batch[modality])
        if isinstance(x, Mapping):
            return self.towers[modality](**x, train=train, **extra)
        return self.towers[modality](x, train=train, **extra)

    def encode(self, batch: Mapping[str, Any], *, train: bool = False) -> dict[str, dict]:
        """Every tower on its input: ``{modality: {"tokens", "pooled", "mask", "present"}}``
        (``present``: bool [B], or None when every example has the modality)."""
        towers = {m: self.encode_one(m, batch, train=train) for m in self.encoders}
        present = self.presence(batch, train=train)
        return {m: {**f, "present": present[m]} for m, f in towers.items()}

    def presence(self, batch: Mapping[str, Any], *, train: bool = False
                 ) -> dict[str, Array | None]:
        """``{modality: bool [B] | None}`` from ``batch["present"]`` and, in training,
        ``modality_dropout`` (drawn from the "dropout" rng stream)."""
        given = dict(batch.get("present") or {})
        unknown = sorted(set(given) - set(self.encoders))
        if unknown:
            raise ValueError(f"batch['present'] names {unknown}, which are not towers of the "
                             f"model ({sorted(self.encoders)})")
        present = {m: given.get(m) for m in self.encoders}
        if not (train and self.modality_dropout > 0 and len(self.encoders) > 1):
            return present
        names = list(self.encoders)
        b = _batch_size(batch[names[0]])
        given_or_all: list[Any] = [jnp.ones((b,), bool) if present[m] is None else present[m]
                                   for m in names]
        base = jnp.stack(given_or_all, axis=1)
        k_drop, k_pick = jax.random.split(self.make_rng("dropout"))
        keep = base & (jax.random.uniform(k_drop, base.shape) >= self.modality_dropout)
        # An example that lost all its modalities keeps one of them, drawn uniformly.
        pick = jnp.argmax(jnp.where(base, jax.random.uniform(k_pick, base.shape), -1.0), axis=1)
        rescue = jax.nn.one_hot(pick, len(names), dtype=bool) & base
        keep = jnp.where(keep.any(axis=1, keepdims=True), keep, rescue)
        return {m: keep[:, i] for i, m in enumerate(names)}

    def __call__(self, batch: Mapping[str, Any], *, train: bool = False) -> dict[str, Any]:
        """``{task: head outputs}`` for every head. A batch whose clips carry evaluation views
        (``[B, V, T, H, W, 3]``) is answered per example by the average over its views
        (``mmjax.models.views``)."""
        n = views.count(batch)
        if n > 1:
            return views.average(self(views.fold(batch, n), train=train), self.heads, n)
        batch = self.inputs(batch)
        # MAE-only pretraining reads nothing from the full-view pass: skip it.
        full_view = any(c["kind"] != "mim" for c in self.heads.values())
        towers = self.encode(batch, train=train) if full_view else {}
        features: dict[str, Any] = {m: f["pooled"] for m, f in towers.items()}
        fused = None
        if self.fuser is not None and full_view:
            fused = self.fuser(towers, train=train)
            features.update(fused)
        out: dict[str, Any] = {}
        for task, cfg in self.heads.items():
            if cfg["kind"] not in heads_lib.OBJECTIVE_KINDS:
                out[task] = self.task_heads(task, features, train=train)
        for task, cfg in self.heads.items():
            if cfg["kind"] in heads_lib.OBJECTIVE_KINDS:
                build = objectives.INPUTS[cfg["kind"]]
                inputs, extra = build(self, task, towers=towers, fused=fused, outputs=out,
                                      batch=batch, train=train)
                out[task] = {**self.task_heads(task, inputs, train=train), **extra}
        return {t: out[t] for t in self.heads}

    def embed(self, batch: Mapping[str, Any], *, task: str) -> dict[str, Array]:
        """``{f"{m}_embeds": L2-normalised [B, E]}`` of contrastive head ``task`` for the
        modalities present in ``batch`` (texts alone, images alone); equal to the forward's.
        Clips with views: each example's embedding averaged over its views."""
        n = views.count(batch)
        if n > 1:
            return views.average_embeddings(self.embed(views.fold(batch, n), task=task), n)
        if self.heads.get(task, {}).get("kind") not in heads_lib.CONTRASTIVE_KINDS:
            raise ValueError(f"embed needs a contrastive head; {task!r} is not one "
                             f"(heads: {sorted(self.heads)})")
        present = [m for m in self.head(task).modalities if m in batch]
        if not present:
            raise ValueError(f"embed: the batch (keys {sorted(batch)}) has none of head "
                             f"{task!r}'s modalities")
        features = {m: self.encode_one(m, batch)["pooled"] for m in present}
        out = self.task_heads(task, features, only=tuple(present))
        return {f"{m}_embeds": out[f"{m}_embeds"] for m in present}

    def generate(self, batch: Mapping[str, Any], *, task: str,
                 max_len: int | None = None) -> Array:
        """Greedy captions of caption head ``task``: int32 [B, max_len].

        Position 0 is ``bos_id``; each next token is the argmax given the prefix; after the first
        ``eos_id`` (kept) every position is ``pad_id``, so the output compares directly with the
        tokenizer's encoding. Only the tower the head reads runs; the decoder is re-run on the
        whole prefix each step (no KV cache: captions are short) inside one ``fori_loop``.
        """
        if self.heads.get(task, {}).get("kind") != "caption":
            raise ValueError(f"generate needs a caption head; {task!r} is not one "
                             f"(heads: {sorted(self.heads)})")
        head = self.head(task)
        length = head.max_len if max_len is None else int(max_len)
        if not 2 <= length <= head.max_len + 1:
            raise ValueError(f"generate: max_len={length} must be in [2, {head.max_len + 1}] "
                             f"(the head's position embedding has {head.max_len} entries)")
        tower = self.encode_one(head.modality, batch)
        # The decoder runs as a pure function of its parameters inside the loop, which keeps
        # Flax's module bookkeeping out of the traced loop body.
        params = self.variables["params"]["heads"][task]
        features = {"context": tower["tokens"], "context_mask": tower["mask"]}
        b = tower["tokens"].shape[0]
        seq = jnp.full((b, length), head.pad_id, jnp.int32).at[:, 0].set(head.bos_id)

        def step(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            seq, done = carry
            out: Any = head.apply({"params": params}, {**features, "ids": seq[:, :-1]})
            logits = out["logits"]
            token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i, 1, False), axis=-1)
            token = jnp.where(done, head.pad_id, token).astype(jnp.int32)
            seq = jax.lax.dynamic_update_index_in_dim(seq, token, i + 1, 1)
            return seq, done | (token == head.eos_id)

        seq, _ = jax.lax.fori_loop(0, length - 1, step, (seq, jnp.zeros((b,), bool)))
        return seq

    def head(self, task: str) -> nn.Module:
        """An unbound instance of ``task``'s head, to read its options (defaults included)."""
        if task not in self.heads:
            raise ValueError(f"no head named {task!r}; heads: {sorted(self.heads)}")
        return make_head(task, self.heads[task], self.opts, parent=None)

    def objective_key(self, task: str) -> Array:
        """An objective's random key: the "masking" rng stream if given (training), else a fixed
        key, so evaluation is deterministic."""
        base = self.make_rng("masking") if self.has_rng("masking") else jax.random.PRNGKey(0)
        return jax.random.fold_in(base, objectives.salt(task))


def _batch_size(x: Any) -> int:
    return jax.tree_util.tree_leaves(x)[0].shape[0]


def prepare(batch: Mapping[str, Any], towers: Iterable[str]) -> dict[str, Any]:
    """``batch`` with each tower's entry as the tower reads it: its modality's ``to_model``
    (uint8 pixels → [-1, 1]). The model calls it first, the one place where this happens;
    the explainers call it to attribute to what the towers read. Idempotent."""
    towers = set(towers)
    return {k: modalities.get(k).to_model(v) if k in towers else v for k, v in batch.items()}


def options(model_cfg: Mapping[str, Any], bn_axis_name: str | None = None) -> layers.Options:
    """``Options`` from ``config.model``'s top-level keys (errors name the key)."""
    dtype = model_cfg.get("dtype", "float32")
    if dtype not in layers.DTYPES:
        raise ValueError(f"model.dtype={dtype!r}; known: {sorted(layers.DTYPES)}")
    unroll = model_cfg.get("scan_unroll", 0)
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 0:
        raise ValueError(f"model.scan_unroll={unroll!r} must be an integer >= 0 (1 = one layer "
                         "per loop iteration, 0 = all layers unrolled, no loop)")
    return layers.Options(
        dtype=layers.DTYPES[dtype],
        dropout=float(model_cfg.get("dropout", 0.0)),
        attn_implementation=model_cfg.get("attn_implementation") or None,
        remat=model_cfg.get("remat") or None,
        scan_layers=bool(model_cfg.get("scan_layers", False)),
        scan_unroll=unroll,
        gpu_rewrites=bool(model_cfg.get("gpu_rewrites", False)),
        bn_axis_name=bn_axis_name,
    )


def check_keys(cfg: Mapping[str, Any]) -> None:
    """Every key of ``config.model`` is one of ``MODEL_KEYS``; a tower given as
    ``config.model.<modality>`` (the layout before ``encoders``) names its new key."""
    for key in cfg:
        if key in MODEL_KEYS:
            continue
        if key in modalities.names() or (isinstance(cfg[key], Mapping) and "kind" in cfg[key]):
            raise ValueError(f"model.{key}: towers are configured under "
                             f"config.model.encoders.{key} now")
        raise ValueError(f"model.{key} is not a key of config.model; known: {MODEL_KEYS}")


def _head_specs(heads: Mapping[str, Any], encoders: Mapping[str, Any]) -> dict[str, dict]:
    """Head configs, with ``vocab_size`` 0 of mlm/caption heads taken from the text tower."""
    specs = {}
    for task, cfg in heads.items():
        cfg = dict(cfg)
        if cfg.get("kind") in ("mlm", "caption") and not cfg.get("vocab_size"):
            source = cfg.get("modality", "text") if cfg["kind"] == "mlm" else "text"
            enc = encoders.get(source, {})
            if enc.get("vocab_size"):
                cfg["vocab_size"] = enc["vocab_size"]
        specs[task] = cfg
    return specs


def build_model(model_cfg: Any, *, bn_axis_name: str | None = None) -> MultimodalModel:
    """MultimodalModel from ``config.model`` (a ConfigDict or plain mapping): its towers from
    ``encoders.<modality>``, ``fusion``, ``heads`` and the model-wide options."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    check_keys(cfg)
    encoders = dict(cfg.get("encoders") or {})
    if not encoders:
        raise ValueError("config.model.encoders is empty (e.g. model.encoders.image, "
                         "model.encoders.text)")
    for m, enc in encoders.items():
        if m not in modalities.names():
            raise ValueError(f"model.encoders.{m}: no modality {m!r}; known: "
                             f"{modalities.names()}")
        encoders_lib.ENCODERS.get(enc.get("kind"), f"model.encoders.{m}")
    if not cfg.get("heads"):
        raise ValueError("config.model.heads is empty: a model needs at least one task head")
    for task, head in cfg["heads"].items():
        heads_lib.HEADS.get(head.get("kind"), f"model.heads.{task}")
    p = cfg.get("modality_dropout", 0.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"model.modality_dropout={p!r} must be a probability in [0, 1)")
    if p and cfg.get("fusion", {}).get("kind", "none") == "none":
        raise ValueError("model.modality_dropout needs a fusion (model.fusion.kind is 'none'): "
                         "an absent modality is replaced inside the fusion")
    w = cfg.get("complete_input_weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise ValueError(f"model.complete_input_weight={w!r} must be a number >= 0")
    start = cfg.get("modality_dropout_start", 0.0)
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < 1:
        raise ValueError(f"model.modality_dropout_start={start!r} must be a fraction of "
                         "total_steps in [0, 1)")
    return MultimodalModel(
        encoders=encoders,
        fusion=cfg.get("fusion", {"kind": "none"}),
        heads=_head_specs(cfg["heads"], encoders),
        opts=options(cfg, bn_axis_name),
        modality_dropout=float(p),
        complete_input_weight=float(w) if p else 0.0,
    )


def loss_spec(head_cfg: Mapping[str, Any]) -> str:
    """The registered loss name of a head: its ``loss`` key, else its kind's default."""
    return head_cfg.get("loss") or heads_lib.DEFAULT_LOSS[head_cfg["kind"]]
