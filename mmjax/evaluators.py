"""Evaluators: metrics over a whole split that a per-batch loss cannot give (big_vision's idea).

Configured by ``config.evals`` (absent or empty = none): ``evals.<name> = {"kind": ..., options}``.
The trainer runs every evaluator after each validation pass and on the test split at the end;
its metrics go into the same ``metrics.jsonl`` line as ``<name>_<metric>``. A caption
evaluator also writes ``exact_match`` and ``bleu`` unprefixed, as a classification task writes
``accuracy``.

Kinds:

* ``retrieval`` (``task``: a contrastive head): image→text and text→image recall@1/5/10 over the
  split's (image, text) pairs. A retrieved item counts as correct when its text is token-for-token
  the query's own text: the embedded data repeats captions (180 distinct ones), and counting only
  the pair's own index would score a correct duplicate as a miss.
* ``zeroshot`` (``task``: a contrastive head; ``classes``: ``"labels"`` or ``"shapes_objects"``;
  ``prompt``: a template with one ``{}``): every image is classified by the nearest text
  embedding among the class prompts. ``labels`` uses the dataset's label names and each
  example's label; ``shapes_objects`` the 18 "colour shape" phrases of the embedded data, where a
  prediction is right if that object is one of the image's two.
* ``qa`` (``task``: a classification head): answer accuracy by string (predicted label name
  against the gold one), overall and per question type (the question's first two words).
* ``agreement`` (``task``: a classification head, default the one ``config.distill`` teaches):
  with a distillation teacher (``config.distill.teacher``), how often the student's top-1 class
  is the teacher's (``agreement``), the mean KL(teacher ‖ student) of their softmax at
  temperature 1 in nats (``kl``), and the teacher's own accuracy (``teacher_accuracy``).
* ``caption`` (``task``: a caption head; ``max_len``): greedy decoding from the image; exact
  match of the decoded words with the reference caption, and corpus BLEU-4 (Papineni et al.
  2002: clipped n-gram precisions for n = 1..4, geometric mean, brevity penalty; one reference
  per image; no smoothing, so a corpus with no matching 4-gram scores 0).

Evaluators run the model with ``jax.jit`` on the first local device, on params copied to it
once per evaluation; fine for the model sizes of the embedded configs, and the reason
evaluators are refused with more than one process (the trainer says so).
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mmjax.data import pipeline, shapes
from mmjax.data.device import normalize_images
from mmjax.data.tokenize import Tokenizer

KINDS = ("retrieval", "zeroshot", "qa", "agreement", "caption")


# --- metrics (pure numpy, tested against references) ------------------------------------------


def recall_at_k(
    sim: np.ndarray, query_groups: np.ndarray, item_groups: np.ndarray, ks: Sequence[int]
) -> dict[int, float]:
    """Fraction of queries (rows of ``sim``) with an item of their own group among the top k."""
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = item_groups[order] == query_groups[:, None]  # [Q, I] in rank order
    out = {}
    for k in ks:
        out[k] = float(hits[:, : min(k, hits.shape[1])].any(axis=1).mean()) if len(hits) else 0.0
    return out


def _ngrams(words: Sequence[str], n: int) -> collections.Counter:
    return collections.Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """Corpus BLEU with one reference per hypothesis, uniform weights over n = 1..max_n."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp_len += len(hyp)
        ref_len += len(ref)
        for n in range(1, max_n + 1):
            h, r = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(c, r[g]) for g, c in h.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def row_groups(rows: np.ndarray) -> np.ndarray:
    """An integer per row of ``rows`` [N, L], equal exactly for identical rows."""
    _, inverse = np.unique(rows, axis=0, return_inverse=True)
    return inverse.reshape(-1)


# --- running the model -------------------------------------------------------------------------


class Evaluator:
    """One configured evaluator; ``__call__(variables, split) -> {metric: value}``."""

    def __init__(self, name: str, cfg: Mapping[str, Any], env: Env):
        self.name = name
        self.cfg = dict(cfg)
        self.env = env
        self.task = self.cfg.get("task", "")
        heads = env.model_cfg["heads"]
        if self.task not in heads:
            raise ValueError(f"evals.{name}.task={self.task!r} is not a head of the model; "
                             f"heads: {sorted(heads)}")

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        raise NotImplementedError


