"""The README of an exported artifact: what each input is and how raw data becomes it.

Written from the run's own config (its eval preprocessing ops, image size, tokenizer), so the
description is the preprocessing the model was evaluated with.
"""

from __future__ import annotations

from typing import Any

from mmjax.data import ops
from mmjax.data.records import DEFAULT_PP_EVAL
from mmjax.trainer import runs

_OUTPUTS = {
    "probs": "class probabilities (softmax of the logits, float32); column j is class "
             "`labels.json[j]`",
    "values": "the regression head's predictions",
    "tokens": "greedy caption token ids: position 0 is [CLS], each row ends at its first [SEP] "
              "and is [PAD] after it; decode with the tokenizer",
}


def _image_steps(data: Any, spec: str, size: int) -> list[str]:
    """``size``: the side of the image input (what the ops' defaults and arguments give)."""
    steps = []
    for op in ops.parse(spec, ops.Context(image_size=size, max_len=int(data.max_len))):
        if op.name == "decode":
            steps.append("decode the file to RGB, uint8 [H, W, 3] (Pillow)")
        elif op.name == "resize":
            steps.append(f"resize to {size} x {size} (Pillow `Image.BILINEAR`)")
        elif op.name == "center_crop":
            steps.append(f"crop the central square and resize it to {size} x {size} (Pillow "
                         "`Image.BILINEAR`)")
        elif op.name == "normalize" and getattr(op.fn, "on_device", False):
            steps.append("pass the pixels as uint8 [0, 255]: the function itself converts them "
                         "to float32 and scales them, `x / 127.5 - 1`, to [-1, 1]")
        elif op.name == "normalize":
            steps.append("convert to float32 and scale: `x / 127.5 - 1`, so [0, 255] → [-1, 1]")
    return steps


def _text_steps(run: runs.Run, tokenizer_file: str) -> list[str]:
    data = run.config.data
    tok = run.tokenizer
    if tokenizer_file == "vocab.txt":
        how = ("lower-case, split on whitespace, and map each word to its line number in "
               "`vocab.txt` (unknown words: [UNK] = 1)")
    elif tokenizer_file:
        how = (f"word-piece with the Hugging Face `tokenizers` file `{tokenizer_file}` "
               "(`Tokenizer.from_file`), encoded without special tokens")
    else:
        how = f"the Hugging Face tokenizer of `{data.get('tokenizer', '')}`"
    return [
        how,
        f"lay out each row as `[CLS] pieces [SEP]` then [PAD] up to {int(data.max_len)} ids "
        f"([CLS] = {tok.CLS}, [SEP] = {tok.SEP}, [PAD] = {tok.PAD}); pieces beyond "
        f"{int(data.max_len) - 2} are dropped, never the [SEP]",
        "mask: 1 where the id is not [PAD], else 0",
    ]


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _meaning(name: str, dtype: str) -> str:
    if name.endswith(".ids"):
        return "token ids (see Text)"
    if name.endswith(".mask"):
        return "1 on real tokens ([CLS], pieces, [SEP]), 0 on padding"
    if name.endswith(".segment_ids"):
        return "segment ids (0 for a single text)"
    if dtype == "uint8":
        return "RGB pixels, uint8 in [0, 255], scaled inside the function (see Images)"
    return "pixels in [-1, 1] (see Images)"


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
    images = [x for x in signature["inputs"] if len(x["shape"]) == 4]
    if images:
        steps = _image_steps(data, spec, int(images[0]["shape"][1]))
        lines += ["Images:", ""] + [f"{i}. {s}" for i, s in enumerate(steps, 1)] + [""]
    if any(x["name"].startswith("text") for x in signature["inputs"]):
        lines += ["Text:", ""] + [f"{i}. {s}" for i, s in enumerate(
            _text_steps(run, tokenizer_file), 1)]
        lines.append("")
    lines += ["`signature.json` has the same inputs and output in machine-readable form.", ""]
    return "\n".join(lines)
