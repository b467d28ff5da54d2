"""Evaluations side by side: every evaluation step of a ``steps:`` pipeline in one table and
one figure, e.g. the arms of an experiment (policies trained on the same pairs labelled by
different judges) or the SL and RL phases of Constitutional AI.

Reads each evaluation's ``eval.json`` and writes ``evals.json`` and ``evals.png`` (one panel
per metric: each evaluation's policy beside its baseline, with Wilson 95 % intervals).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlaif.evaluate.plots import _pyplot, _save
from rlaif.evaluate.rounds import error_bar, metric_paths, metric_value
from rlaif.store.atomic import write_json_atomic


def compare_evals(evals: Sequence[tuple[str, Path]]) -> dict[str, Any]:
    """``{"evals": [name, ...], "policy": {metric: [value, ...]}, "baseline": {...}}`` over
    the evaluation folders that hold an ``eval.json``; a value is a number, ``{rate, n,
    ci95}`` or None where that evaluation lacks the metric."""
    out: dict[str, Any] = {"evals": [], "policy": {}, "baseline": {}}
    for name, folder in evals:
        path = folder / "eval.json"
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text(encoding="utf-8")).get("metrics") or {}
        out["evals"].append(name)
        k = len(out["evals"])
        for role in ("policy", "baseline"):
            for metric, where in metric_paths(metrics, role):
                if metric == "win_rate" and role == "baseline":
                    continue
                out[role].setdefault(metric, [None] * (k - 1)).append(metric_value(metrics, where))
    n = len(out["evals"])
    for role in ("policy", "baseline"):
        out[role] = {m: v + [None] * (n - len(v)) for m, v in out[role].items()
                     if any(x is not None for x in v)}  # fmt: skip
    return out


def plot_evals(table: dict[str, Any], path: Path) -> Path:
    """One panel per metric: a bar per evaluation for its policy and one for its baseline."""
    plt = _pyplot()
    metrics = list(table["policy"])
    names = table["evals"]
    cols = min(3, len(metrics)) or 1
    rows = (len(metrics) + cols - 1) // cols or 1
    width = max(4.2, 0.9 * len(names) + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.4 * rows), squeeze=False)
    xs = list(range(len(names)))
    for ax, metric in zip(axes.flat, metrics, strict=False):
        rates = False
        for role, shift, color in (("policy", -0.2, "C0"), ("baseline", 0.2, "C7")):
            values = table[role].get(metric) or []
            points = [(x, error_bar(v)) for x, v in zip(xs, values, strict=False)]
            points = [(x, r) for x, r in points if r is not None]
            if not points:
                continue
            rates = rates or any(isinstance(v, dict) for v in values)
            ax.bar([x + shift for x, _ in points], [r[0] for _, r in points], width=0.38,
                   yerr=[[r[1] for _, r in points], [r[2] for _, r in points]], capsize=3,
                   color=color, label=role)  # fmt: skip
        if rates:
            ax.set_ylim(0, 1.05)
        ax.set_title(metric, fontsize=9)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, plt, path)


def write_evals(table: dict[str, Any], run_dir: Path) -> list[Path]:
    """``evals.json`` and ``evals.png`` in ``run_dir``."""
    out = [run_dir / "evals.json"]
    write_json_atomic(out[0], table, indent=1, sort_keys=True)
    if table["policy"]:
        out.append(plot_evals(table, run_dir / "evals.png"))
    return out
