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

from mmjax import files
from mmjax.data.records import TOKENIZER_FILE
from mmjax.data.tokenize import WordTokenizer
from mmjax.inference import answer, artifact
from mmjax.inference import quantize as quantize_lib
from mmjax.models.paths import path_str
from mmjax.trainer import runs
from mmjax.trainer import workdir as workdir_lib

log = logging.getLogger(__name__)

SERIALIZED = "model.jaxexport"
ONNX = "model.onnx"
FORMATS = ("jaxexport", "onnx")
# every name an export writes: an existing output folder may hold these and nothing else
OWNED = (SERIALIZED, ONNX, "example_inputs.npz", "example_outputs.npz", "labels.json",
         "signature.json", "README.md", TOKENIZER_FILE, "vocab.txt")
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


def _onnx(fn: Callable, examples: Sequence[np.ndarray], names: Sequence[str],
          output_name: str, expected: np.ndarray) -> bytes:
    """``fn`` as an ONNX model (``jax2onnx``, batch dimension dynamic), checked with
    ``onnxruntime`` against the in-process outputs on the example rows."""
    try:
        import onnxruntime
        from jax2onnx import to_onnx
    except ImportError as e:
        raise runs.RunError(f"--format=onnx needs jax2onnx and onnxruntime ({e}): "
                               "pip install jax2onnx onnxruntime") from None
    (batch,) = jax.export.symbolic_shape("B")
    specs = [jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype) for x in examples]
    serde = logging.getLogger("onnx_ir.serde")  # warns about shape constants it leaves untyped
    level = serde.level
    serde.setLevel(logging.ERROR)
    try:
        blob = to_onnx(fn, specs, model_name="mmjax", input_names=list(names),
                       output_names=[output_name]).SerializeToString()
    finally:
        serde.setLevel(level)
    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    got = session.run(None, dict(zip(names, examples, strict=True)))[0]
    worst = float(np.abs(np.asarray(got, np.float64) - expected).max())
    if worst > 1e-4:
        raise RuntimeError(f"onnxruntime's outputs differ from the model's by {worst:.2e} on "
                           "the example rows: the ONNX conversion is wrong")
    log.info("ONNX checked with onnxruntime: max difference %.1e on %d rows", worst,
             len(expected))
    return blob


def _write_tokenizer(run: runs.Run, out: Path) -> str:
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
           platforms: Sequence[str] = PLATFORMS, fmt: str = "jaxexport") -> dict[str, Any]:
    """Writes the artifact into ``output_dir`` and returns ``{"output", "file", "bytes",
    "platforms", "step", "task", "inputs", "note"}``.

    ``fmt="onnx"`` writes ``model.onnx`` (through ``jax2onnx``, checked with ``onnxruntime``)
    instead of ``model.jaxexport``; everything else is the same.

    The files are written into a fresh folder beside ``output_dir`` that then replaces it
    whole (``mmjax.files.replaced_dir``): an interrupted export leaves the previous artifact
    as it was. An existing ``output_dir`` may hold only an earlier export's files, and may
    not lie inside a training workdir.
    """
    if fmt not in FORMATS:
        raise runs.RunError(f"--format={fmt!r}; expected one of {FORMATS}")
    out = Path(output_dir)
    workdir_lib.refuse_output_inside(out)
    files.check_output_dir(out, OWNED)  # before the minutes of lowering, not after
    run = runs.load(workdir, step)
    task, kind = runs.output_task(run.config, task)
    model = run.build_model()
    output_name = runs.OUTPUTS[kind]
    variables = quantize_lib.quantized_variables(run.variables(), quantize)
    answer_fn = answer.output_fn(model, task, kind)
    examples = answer.model_inputs(answer.first_rows(run, "test", num_examples),
                                   answer.input_names(model, task, kind), present=False)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(examples)
    names = [path_str(p).replace("/", ".") for p, _ in with_paths]
    leaves = [np.asarray(x) for _, x in with_paths]

    def serve(*args: jax.Array) -> jax.Array:
        return answer_fn(variables, jax.tree_util.tree_unflatten(treedef, args))[output_name]

    # The in-process model: the same answer, jitted with the weights as arguments.
    expected = np.asarray(jax.jit(answer_fn)(variables, examples)[output_name])
    blob: bytes | bytearray
    if fmt == "onnx":
        blob, note, lowered = _onnx(serve, leaves, names, output_name, expected), "", ["onnx"]
    else:
        exported, note = _export(serve, leaves, platforms)
        blob, lowered = exported.serialize(), list(exported.platforms)
    file = ONNX if fmt == "onnx" else SERIALIZED

    with files.replaced_dir(out, owned=OWNED) as tmp:
        (tmp / file).write_bytes(blob)
        # (numpy's stubs type savez's keyword arrays as its allow_pickle flag)
        np.savez(tmp / "example_inputs.npz",
                 **{f"arg{i}": x for i, x in enumerate(leaves)})  # type: ignore[arg-type]
        np.savez(tmp / "example_outputs.npz", **{output_name: expected})  # type: ignore[arg-type]
        if kind == "classification":
            (tmp / "labels.json").write_text(json.dumps(run.label_names) + "\n")
        signature = {
            "task": task, "kind": kind, "step": run.step,
            "workdir": str(run.workdir.absolute()), "quantize": quantize or "none",
            "format": fmt, "file": file, "platforms": lowered,
            "inputs": [{"arg": i, "name": n, "shape": ["B", *x.shape[1:]], "dtype": str(x.dtype)}
                       for i, (n, x) in enumerate(zip(names, leaves, strict=True))],
            "output": {"name": output_name, "shape": ["B", *expected.shape[1:]],
                       "dtype": str(expected.dtype)},
        }
        (tmp / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
        tokenizer_file = _write_tokenizer(run, tmp)
        (tmp / "README.md").write_text(artifact.readme(
            run, signature, size=len(blob), note=note, tokenizer_file=tokenizer_file,
            num_classes=len(run.label_names)))
    log.info("exported %s (%d bytes, %s) to %s", task, len(blob), lowered, out / file)
    return {"output": str(out), "file": file, "bytes": len(blob), "platforms": lowered,
            "step": run.step, "task": task, "inputs": names, "note": note}
