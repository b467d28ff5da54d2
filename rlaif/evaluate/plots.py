"""How an audit is shown: PNG plots, the text table, and the files of an audit folder.

``audit_report(...)`` is the content of ``audit.json``; ``write_audit(out_dir, report, run)``
writes it with ``judgements.jsonl`` (every judgement, for a closer look) and four plots, plus
``option_prior.png`` (raw vs calibrated rates) when the audit was calibrated.
matplotlib is imported here only, with the Agg backend, so audits run with no display.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlaif.calls.caller import ModelCaller
from rlaif.constitution import Constitution
from rlaif.errors import StoreError
from rlaif.evaluate.audit import DEFINITIONS, AuditRun, Judgement, audit_metrics
from rlaif.evaluate.pairs_io import AuditData
from rlaif.stages.judge import JudgeConfig
from rlaif.store.atomic import write_atomic
from rlaif.version import __version__

PLOTS = ("agreement.png", "p_human.png", "position_bias.png", "calibration.png")
PRIOR_PLOT = "option_prior.png"
SIDE_NAMES = {
    "first_position_rate": "first-pos",
    "position_consistency": "consistent",
    "tie_rate": "ties",
    "agreement_decided": "agree (decided)",
    "agreement_ties_half": "agree (tie=.5)",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must come before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _value(r: dict[str, Any]) -> float:
    return float("nan") if r["rate"] is None else r["rate"]


def _err(rs: Sequence[dict[str, Any]]) -> list[list[float]]:
    """Asymmetric error bars (below, above) from Wilson intervals; 0 where undefined."""
    lo = [max(0.0, r["rate"] - r["ci95"][0]) if r["rate"] is not None else 0.0 for r in rs]
    hi = [max(0.0, r["ci95"][1] - r["rate"]) if r["rate"] is not None else 0.0 for r in rs]
    return [lo, hi]


def _groups(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Overall, then the ensemble and each principle unless they repeat the overall numbers
    (one principle per pair, or a multiple-choice eval, makes them identical)."""
    overall = metrics["overall"]
    rest = [("ensemble", metrics["ensemble"]), *metrics["per_principle"].items()]
    return [("overall", overall), *((n, m) for n, m in rest if m != overall)]


def _bars(ax: Any, names: list[str], series: list[tuple[str, list[dict[str, Any]]]]) -> None:
    width = 0.8 / len(series)
    for k, (label, rs) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [_value(r) for r in rs], width, yerr=_err(rs), capsize=2, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)


def plot_agreement(metrics: dict[str, Any], path: Path, title: str) -> Path:
    """Agreement with the human label per principle, with Wilson 95 % intervals."""
    plt = _pyplot()
    groups = _groups(metrics)
    names = [f"{n} ({m['n']})" for n, m in groups]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(groups) + 2), 4.5))
    series = [
        ("decided verdicts", [m["agreement_decided"] for _, m in groups]),
        ("all, tie = 0.5", [m["agreement_ties_half"] for _, m in groups]),
    ]
    _bars(ax, names, series)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("agreement with human label")
    ax.set_title(title, fontsize=10)
    return _save(fig, plt, path)


def plot_p_human(judgements: Sequence[Judgement], path: Path, title: str) -> Path:
    """Distribution of P(human-chosen better) in each order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    bins = [i / 20 for i in range(21)]
    labels = ("order 1: human's choice shown first", "order 2: human's choice shown second")
    for o, label in enumerate(labels):
        ps = [j.p_orders[o] for j in judgements if j.status == "ok" and j.p_orders[o] is not None]
        ax.hist(ps, bins=bins, histtype="step", linewidth=1.5, label=f"{label} (n={len(ps)})")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("P(human-chosen response better)")
    ax.set_ylabel("judgements")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, plt, path)


def plot_position_bias(metrics: dict[str, Any], path: Path, title: str) -> Path:
    """First-position preference, position consistency and tie rate per principle."""
    plt = _pyplot()
    groups = _groups(metrics)
    names = [n for n, _ in groups]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(groups) + 2), 4.5))
    series = [
        ("first-position preference", [m["first_position_rate"] for _, m in groups]),
        ("position consistency", [m["position_consistency"] for _, m in groups]),
        ("tie rate", [m["tie_rate"] for _, m in groups]),
    ]
    _bars(ax, names, series)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("rate")
    ax.set_title(title, fontsize=10)
    return _save(fig, plt, path)


def plot_calibration(metrics: dict[str, Any], path: Path, title: str) -> Path:
    """Observed agreement of the judge's lean against its confidence max(p, 1 - p)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, m in [g for g in _groups(metrics) if g[0] in ("overall", "ensemble")]:
        pts = [b for b in m["calibration"] if b["agreement"]["rate"] is not None]
        xs = [b["mean_confidence"] for b in pts]
        rs = [b["agreement"] for b in pts]
        ax.errorbar(xs, [r["rate"] for r in rs], yerr=_err(rs), marker="o", capsize=3, label=name)
        for x, r in zip(xs, rs, strict=True):
            ax.annotate(
                str(r["n"]), (x, r["rate"]), fontsize=7, xytext=(4, -10), textcoords="offset points"
            )
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("judge confidence max(p, 1 - p)")
    ax.set_ylabel("agreement with human label")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, plt, path)


