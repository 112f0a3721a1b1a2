"""The README of an exported artifact: what each input is and how raw data becomes it.

Written from the run's own config (its eval preprocessing ops, image size, tokenizer), so the
description is the preprocessing the model was evaluated with.
"""

from __future__ import annotations

from typing import Any

from mmjax import modalities
from mmjax.data import records
from mmjax.data.records import DEFAULT_PP_EVAL
from mmjax.trainer import runs

_OUTPUTS = {
    "probs": "class probabilities (softmax of the logits, float32); column j is class "
             "`labels.json[j]`",
    "values": "the regression head's predictions",
    "tokens": "greedy caption token ids: position 0 is [CLS], each row ends at its first [SEP] "
              "and is [PAD] after it; decode with the tokenizer",
}


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _meaning(name: str, dtype: str) -> str:
    """What input leaf ``name`` (``"image"``, ``"text.ids"``) holds, as its modality says."""
    modality, _, leaf = name.partition(".")
    return modalities.get(modality).describe(leaf, dtype)


def _call_jax(signature: dict[str, Any]) -> list[str]:
    return [
        "Needs `jax` (and `flatbuffers`, which `jax.export` uses to read the file), not mmjax:",
        "",
        "```python",
        "import jax, numpy as np",
        'exported = jax.export.deserialize(open("model.jaxexport", "rb").read())',
        'x = np.load("example_inputs.npz")',
        f'{signature["output"]["name"]} = exported.call(*[x[f"arg{{i}}"] '
        'for i in range(len(x.files))])',
    ]


def _call_onnx(signature: dict[str, Any]) -> list[str]:
    names = [x["name"] for x in signature["inputs"]]
    return [
        "Needs `onnxruntime` (or any ONNX runtime); the inputs are named as below:",
        "",
        "```python",
        "import numpy as np, onnxruntime",
        'session = onnxruntime.InferenceSession("model.onnx")',
        'x = np.load("example_inputs.npz")',
        f"names = {names}",
        f'{signature["output"]["name"]} = session.run(None, '
        '{n: x[f"arg{i}"] for i, n in enumerate(names)})[0]',
    ]


def readme(run: runs.Run, signature: dict[str, Any], *, size: int, note: str,
           tokenizer_file: str, num_classes: int) -> str:
    """The artifact's README.md."""
    data = run.config.data
    spec = data.get("pp_eval", DEFAULT_PP_EVAL) if data.name != "shapes" else DEFAULT_PP_EVAL
    out = signature["output"]
    weights = ("int8 weight matrices with one float32 scale per output channel, dequantized "
               "inside the function" if signature["quantize"] == "int8" else "float32 weights")
    onnx = signature["format"] == "onnx"
    where = "ONNX (opset 23)" if onnx else f"lowered for {', '.join(signature['platforms'])}"
    lines = [
        f"# `{signature['task']}` ({signature['kind']} head), exported from mmjax",
        "",
        f"Run `{signature['workdir']}`, checkpoint step {signature['step']}; {weights}; "
        f"{where}; `{signature['file']}` is {size:,} bytes." + (f" Note: {note}." if note else ""),
        "",
        "## Calling it",
        "",
        *(_call_onnx(signature) if onnx else _call_jax(signature)),
        f'np.testing.assert_allclose({out["name"]}, '
        f'np.load("example_outputs.npz")["{out["name"]}"], atol=1e-5)',
        "```",
        "",
        "## Inputs (positional, any batch size B)",
        "",
        "| arg | name | shape | dtype | meaning |",
        "|---|---|---|---|---|",
    ]
    for x in signature["inputs"]:
        lines.append(f"| arg{x['arg']} | `{x['name']}` | {_shape(x['shape'])} | {x['dtype']} | "
                     f"{_meaning(x['name'], x['dtype'])} |")
    lines += [
        "",
        f"## Output: `{out['name']}`, {_shape(out['shape'])} {out['dtype']}",
        "",
        _OUTPUTS[out["name"]] + (f" ({num_classes} classes)." if out["name"] == "probs" else "."),
        "",
        "## Preprocessing raw data",
        "",
        "The run's eval preprocessing (`" + spec + "`); `example_inputs.npz` holds the first "
        "rows of the test split after it, and `example_outputs.npz` the model's outputs on them.",
        "",
    ]
    ctx = records.context(data, run.tokenizer)
    for m in dict.fromkeys(x["name"].partition(".")[0] for x in signature["inputs"]):
        steps = modalities.get(m).steps(ctx, spec, tokenizer_file)
        if steps:
            lines += [f"{m.capitalize()}:", ""] + [f"{i}. {s}" for i, s in enumerate(steps, 1)]
            lines.append("")
    lines += ["`signature.json` has the same inputs and output in machine-readable form.", ""]
    return "\n".join(lines)