class Env:
    """What evaluators share: the model, data config, tokenizer, label names, eval batch size,
    and the run's distillation teacher (``trainer.distill.Teacher``) if it has one."""

    def __init__(self, *, model: Any, model_cfg: Mapping[str, Any], data_config: Any,
                 tokenizer: Tokenizer, label_names: Sequence[str], batch_size: int,
                 teacher: Any = None):
        self.model = model
        self.model_cfg = model_cfg
        self.data_config = data_config
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.batch_size = batch_size
        self.teacher = teacher
        self._jitted: dict[tuple, Callable] = {}

    def apply(self, method: str, **kwargs: Any) -> Callable:
        """A jitted ``model.apply(variables, batch, method=method, **kwargs)``."""
        key = (method, tuple(sorted(kwargs.items())))
        if key not in self._jitted:
            apply = functools.partial(self.model.apply, method=method, **kwargs)
            # uint8 images from the pipeline are scaled on device, as in the eval step.
            self._jitted[key] = jax.jit(lambda v, batch: apply(v, normalize_images(batch)))
        return self._jitted[key]

    def batches(self, split: str) -> Iterator[dict[str, Any]]:
        return iter(pipeline.eval_batches(
            self.data_config, split, batch_size=self.batch_size, tokenizer=self.tokenizer
        ))


def _valid(batch: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(batch["valid"]) > 0


def _text_of(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"ids": np.asarray(batch["text"]["ids"]), "mask": np.asarray(batch["text"]["mask"])}


class Retrieval(Evaluator):
    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        embed = self.env.apply("embed", task=self.task)
        img, txt, ids = [], [], []
        for batch in self.env.batches(split):
            keep = _valid(batch)
            out = embed(variables, {"image": batch["image"], "text": _text_of(batch)})
            img.append(np.asarray(out["image_embeds"])[keep])
            txt.append(np.asarray(out["text_embeds"])[keep])
            ids.append(np.asarray(batch["text"]["ids"])[keep])
        img_e, txt_e = np.concatenate(img), np.concatenate(txt)
        groups = row_groups(np.concatenate(ids))
        sim = img_e.astype(np.float64) @ txt_e.astype(np.float64).T
        ks = tuple(int(k) for k in self.cfg.get("ks", (1, 5, 10)))
        i2t = recall_at_k(sim, groups, groups, ks)
        t2i = recall_at_k(sim.T, groups, groups, ks)
        out = {f"i2t_recall@{k}": v for k, v in i2t.items()}
        out.update({f"t2i_recall@{k}": v for k, v in t2i.items()})
        out["mean_recall"] = float(np.mean(list(i2t.values()) + list(t2i.values())))
        out["num_distinct_texts"] = float(groups.max() + 1)
        return out


class ZeroShot(Evaluator):
    def _classes(self) -> list[str]:
        source = self.cfg.get("classes", "labels")
        if source == "labels":
            return self.env.label_names
        if source == "shapes_objects":
            return [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]
        raise ValueError(f"evals.{self.name}.classes={source!r}; use labels or shapes_objects")

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        embed = self.env.apply("embed", task=self.task)
        classes = self._classes()
        prompt = self.cfg.get("prompt", "{}")
        max_len = int(self.env.data_config.max_len)
        ids, mask = self.env.tokenizer.encode([prompt.format(c) for c in classes], max_len)
        class_emb = np.asarray(
            embed(variables, {"text": {"ids": np.asarray(ids), "mask": np.asarray(mask)}})[
                "text_embeds"
            ]
        )
        source = self.cfg.get("classes", "labels")
        correct, seen = 0, 0
        for batch in self.env.batches(split):
            keep = _valid(batch)
            img = np.asarray(embed(variables, {"image": batch["image"]})["image_embeds"])
            pred = np.argmax(img @ class_emb.T, axis=1)[keep]
            if source == "labels":
                ok = pred == np.asarray(batch["label"])[keep]
            else:
                rows = np.arange(seen, seen + int(keep.sum()))
                ok = self._shapes_hits(split, rows, pred)
            correct += int(ok.sum())
            seen += int(keep.sum())
        return {"accuracy": correct / max(seen, 1), "num_classes": float(len(classes))}

    def _shapes_hits(self, split: str, rows: np.ndarray, pred: np.ndarray) -> np.ndarray:
        data = self.env.data_config
        if data.name != "shapes":
            raise ValueError(f"evals.{self.name}.classes='shapes_objects' needs data.name=shapes")
        layout = shapes.sample_layout(split, rows, seed=int(data.get("seed", 0) or 0))
        objects = layout.colours * len(shapes.SHAPES) + layout.shapes  # [n, 2] phrase indices
        return (objects == pred[:, None]).any(axis=1)


class QA(Evaluator):
    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        fwd = self.env.apply("__call__")
        names = self.env.label_names
        by_type: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        correct = total = 0
        for batch in self.env.batches(split):
            keep = _valid(batch)
            inputs = {k: v for k, v in batch.items() if k != "valid"}
            logits = np.asarray(fwd(variables, inputs)[self.task]["logits"])
            pred = np.argmax(logits, axis=1)[keep]
            gold = np.asarray(batch["label"])[keep]
            questions = self.env.tokenizer.decode(np.asarray(batch["text"]["ids"])[keep])
            for p, g, q in zip(pred, gold, questions, strict=True):
                ok = _norm(names[p]) == _norm(names[g])
                qtype = "_".join(q.split()[:2]) or "empty"
                by_type[qtype][0] += ok
                by_type[qtype][1] += 1
                correct += ok
                total += 1
        out = {"accuracy": correct / max(total, 1)}
        out.update({f"accuracy_{t}": c / n for t, (c, n) in sorted(by_type.items())})
        return out


class Agreement(Evaluator):
    def __init__(self, name: str, cfg: Mapping[str, Any], env: Env):
        if env.teacher is None:
            raise ValueError(f"evals.{name}.kind='agreement' needs a teacher: set "
                             "config.distill.teacher")
        super().__init__(name, {"task": env.teacher.spec.task, **cfg}, env)
        self._teacher_logits = jax.jit(env.teacher.spec.teacher_logits)
        self._teacher_vars: Any = None

    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        fwd = self.env.apply("__call__")
        if self._teacher_vars is None:  # on device once, not per batch
            self._teacher_vars = jax.device_put(self.env.teacher.variables)
        same = kl = right = 0.0
        n = 0
        for batch in self.env.batches(split):
            keep = _valid(batch)
            inputs = {k: v for k, v in batch.items() if k != "valid"}
            s = np.asarray(fwd(variables, inputs)[self.task]["logits"], np.float32)[keep]
            t = np.asarray(self._teacher_logits(self._teacher_vars, inputs), np.float32)[keep]
            log_s, log_t = (np.asarray(jax.nn.log_softmax(x, axis=1), np.float64) for x in (s, t))
            same += float((s.argmax(1) == t.argmax(1)).sum())
            kl += float((np.exp(log_t) * (log_t - log_s)).sum())
            gold = np.asarray(batch[self.env.model_cfg["heads"][self.task].get("target", "label")])
            right += float((t.argmax(1) == gold[keep]).sum())
            n += int(keep.sum())
        n = max(n, 1)
        return {"agreement": same / n, "kl": kl / n, "teacher_accuracy": right / n}


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


class Caption(Evaluator):
    def __call__(self, variables: Mapping[str, Any], split: str) -> dict[str, float]:
        head = self.env.model_cfg["heads"][self.task]
        modality = head.get("modality", "image")
        max_len = int(self.cfg.get("max_len", 0) or self.env.data_config.max_len)
        generate = self.env.apply("generate", task=self.task, max_len=max_len)
        hyps: list[list[str]] = []
        refs: list[list[str]] = []
        for batch in self.env.batches(split):
            keep = _valid(batch)
            out = np.asarray(generate(variables, {modality: batch[modality]}))[keep]
            hyps += [h.split() for h in self.env.tokenizer.decode(out)]
            refs += [r.split() for r in self.env.tokenizer.decode(
                np.asarray(batch["text"]["ids"])[keep])]
        exact = float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)])) if hyps else 0.0
        return {"exact_match": exact, "bleu": corpus_bleu(hyps, refs)}


