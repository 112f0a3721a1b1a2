"""Ship a trained run as a ``jax.export`` artifact that needs jax alone (not mmjax) to run.

The answer of one head (class probabilities for a classification head) is exported as
serialized StableHLO with the weights inside as constants (int8 values and float32 scales with
``quantize="int8"``, dequantized inside the function), positional array inputs with a symbolic
batch dimension, lowered for CPU and CUDA (``jax.export`` lowers for CUDA without a GPU; if the
installed jax cannot, for CPU alone, and the artifact's README says so). Next to it: the class
names, the first test rows preprocessed as the artifact takes them with the in-process model's
outputs on them, the tokenizer, and a README that says what each input is.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mmjax.data.records import TOKENIZER_FILE
from mmjax.data.tokenize import WordTokenizer
from mmjax.inference import artifact
from mmjax.inference import run as run_lib
from mmjax.tree import path_str

log = logging.getLogger(__name__)

SERIALIZED = "model.jaxexport"
PLATFORMS = ("cpu", "cuda")


def _export(fn: Callable, examples: Sequence[np.ndarray], platforms: Sequence[str]
            ) -> tuple[jax.export.Exported, str]:
    """``fn`` exported for ``platforms`` (else CPU alone, with the reason), batch symbolic."""
    (batch,) = jax.export.symbolic_shape("B")
    specs = [jax.ShapeDtypeStruct((batch, *np.shape(x)[1:]), np.asarray(x).dtype)
             for x in examples]
    try:
        return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs), ""
    except Exception as e:  # any lowering failure for an extra platform: fall back to CPU
        if tuple(platforms) == ("cpu",):
            raise
        note = f"lowering for {list(platforms)} failed ({type(e).__name__}: {e}); CPU only"
        log.warning("%s", note)
        return jax.export.export(jax.jit(fn), platforms=("cpu",))(*specs), note


def _write_tokenizer(run: run_lib.Run, out: Path) -> str:
    """Copies (or writes) the run's tokenizer next to the artifact; returns its file name."""
    saved = run.workdir / TOKENIZER_FILE
    if saved.is_file() and not run.config.data.get("tokenizer"):
        shutil.copyfile(saved, out / TOKENIZER_FILE)
        return TOKENIZER_FILE
    if isinstance(run.tokenizer, WordTokenizer):
        (out / "vocab.txt").write_text("\n".join(run.tokenizer.vocab) + "\n")
        return "vocab.txt"
    return ""


def export(workdir: str | Path, output_dir: str | Path, *, step: str | int | None = None,
           quantize: str = "", task: str = "", num_examples: int = 8,
           platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
    """Writes the artifact into ``output_dir`` (created; existing files are overwritten) and
    returns ``{"output", "bytes", "platforms", "step", "task", "inputs", "note"}``."""
    run = run_lib.load(workdir, step)
    task, kind = run_lib.output_task(run.config, task)
    model = run.build_model()
    output_name = run_lib.OUTPUTS[kind]
    variables = run.variables(quantize)
    answer = run_lib.output_fn(model, task, kind)
    examples = run_lib.model_inputs(run_lib.first_rows(run, "test", num_examples),
                                    run_lib.input_names(model, task, kind))
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(examples)
    names = [path_str(p).replace("/", ".") for p, _ in with_paths]
    leaves = [np.asarray(x) for _, x in with_paths]

    def serve(*args: jax.Array) -> jax.Array:
        return answer(variables, jax.tree_util.tree_unflatten(treedef, args))[output_name]

    exported, note = _export(serve, leaves, platforms)
    blob = exported.serialize()
    # The in-process model: the same answer, jitted with the weights as arguments.
    expected = np.asarray(jax.jit(answer)(variables, examples)[output_name])

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SERIALIZED).write_bytes(blob)
    np.savez(out / "example_inputs.npz", **{f"arg{i}": x for i, x in enumerate(leaves)})
    np.savez(out / "example_outputs.npz", **{output_name: expected})
    if kind == "classification":
        (out / "labels.json").write_text(json.dumps(run.label_names) + "\n")
    signature = {
        "task": task, "kind": kind, "step": run.step, "workdir": str(run.workdir.absolute()),
        "quantize": quantize or "none", "platforms": list(exported.platforms),
        "inputs": [{"arg": i, "name": n, "shape": ["B", *x.shape[1:]], "dtype": str(x.dtype)}
                   for i, (n, x) in enumerate(zip(names, leaves, strict=True))],
        "output": {"name": output_name, "shape": ["B", *expected.shape[1:]],
                   "dtype": str(expected.dtype)},
    }
    (out / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
    tokenizer_file = _write_tokenizer(run, out)
    (out / "README.md").write_text(artifact.readme(
        run, signature, size=len(blob), note=note, tokenizer_file=tokenizer_file,
        num_classes=len(run.label_names)))
    log.info("exported %s (%d bytes, %s) to %s", task, len(blob), list(exported.platforms), out)
    return {"output": str(out), "bytes": len(blob), "platforms": list(exported.platforms),
            "step": run.step, "task": task, "inputs": names, "note": note}
