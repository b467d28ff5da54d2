"""Evaluation metrics by round, for the blocks of rounds of a ``steps:`` pipeline.

Each round's evaluation folder holds an ``eval.json``; this collects its rates (with their
Wilson 95 % intervals) round by round, and writes ``rounds.json`` and ``rounds.png`` (one
panel per metric, the policy's value by round, the baseline's beside it where it has one).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlaif.evaluate.plots import _pyplot, _save
from rlaif.store.atomic import write_json_atomic

# (name in rounds.json, where in eval.json's metrics)
METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("win_rate", ("win_rate", "all", "win_rate")),
    ("red_team_judged_harmless_rate", ("{role}", "red_team_judged_harmless_rate")),
    ("red_team_refusal_rate", ("{role}", "red_team_refusal_rate")),
    ("over_refusal_rate", ("{role}", "over_refusal_rate")),
    ("red_team_mean_p_harmless", ("{role}", "red_team_mean_p_harmless")),
    ("reward_mean_red_team", ("{role}", "reward", "red_team", "mean")),
    ("reward_mean_safe", ("{role}", "reward", "safe", "mean")),
    ("reward_mean_prompts", ("{role}", "reward", "prompts", "mean")),
)


def metric_value(metrics: dict[str, Any], path: Sequence[str]) -> Any:
    node: Any = metrics
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):  # a rate: {rate, k, n, ci95}
        return {"rate": node.get("rate"), "n": node.get("n"), "ci95": node.get("ci95")}
    return node if isinstance(node, (int, float)) else None


def metric_paths(metrics: dict[str, Any], role: str) -> list[tuple[str, list[str]]]:
    """(name, path in eval.json's metrics) of every metric of a role: :data:`METRICS`, then
    the compliance with each code-checked principle (``compliance:<id>``) and overall."""
    out = [(name, [w.format(role=role) for w in where]) for name, where in METRICS]
    for pid in (metrics.get(role) or {}).get("compliance") or {}:
        out.append((f"compliance:{pid}", [role, "compliance", pid]))
    return out


def round_metrics(evals: Sequence[tuple[str | None, int | None, Path]]) -> dict[str, Any]:
    """Per block, each metric's value by round, from the evaluation folders of its rounds.

    Args:
        evals: (block, round, folder) of every evaluation that ran; those outside a block are
            left out.

    Returns:
        ``{block: {"rounds": [1, 2, ...], "policy": {metric: [value or None, ...]},
        "baseline": {...}}}``; a value is a number or ``{rate, n, ci95}``.
    """
    out: dict[str, Any] = {}
    for block, k, folder in evals:
        path = folder / "eval.json"
        if block is None or k is None or not path.is_file():
            continue
        metrics = json.loads(path.read_text(encoding="utf-8")).get("metrics") or {}
        b = out.setdefault(block, {"rounds": [], "policy": {}, "baseline": {}})
        b["rounds"].append(k)
        for role in ("policy", "baseline"):
            for name, where in metric_paths(metrics, role):
                if name == "win_rate" and role == "baseline":
                    continue  # the win rate is the policy's over the baseline
                b[role].setdefault(name, [None] * (len(b["rounds"]) - 1))
                b[role][name].append(metric_value(metrics, where))
    for b in out.values():  # pad metrics some rounds lack; drop metrics no round has
        for role in ("policy", "baseline"):
            n = len(b["rounds"])
            b[role] = {m: v + [None] * (n - len(v)) for m, v in b[role].items()
                       if any(x is not None for x in v)}  # fmt: skip
    return out


def error_bar(v: Any) -> tuple[float, float, float] | None:
    """(value, below, above) for plotting; None when missing."""
    if v is None:
        return None
    if isinstance(v, dict):
        if v.get("rate") is None:
            return None
        lo, hi = v.get("ci95") or (v["rate"], v["rate"])
        return v["rate"], v["rate"] - lo, hi - v["rate"]
    return float(v), 0.0, 0.0


def plot_rounds(rounds: dict[str, Any], path: Path) -> Path:
    """One panel per metric: the policy (and the baseline) by round, 95 % intervals as bars."""
    plt = _pyplot()
    panels = [(blk, m) for blk, b in rounds.items() for m in b["policy"]]
    cols = min(3, len(panels)) or 1
    rows = (len(panels) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (blk, metric) in zip(axes.flat, panels, strict=False):
        b = rounds[blk]
        rates = False
        for role, style, shift in (("policy", "o-", 0.0), ("baseline", "s--", 0.06)):
            points = [(k, error_bar(v)) for k, v in zip(b["rounds"], b[role].get(metric, []),
                                                    strict=False)]  # fmt: skip
            points = [(k, r) for k, r in points if r is not None]
            if not points:
                continue
            rates = rates or any(isinstance(v, dict) for v in b[role][metric])
            xs = [k + shift for k, _ in points]  # side by side, so both sets of bars show
            ys = [r[0] for _, r in points]
            err = [[r[1] for _, r in points], [r[2] for _, r in points]]
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=role)
        if rates:
            ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{blk}: {metric}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(b["rounds"])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, plt, path)


def write_rounds(rounds: dict[str, Any], run_dir: Path) -> list[Path]:
    """``rounds.json`` and ``rounds.png`` in ``run_dir``."""
    out = [run_dir / "rounds.json"]
    write_json_atomic(out[0], rounds, indent=1, sort_keys=True)
    if any(b["policy"] for b in rounds.values()):
        out.append(plot_rounds(rounds, run_dir / "rounds.png"))
    return out
