"""MultimodalModel: encoders by modality name, fusion, task heads, pretraining objectives.

Parameters sit under ``image/…``, ``text/…`` (one subtree per modality, named after it),
``fusion/…`` and ``heads/<task>/…``, so a pretrained tower loads into its own subtree and a third
modality is one more entry in ``config.model.encoders``, not a rewrite.

How objectives run (``objectives.py`` has their heads and random draws). One forward pass:

1. every tower encodes its input and fusion (if any) fuses them, as for any task;
2. the ordinary heads (classification, regression, contrastive, siglip) run on those features;
3. each objective head gets inputs built with the *same* tower and fusion module instances, so
   every extra pass shares their parameters and gradients flow into them:

   - ``mlm``: the corrupted text goes through its tower again, then through the fusion again
     with the other towers' (unmasked) tokens; cross-attention fusion with the text as query
     keeps one fused token per text position. Without fusion the tower's own tokens are used.
   - ``mim``: the ViT runs again on the kept patches only (``ViT(..., keep=...)``); a model
     whose only heads are ``mim`` skips step 1's full-view pass, which nothing would read.
   - ``itm``: hard negatives are drawn from the contrastive head's (stop-gradient) similarities
     computed in step 2; the towers' token sequences are gathered into B (a, negative b) and B
     (negative a, b) pairs and fused in one extra fusion call of 2B rows; the B positives reuse
     step 1's fused output.
   - ``caption``: reads step 1's tokens of its tower; the decoder is the only extra work.

   ``Heads`` is called once for step 2 and once per objective, always as the same submodule, so
   parameters stay at ``heads/<task>/…``.

Negatives and masks are local: under pmap or gradient accumulation an objective sees its device's
(micro-)batch only. Random draws use the ``"masking"`` rng stream when the caller provides it
(the trainer does in training) and a fixed key otherwise, so evaluation is deterministic.

``MultimodalModel.embed`` and ``MultimodalModel.generate`` (for evaluators, through
``model.apply(..., method=...)``) run only the towers they need with the trained parameters.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses import MAX_LOGIT_SCALE
from mmjax.models import fusion as fusion_lib
from mmjax.models import heads as heads_lib
from mmjax.models import objectives
from mmjax.models.resnet import ResNet
from mmjax.models.text import TextEncoder
from mmjax.models.vit import ViT

Array = jax.Array

ENCODERS: dict[str, type[nn.Module]] = {"vit": ViT, "resnet": ResNet, "text": TextEncoder}

# Config keys that describe a part but are not arguments of its module.
_NON_MODULE_KEYS = {"kind", "init_from", "loss", "target", "label_smoothing", "tokenizer"}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def module_kwargs(cls: type[nn.Module], cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The entries of ``cfg`` that are fields of ``cls``; an unknown key is a config error."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    out = {}
    for key, value in cfg.items():
        if key in _NON_MODULE_KEYS:
            continue
        if key not in fields:
            raise ValueError(f"{where}.{key} is not an option of {cls.__name__}; "
                             f"known: {sorted(fields)}")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def get_dtype(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (model.dtype); known: {sorted(_DTYPES)}")
    return _DTYPES[name]


def head_kwargs(
    task: str,
    cfg: Mapping[str, Any],
    *,
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
    attn_implementation: str | None = None,
) -> tuple[type[nn.Module], dict[str, Any]]:
    """The head class of ``cfg["kind"]`` and its constructor arguments, model-wide ones filled.

    One function for ``Heads`` and for the model's own look-ups of head options, so both see
    the same defaults.
    """
    kind = cfg.get("kind")
    if kind not in heads_lib.HEADS:
        raise ValueError(f"model.heads.{task}.kind={kind!r}; known: {sorted(heads_lib.HEADS)}")
    cls = heads_lib.HEADS[kind]
    kwargs = module_kwargs(cls, cfg, f"model.heads.{task}")
    fields = {f.name for f in dataclasses.fields(cls)}
    if "dropout" in fields:
        kwargs.setdefault("dropout", dropout)
    if "attn_implementation" in fields:
        kwargs.setdefault("attn_implementation", attn_implementation)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = get_dtype(kwargs["dtype"])
    kwargs.setdefault("dtype", dtype)
    return cls, kwargs


def _salt(task: str) -> int:
    return zlib.crc32(task.encode()) & 0x7FFFFFFF


class MultimodalModel(nn.Module):
    """Encoders → fusion → heads; returns ``{task: head outputs}``.

    ``encoders``: modality → {"kind": "vit"|"resnet"|"text", **module options}; the batch holds the
    modality's input under the same name (an array, or a dict of keyword arguments such as
    ``{"ids", "mask"}`` for text). ``fusion``: {"kind": ... | "none", **options}; "none" makes a
    two-tower model whose heads read only the towers' pooled features. ``heads``: task →
    {"kind": "classification"|"regression"|"contrastive"|"siglip"|"itm"|"mlm"|"mim"|"caption",
    **options} (the module docstring says how the objectives run).

    ``dropout`` is the one rate of the whole model, ``dtype`` the compute dtype (params stay
    float32), ``bn_axis_name`` the pmap axis over which BatchNorm averages statistics.
    """

    encoders: Mapping[str, Mapping[str, Any]]
    fusion: Mapping[str, Any]
    heads: Mapping[str, Mapping[str, Any]]
    dropout: float = 0.0
    dtype: Any = jnp.float32
    bn_axis_name: str | None = None
    attn_implementation: str | None = None
    remat: str | None = None
    scan_layers: bool = False
    scan_unroll: int = 0

    def _shared(self, cls: type[nn.Module]) -> dict[str, Any]:
        """Model-wide options passed to every part that has them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        shared = {
            "dropout": self.dropout,
            "dtype": self.dtype,
            "bn_axis_name": self.bn_axis_name,
            "attn_implementation": self.attn_implementation,
            "remat": self.remat,
            "scan_layers": self.scan_layers,
            "scan_unroll": self.scan_unroll,
        }
        return {k: v for k, v in shared.items() if k in fields}

    # ------------------------------------------------------------------------------ entry points

    def __call__(self, batch: Mapping[str, Any], *, train: bool = False) -> dict[str, Any]:
        return self._run(batch, train=train, mode="forward")

    def embed(self, batch: Mapping[str, Any], *, task: str) -> dict[str, Array]:
        """``{f"{m}_embeds": L2-normalised [B, E]}`` of contrastive head ``task``.

        Runs only the towers whose modality is in ``batch`` (text prompts alone, images alone)
        and that head's projections for them; the values equal the full forward's. Meant for
        trained parameters (``model.apply(variables, batch, method=MultimodalModel.embed,
        task=...)``); the parameter paths are the forward's.
        """
        return self._run(batch, train=False, mode="embed", task=task)

    def generate(
        self, batch: Mapping[str, Any], *, task: str, max_len: int | None = None
    ) -> Array:
        """Greedy captions of caption head ``task``: int32 [B, max_len].

        Position 0 is ``bos_id``; each next token is the argmax given the prefix; after the first
        ``eos_id`` (kept) every position is ``pad_id``, so the output compares directly with the
        tokenizer's ``[CLS] words [SEP] PAD…`` encoding. ``max_len`` defaults to the head's
        ``max_len``. Only the tower the head reads runs (``batch`` may hold just that modality);
        the decoder is recomputed on the whole prefix each step (no KV cache: captions are short)
        inside a ``fori_loop``, so it jits to one loop.
        """
        return self._run(batch, train=False, mode="generate", task=task, max_len=max_len)

    def encode(self, batch: Mapping[str, Any], *, train: bool = False) -> dict[str, dict]:
        """Runs each tower on its input: ``{modality: {"tokens", "pooled", "mask"}}``."""
        modules = self._towers(list(self.encoders))
        return {m: self._encode_one(modules[m], batch, m, train) for m in self.encoders}

    # ------------------------------------------------------------------------------- internals

    def _mask_padding(self) -> str:
        """The padding of the masks that reach fusion: only text towers make masks, and their
        ``padding`` (default "right") says whether those are right padding."""
        paddings = {cfg.get("padding", TextEncoder.padding) for cfg in self.encoders.values()
                    if cfg.get("kind") == "text"}
        return "right" if paddings <= {"right"} else "mask"

    def _towers(self, modalities: Sequence[str]) -> dict[str, nn.Module]:
        """The encoder submodules of ``modalities``, created once per call and reused."""
        out = {}
        for modality in modalities:
            cfg = self.encoders[modality]
            kind = cfg.get("kind")
            if kind not in ENCODERS:
                raise ValueError(f"model.{modality}.kind={kind!r}; "
                                 f"known: {sorted(ENCODERS)}")
            cls = ENCODERS[kind]
            kwargs = module_kwargs(cls, cfg, f"model.{modality}")
            out[modality] = cls(**{**self._shared(cls), **kwargs}, name=modality)
        return out

    @staticmethod
    def _encode_one(
        encoder: nn.Module, batch: Mapping[str, Any], modality: str, train: bool, **extra: Any
    ) -> dict[str, Any]:
        if modality not in batch:
            raise ValueError(f"the batch has no {modality!r} input for encoder {modality!r}; "
                             f"batch keys: {sorted(batch)}")
        x = batch[modality]
        if isinstance(x, Mapping):
            return encoder(**x, train=train, **extra)
        return encoder(x, train=train, **extra)

    def _specs(self) -> dict[str, dict[str, Any]]:
        """Head configs with ``vocab_size`` 0 of mlm/caption heads taken from the text tower."""
        specs = {}
        for task, cfg in self.heads.items():
            cfg = dict(cfg)
            kind = cfg.get("kind")
            if kind in ("mlm", "caption") and not cfg.get("vocab_size"):
                source = cfg.get("modality", "text") if kind == "mlm" else "text"
                enc = self.encoders.get(source, {})
                if enc.get("kind") == "text" and enc.get("vocab_size"):
                    cfg["vocab_size"] = enc["vocab_size"]
            specs[task] = cfg
        return specs

    def _head(self, specs: Mapping[str, Mapping[str, Any]], task: str) -> nn.Module:
        """An unbound instance of ``task``'s head, to read its options (defaults included)."""
        if task not in specs:
            raise ValueError(f"no head named {task!r}; heads: {sorted(specs)}")
        cls, kwargs = head_kwargs(
            task, specs[task], dropout=self.dropout, dtype=self.dtype,
            attn_implementation=self.attn_implementation,
        )
        return cls(**kwargs, parent=None)

    def _key(self, task: str) -> Array:
        """The objective's random key: the "masking" stream if given, else a fixed key."""
        base = self.make_rng("masking") if self.has_rng("masking") else jax.random.PRNGKey(0)
        return jax.random.fold_in(base, _salt(task))

    @nn.compact
    def _run(
        self,
        batch: Mapping[str, Any],
        *,
        train: bool,
        mode: str,
        task: str | None = None,
        max_len: int | None = None,
    ) -> Any:
        specs = self._specs()
        heads = Heads(
            specs, self.dropout, self.dtype, self.attn_implementation, name="heads"
        )
        if mode == "embed":
            return self._embed(specs, heads, batch, task)
        if mode == "generate":
            return self._generate(specs, batch, task, max_len)

        modules = self._towers(list(self.encoders))
        # MAE-only pretraining reads nothing from the full-view pass: skip it.
        full_view = any(c.get("kind") != "mim" for c in specs.values())
        towers = {
            m: self._encode_one(modules[m], batch, m, train) for m in self.encoders if full_view
        }
        features: dict[str, Any] = {m: f["pooled"] for m, f in towers.items()}
        fusion = None
        fused = None
        kind = self.fusion.get("kind", "none")
        if kind != "none" and full_view:
            cls = fusion_lib.Fusion
            kwargs = module_kwargs(cls, self.fusion, "model.fusion")
            kwargs.setdefault("padding", self._mask_padding())
            fusion = cls(**{**self._shared(cls), **kwargs}, kind=kind, name="fusion")
            fused = fusion(towers, train=train)
            features.update(fused)

        plain = [t for t, c in specs.items() if c.get("kind") not in objectives.OBJECTIVE_KINDS]
        out = heads(features, train=train, tasks=plain) if plain else {}
        for t, cfg in specs.items():
            if t in out:
                continue
            head = self._head(specs, t)
            extra: dict[str, Any] = {}
            if cfg["kind"] == "itm":
                inputs, extra = self._itm_inputs(
                    specs, t, head, towers, fusion, fused, out, batch, train
                )
            elif cfg["kind"] == "mlm":
                inputs = self._mlm_inputs(t, head, modules, towers, fusion, batch, train)
            elif cfg["kind"] == "mim":
                inputs = self._mim_inputs(t, head, modules, batch, train)
            else:  # caption
                inputs, extra = self._caption_inputs(t, head, towers, batch)
            out[t] = {**heads(features, train=train, tasks=[t], inputs={t: inputs})[t], **extra}
        return {t: out[t] for t in specs}

    # ----------------------------------------------------------------------- objective inputs

    def _itm_inputs(
        self,
        specs: Mapping[str, Mapping[str, Any]],
        task: str,
        head: nn.Module,
        towers: Mapping[str, Mapping[str, Any]],
        fusion: nn.Module | None,
        fused: Mapping[str, Any] | None,
        out: Mapping[str, Any],
        batch: Mapping[str, Any],
        train: bool,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if fusion is None or fused is None:
            raise ValueError(f"model.heads.{task}: kind 'itm' scores fused image-text pairs and "
                             "needs a fusion module; set model.fusion.kind (not 'none')")
        contrastive = head.contrastive
        if not contrastive:
            found = [t for t, c in specs.items() if c.get("kind") in heads_lib.CONTRASTIVE_KINDS]
            if len(found) != 1:
                raise ValueError(f"model.heads.{task}.contrastive must name the contrastive head "
                                 f"that picks hard negatives; contrastive heads: {found}")
            contrastive = found[0]
        if specs.get(contrastive, {}).get("kind") not in heads_lib.CONTRASTIVE_KINDS:
            raise ValueError(f"model.heads.{task}.contrastive={contrastive!r} is not a head of "
                             f"kind {heads_lib.CONTRASTIVE_KINDS}")
        a, b = head.modalities
        emb = out[contrastive]
        for m in (a, b):
            if f"{m}_embeds" not in emb or m not in towers:
                raise ValueError(f"model.heads.{task}.modalities: {m!r} is not both a tower and "
                                 f"a modality of contrastive head {contrastive!r}")
        scale = jnp.minimum(jnp.exp(emb["logit_scale"].astype(jnp.float32)), MAX_LOGIT_SCALE)
        sim = jax.lax.stop_gradient(scale * (emb[f"{a}_embeds"] @ emb[f"{b}_embeds"].T))
        key = self._key(task)
        valid = batch.get("valid")
        # Examples whose texts are token-for-token equal are not negatives of each other (the
        # embedded data repeats captions); they are drawn only when nothing else is left.
        duplicate = None
        for m in (a, b):
            if isinstance(batch.get(m), Mapping) and "ids" in batch[m]:
                ids = batch[m]["ids"]
                duplicate = (ids[:, None, :] == ids[None, :, :]).all(-1)
        neg_b = objectives.sample_negatives(jax.random.fold_in(key, 0), sim, valid, duplicate)
        neg_a = objectives.sample_negatives(jax.random.fold_in(key, 1), sim.T, valid, duplicate)
        rows = jnp.arange(sim.shape[0])
        pairs = {}
        for m, f in towers.items():
            idx = jnp.concatenate([neg_b if m == b else rows, neg_a if m == a else rows])
            pairs[m] = {
                k: None if v is None else objectives.select_rows(v, idx) for k, v in f.items()
            }
        negatives = fusion(pairs, train=train)
        pooled = jnp.concatenate([fused["pooled"], negatives["pooled"]], axis=0)
        return {"pooled": pooled}, {f"negative_{b}": neg_b, f"negative_{a}": neg_a}

    def _mlm_inputs(
        self,
        task: str,
        head: nn.Module,
        modules: Mapping[str, nn.Module],
        towers: Mapping[str, Mapping[str, Any]],
        fusion: nn.Module | None,
        batch: Mapping[str, Any],
        train: bool,
    ) -> dict[str, Any]:
        m = head.modality
        if self.encoders.get(m, {}).get("kind") != "text" or not isinstance(batch[m], Mapping):
            raise ValueError(f"model.heads.{task}.modality={m!r} is not a text tower")
        if fusion is not None and (fusion.kind != "cross_attention" or fusion.query != m):
            raise ValueError(
                f"model.heads.{task}: mlm needs one fused token per text position, i.e. "
                f"model.fusion.kind='cross_attention' with query={m!r}, or no fusion; got "
                f"kind={fusion.kind!r}, query={fusion.query!r}"
            )
        text = batch[m]
        ids = jnp.asarray(text["ids"], jnp.int32)
        mask = text.get("mask")
        mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
        masked_ids, selected = objectives.mlm_mask(
            self._key(task), ids, mask, vocab_size=head.vocab_size, mask_prob=head.mask_prob,
            mask_token_id=head.mask_token_id, special_ids=head.special_ids,
        )
        corrupted = self._encode_one(
            modules[m], {m: {**text, "ids": masked_ids, "mask": mask}}, m, train
        )
        if fusion is None:
            tokens = corrupted["tokens"]
        else:
            tokens = fusion({**towers, m: corrupted}, train=train)["tokens"]
        return {"tokens": tokens, "targets": ids, "weights": selected.astype(jnp.float32)}

    def _mim_inputs(
        self,
        task: str,
        head: nn.Module,
        modules: Mapping[str, nn.Module],
        batch: Mapping[str, Any],
        train: bool,
    ) -> dict[str, Any]:
        m = head.modality
        if self.encoders.get(m, {}).get("kind") != "vit":
            raise ValueError(f"model.heads.{task}: mim masks ViT patches, but tower {m!r} is "
                             f"{self.encoders.get(m, {}).get('kind')!r}; use kind 'vit'")
        image = jnp.asarray(batch[m])
        p = modules[m].sizes()["patch_size"]
        n = (image.shape[1] // p) * (image.shape[2] // p)
        keep = objectives.random_keep(self._key(task), image.shape[0], n, head.mask_ratio)
        encoded = self._encode_one(modules[m], batch, m, train, keep=keep)
        patches = objectives.patchify(image.astype(jnp.float32), p)
        return {"tokens": encoded["tokens"], "keep": keep, "patches": patches}

    @staticmethod
    def _caption_inputs(
        task: str,
        head: nn.Module,
        towers: Mapping[str, Mapping[str, Any]],
        batch: Mapping[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        m = head.modality
        if m not in towers:
            raise ValueError(f"model.heads.{task}.modality={m!r} is not a tower")
        text = batch.get("text")
        if not isinstance(text, Mapping) or "ids" not in text:
            raise ValueError(f"model.heads.{task}: captioning trains on batch['text'] "
                             "({'ids', 'mask'}), which the batch does not have")
        ids = jnp.asarray(text["ids"], jnp.int32)
        mask = text.get("mask")
        mask = (ids != head.pad_id) if mask is None else jnp.asarray(mask)
        inputs = {"context": towers[m]["tokens"], "context_mask": towers[m]["mask"],
                  "ids": ids[:, :-1]}
        return inputs, {"targets": ids[:, 1:], "weights": mask[:, 1:].astype(jnp.float32)}

    # ------------------------------------------------------------------------------ evaluators

    def _embed(
        self,
        specs: Mapping[str, Mapping[str, Any]],
        heads: nn.Module,
        batch: Mapping[str, Any],
        task: str | None,
    ) -> dict[str, Array]:
        if task is None or specs.get(task, {}).get("kind") not in heads_lib.CONTRASTIVE_KINDS:
            raise ValueError(f"embed needs a contrastive head; {task!r} is not one "
                             f"(heads: {sorted(specs)})")
        present = [m for m in self._head(specs, task).modalities if m in batch]
        if not present:
            raise ValueError(f"embed: the batch (keys {sorted(batch)}) has none of head "
                             f"{task!r}'s modalities")
        modules = self._towers(present)
        features = {m: self._encode_one(modules[m], batch, m, False)["pooled"] for m in present}
        out = heads(features, tasks=[task], call_kwargs={task: {"only": tuple(present)}})[task]
        return {f"{m}_embeds": out[f"{m}_embeds"] for m in present}

    def _generate(
        self,
        specs: Mapping[str, Mapping[str, Any]],
        batch: Mapping[str, Any],
        task: str | None,
        max_len: int | None,
    ) -> Array:
        if task is None or specs.get(task, {}).get("kind") != "caption":
            raise ValueError(f"generate needs a caption head; {task!r} is not one "
                             f"(heads: {sorted(specs)})")
        head = self._head(specs, task)
        length = head.max_len if max_len is None else int(max_len)
        if not 2 <= length <= head.max_len + 1:
            raise ValueError(f"generate: max_len={length} must be in [2, {head.max_len + 1}] "
                             f"(the head's position embedding has {head.max_len} entries)")
        m = head.modality
        tower = self._encode_one(self._towers([m])[m], batch, m, False)
        # The decoder runs as a pure function of its trained parameters inside the loop, which
        # keeps Flax's module bookkeeping out of the traced loop body.
        params = self.variables["params"]["heads"][task]
        features = {"context": tower["tokens"], "context_mask": tower["mask"]}
        b = tower["tokens"].shape[0]
        seq = jnp.full((b, length), head.pad_id, jnp.int32).at[:, 0].set(head.bos_id)

        def step(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            seq, done = carry
            logits = head.apply({"params": params}, {**features, "ids": seq[:, :-1]})["logits"]
            token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i, 1, False), axis=-1)
            token = jnp.where(done, head.pad_id, token).astype(jnp.int32)
            seq = jax.lax.dynamic_update_index_in_dim(seq, token, i + 1, 1)
            return seq, done | (token == head.eos_id)

        seq, _ = jax.lax.fori_loop(0, length - 1, step, (seq, jnp.zeros((b,), bool)))
        return seq


class Heads(nn.Module):
    """Container so that every head's parameters sit under ``heads/<task>/``.

    Called with ``tasks`` it runs only those heads, so the model can call it several times (the
    ordinary heads first, then each objective, whose ``inputs`` replace the shared features).
    ``call_kwargs`` gives a head extra call arguments (``only`` for ``embed``).
    """

    specs: Mapping[str, Mapping[str, Any]]
    dropout: float = 0.0
    dtype: Any = jnp.float32
    attn_implementation: str | None = None

    @nn.compact
    def __call__(
        self,
        features: Mapping[str, Any],
        *,
        train: bool = False,
        tasks: Sequence[str] | None = None,
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
        call_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> dict[str, Any]:
        out = {}
        for task in self.specs if tasks is None else tasks:
            cls, kwargs = head_kwargs(
                task, self.specs[task], dropout=self.dropout, dtype=self.dtype,
                attn_implementation=self.attn_implementation,
            )
            feats = features if inputs is None or task not in inputs else inputs[task]
            extra = (call_kwargs or {}).get(task, {})
            out[task] = cls(**kwargs, name=task)(feats, train=train, **extra)
        return out


MODEL_OPTIONS = (
    "fusion", "heads", "dropout", "dtype", "attn_implementation", "remat", "scan_layers",
    "scan_unroll",
)


def build_model(model_cfg: Any, *, bn_axis_name: str | None = None) -> MultimodalModel:
    """MultimodalModel from ``config.model`` (a ConfigDict or plain mapping).

    Every key of ``config.model`` that is not one of ``MODEL_OPTIONS`` is a modality whose value
    configures its encoder (``config.model.image``, ``config.model.text``, ...).
    """
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    encoders = {}
    for key, value in cfg.items():
        if key in MODEL_OPTIONS:
            continue
        if not isinstance(value, Mapping) or value.get("kind") not in ENCODERS:
            raise ValueError(f"model.{key} is neither a model option {MODEL_OPTIONS} nor an "
                             f"encoder config with kind in {sorted(ENCODERS)}")
        encoders[key] = value
    if not encoders:
        raise ValueError("config.model has no encoder (e.g. model.image, model.text)")
    if "heads" not in cfg or not cfg["heads"]:
        raise ValueError("config.model.heads is empty: a model needs at least one task head")
    return MultimodalModel(
        encoders=encoders,
        fusion=cfg.get("fusion", {"kind": "none"}),
        heads=cfg["heads"],
        dropout=cfg.get("dropout", 0.0),
        dtype=get_dtype(cfg.get("dtype", "float32")),
        bn_axis_name=bn_axis_name,
        attn_implementation=cfg.get("attn_implementation") or None,
        remat=cfg.get("remat") or None,
        scan_layers=bool(cfg.get("scan_layers", False)),
        scan_unroll=_scan_unroll(cfg.get("scan_unroll", 0)),
    )


def _scan_unroll(value: Any) -> int:
    """``model.scan_unroll``: an int >= 0 (0 = every layer in one iteration, no loop)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"model.scan_unroll={value!r} must be an integer >= 0 (1 = one layer per "
                         "loop iteration, 0 = all layers unrolled, no loop)")
    return value


def loss_spec(head_cfg: Mapping[str, Any]) -> str:
    """The registered loss name of a head: its ``loss`` key, else its kind's default."""
    return head_cfg.get("loss") or heads_lib.DEFAULT_LOSS[head_cfg["kind"]]
