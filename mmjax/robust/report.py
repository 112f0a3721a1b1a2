"""A robustness report: one table (CSV and Markdown) and accuracy plots (PNG) in a folder.

Rows come from an evaluation result (``inference.checkpoint_metrics.checkpoint_metrics``): the
clean accuracy, each ``corrupt`` entry ``"name:severity"`` and each ``attack`` entry
``"method:modalities:eps"``. The plots draw accuracy against severity (severity 0 = clean), one
line per corruption, and accuracy against eps, one line per attacked modality set.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

COLUMNS = ("kind", "name", "level", "accuracy")
FILES = ("robustness.csv", "robustness.md", "corruptions.png", "attacks.png")


def rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table rows ``{"kind", "name", "level", "accuracy"}``: clean first, then corruptions by
    name and severity, then attacks by method, modalities and eps."""
    if "accuracy" not in result:
        raise ValueError("a robustness report needs a classification run: the evaluation has no "
                         f"'accuracy' (keys {sorted(result)})")
    out = [{"kind": "clean", "name": "clean", "level": 0, "accuracy": result["accuracy"]}]
    corrupt = []
    for key, metrics in result.get("corrupt", {}).items():
        name, _, severity = key.rpartition(":")
        corrupt.append({"kind": "corrupt", "name": name, "level": int(severity),
                        "accuracy": metrics["accuracy"]})
    attack = []
    for key, metrics in result.get("attack", {}).items():
        name = key.rpartition(":")[0]
        attack.append({"kind": "attack", "name": name, "level": float(metrics["eps"]),
                       "accuracy": metrics["accuracy"]})
    order = lambda r: (r["name"], r["level"])
    return out + sorted(corrupt, key=order) + sorted(attack, key=order)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("--report draws its plots with matplotlib: "
                          "pip install 'mmjax[report]' (or matplotlib)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot(path: Path, table: list[dict[str, Any]], kind: str, xlabel: str, title: str) -> None:
    plt = _pyplot()
    clean = table[0]["accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    names = sorted({r["name"] for r in table if r["kind"] == kind})
    for name in names:
        points = [(0, clean)] + [(r["level"], r["accuracy"]) for r in table
                                 if r["kind"] == kind and r["name"] == name]
        points = sorted(set(points))
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if not names:
        ax.axhline(clean, color="grey", linestyle="--", label="clean")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write(result: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Writes ``robustness.csv``, ``robustness.md``, ``corruptions.png`` and ``attacks.png``
    into ``directory`` (created); returns their paths."""
    table = rows(result)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f for f in FILES]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    dropped = f", without {'+'.join(result['drop'])}" if result.get("drop") else ""
    lines = [f"# Robustness: step {result.get('step')}, split {result.get('split')}{dropped}", "",
             "| kind | name | level | accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['name']} | {r['level']:g} | {r['accuracy']:.4f} |"
              for r in table]
    paths[1].write_text("\n".join(lines) + "\n")
    _plot(paths[2], table, "corrupt", "severity (0 = clean)", "accuracy under corruptions")
    _plot(paths[3], table, "attack", "eps (L∞)", "robust accuracy under attack")
    return paths