EVALUATORS: dict[str, type[Evaluator]] = {
    "retrieval": Retrieval, "zeroshot": ZeroShot, "qa": QA, "agreement": Agreement,
    "caption": Caption,
}
UNPREFIXED = {"caption": ("exact_match", "bleu")}


def build(evals_cfg: Mapping[str, Any] | None, env: Env) -> list[Evaluator]:
    """The evaluators named in ``config.evals``; a bad kind or task fails here, before training."""
    out = []
    for name, cfg in (evals_cfg or {}).items():
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        kind = cfg.get("kind")
        if kind not in EVALUATORS:
            raise ValueError(f"evals.{name}.kind={kind!r}; known: {KINDS}")
        out.append(EVALUATORS[kind](name, cfg, env))
    return out


def run_all(
    evaluators: Iterable[Evaluator], variables: Mapping[str, Any], split: str
) -> dict[str, float]:
    """Every evaluator's metrics as ``<name>_<metric>`` (plus a caption's unprefixed pair)."""
    out: dict[str, float] = {}
    for ev in evaluators:
        metrics = ev(variables, split)
        out.update({f"{ev.name}_{k}": float(v) for k, v in metrics.items()})
        kind = ev.cfg["kind"]
        for key in UNPREFIXED.get(kind, ()):
            out.setdefault(key, float(metrics[key]))
    return out