def plot_option_prior(calibration: dict[str, Any], path: Path, title: str) -> Path:
    """The rates the option prior moves, raw next to calibrated (single-principle verdicts)."""
    plt = _pyplot()
    side = calibration["side_by_side"]["overall"]
    names = [SIDE_NAMES.get(k, k) for k in side]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [(w, [m[w] for m in side.values()]) for w in ("raw", "calibrated")]
    _bars(ax, names, series)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel("rate")
    ax.set_title(f"{title}\n{calibration['line']}", fontsize=9)
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], run: AuditRun, out_dir: Path) -> list[Path]:
    """The four PNG plots of an audit, in ``out_dir`` (five when it was calibrated)."""
    m = report["metrics"]
    judge = report["judge"]
    title = f"{judge['model']} ({judge['mode']}) on {Path(report['input']['path']).name}"
    pngs = [
        plot_agreement(m, out_dir / PLOTS[0], title),
        plot_p_human(run.judgements, out_dir / PLOTS[1], title),
        plot_position_bias(m, out_dir / PLOTS[2], title),
        plot_calibration(m, out_dir / PLOTS[3], title),
    ]
    if report.get("calibration"):
        pngs.append(plot_option_prior(report["calibration"], out_dir / PRIOR_PLOT, title))
    return pngs


def audit_report(
    data: AuditData,
    run: AuditRun,
    caller: ModelCaller,
    constitution: Constitution,
    cfg: JudgeConfig,
    *,
    principles: str | int,
    seed: int,
    seconds: float,
    backend: str,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``audit.json``: what was audited with what, the metrics (raw: no option
    prior removed), the calls, and ``calibration``
    (:func:`rlaif.evaluate.calibration_audit.calibration_report`) when given."""
    return {
        "rlaif_version": __version__,
        "input": {
            "path": data.path,
            "format": data.format,
            "rows": data.rows,
            "pairs": len(data.pairs),
            "mc_items": len(data.mc_items),
            "skipped": data.skip_counts(),
        },
        "judge": {
            "model": caller.model,
            "revision": caller.revision,
            "backend": backend,
            "mode": cfg.mode,
            "config": cfg.to_dict(),
            "constitution": constitution.provenance(),
            "principles": principles,
            "principle_ids": run.principle_ids,
            "seed": seed,
        },
        "metrics": audit_metrics(run),
        "definitions": DEFINITIONS,
        "calls": caller.stats.to_dict(),
        "seconds": round(seconds, 3),
        **({"calibration": calibration} if calibration else {}),
    }


def write_audit(
    out_dir: str | Path, report: dict[str, Any], run: AuditRun, *, plots: bool = True
) -> list[Path]:
    """Write ``audit.json``, ``judgements.jsonl`` and the plots; return the paths written.

    Raises:
        StoreError: the folder cannot be written.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        pngs = write_plots(report, run, out) if plots else []
        report = {**report, "plots": [p.name for p in pngs]}
        rows = [{"scope": "principle", **j.to_dict()} for j in run.judgements]
        rows += [{"scope": "comparison", **j.to_dict()} for j in run.ensembles if j.kind == "pair"]
        rows += [{"scope": "mc_item", **r} for r in run.mc]
        lines = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
        write_atomic(out / "judgements.jsonl", lines)
        write_atomic(out / "audit.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    except OSError as exc:
        raise StoreError(f"cannot write the audit: {exc}", file=str(out)) from exc
    return [out / "audit.json", out / "judgements.jsonl", *pngs]


# -- text -------------------------------------------------------------------------------------


def _short(r: dict[str, Any]) -> str:
    return "-" if r["rate"] is None else f"{r['rate']:.2f}"


def _with_ci(r: dict[str, Any]) -> str:
    if r["rate"] is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{r['rate']:.2f} [{lo:.2f},{hi:.2f}]"


def format_table(metrics: dict[str, Any]) -> str:
    """A short fixed-width table of the main metrics: overall, per comparison, per principle."""
    head = (
        f"{'':<22}{'n':>6}  {'agree (decided)':<18}{'agree (tie=.5)':<18}"
        f"{'consistent':>11}{'first-pos':>10}{'ties':>7}{'errors':>8}  longer wins (human)"
    )
    lines = [head]
    for name, m in _groups(metrics):
        lb = m["length_bias"]
        lines.append(
            f"{name[:21]:<22}{m['n']:>6}  {_with_ci(m['agreement_decided']):<18}"
            f"{_with_ci(m['agreement_ties_half']):<18}{_short(m['position_consistency']):>11}"
            f"{_short(m['first_position_rate']):>10}{_short(m['tie_rate']):>7}"
            f"{_short(m['error_rate']):>8}  {_short(lb['judge_prefers_longer'])} "
            f"({_short(lb['human_prefers_longer'])})"
        )
    mc = metrics.get("mc")
    if mc and mc["n_ok"]:
        lines.append(
            f"multiple choice: {mc['n_ok']}/{mc['n_items']} items, accuracy "
            f"{_with_ci(mc['accuracy_combined'])} (order 1 {_short(mc['accuracy_order1'])}, "
            f"order 2 {_short(mc['accuracy_order2'])}, chance {mc['chance']:.2f}), "
            f"consistent {_short(mc['position_consistency'])}, "
            f"first-pos {_short(mc['first_position_rate'])}"
        )
    elif mc:
        lines.append(f"multiple choice: all {mc['n_items']} items failed")
    return "\n".join(lines)


def format_calibration(calibration: dict[str, Any]) -> str:
    """The option prior and the rates it moves, raw next to calibrated, with 95 % intervals."""
    lines = [f"option prior {calibration['line']}"]
    lines.append(f"{'':<22}{'raw':<20}{'calibrated':<20}(single-principle verdicts)")
    for key, m in calibration["side_by_side"]["overall"].items():
        name = SIDE_NAMES.get(key, key)
        lines.append(f"{name:<22}{_with_ci(m['raw']):<20}{_with_ci(m['calibrated']):<20}")
    return "\n".join(lines)
