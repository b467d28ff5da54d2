"""The report's plots, as ``data:image/png;base64,...`` URIs embedded in the page.

Where a module already draws the plot (the audit's position-bias bars, the export's margin
histograms, the trainer's curves, the evaluation's win/tie/loss, safety and reward plots) it
draws it here too, into a temporary folder, so the report shows exactly what those commands
show. The rest use matplotlib's object API with the Agg canvas: no display, no global state.
"""

from __future__ import annotations

import base64
import copy
import io
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlaif.evaluate.audit import Judgement
from rlaif.report.stats import PrincipleUse

PNG_PREFIX = "data:image/png;base64,"


def png_uri(data: bytes) -> str:
    """PNG bytes as a data URI."""
    return PNG_PREFIX + base64.b64encode(data).decode("ascii")


def _from_file(draw: Callable[[Path], Any], name: str) -> str | None:
    """Run ``draw(folder)`` in a temporary folder and embed ``folder/name`` if it was written."""
    tmp = Path(tempfile.mkdtemp(prefix="rlaif-report-"))
    try:
        draw(tmp)
        path = tmp / name
        return png_uri(path.read_bytes()) if path.is_file() else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _uri(fig: Any) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return png_uri(buf.getvalue())


def principle_usage(uses: Sequence[PrincipleUse]) -> str | None:
    """Horizontal bars per principle: critique requests and judge verdicts."""
    if not uses:
        return None
    names = [u.id for u in uses][::-1]
    fig = _figure(7.5, 0.32 * len(names) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    ys = range(len(names))
    crit = [u.total_critiques for u in uses][::-1]
    judged = [u.judged for u in uses][::-1]
    ax.barh([y + 0.2 for y in ys], crit, 0.4, label="critiques", color="#4c72b0")
    ax.barh([y - 0.2 for y in ys], judged, 0.4, label="judge verdicts", color="#dd8452")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("uses")
    ax.legend(fontsize=8)
    ax.set_title("Principle usage", fontsize=10)
    return _uri(fig)


def judge_probabilities(judgements: Sequence[Judgement], title: str) -> str | None:
    """Histograms of P(x better) per order and combined, over ok verdicts of judged pairs."""
    ok = [j for j in judgements if j.status == "ok" and j.p_human is not None]
    if not ok:
        return None
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    bins = [i / 20 for i in range(21)]
    series = (
        ("order 1 (x shown first)", [j.p_orders[0] for j in ok if j.p_orders[0] is not None]),
        ("order 2 (x shown second)", [j.p_orders[1] for j in ok if j.p_orders[1] is not None]),
        ("both orders combined", [j.p_human for j in ok]),
    )
    for label, values in series:
        ax.hist(
            values, bins=bins, histtype="step", linewidth=1.5, label=f"{label} (n={len(values)})"
        )
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(x better than y)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _uri(fig)


def position_bias(metrics: dict[str, Any], title: str) -> str | None:
    """The audit's position-bias plot (first-position rate, consistency, ties per principle)."""
    from rlaif.evaluate.plots import plot_position_bias

    if not metrics["overall"]["n_ok"]:
        return None
    return _from_file(
        lambda d: plot_position_bias(metrics, d / "position_bias.png", title), "position_bias.png"
    )


def margins(rows: list[dict[str, Any]]) -> str | None:
    """The export card's histograms of margin and p_chosen over the kept rows."""
    from rlaif.export.card import plot_margins

    rows = [r for r in rows if isinstance(r.get("margin"), (int, float))]
    if not rows:
        return None
    rows = [{**r, "p_chosen": r.get("p_chosen", 0.5)} for r in rows]
    return _from_file(lambda d: plot_margins(rows, d / "margins.png"), "margins.png")


def curves(rows: list[dict[str, Any]]) -> str | None:
    """The trainer's curves plot (:meth:`rlaif.train.curves.CurveLogger.plot`) of
    ``curves.jsonl`` rows, drawn from the rows rather than trusting a PNG next to them."""
    import json

    from rlaif.train.curves import CurveLogger

    def draw(d: Path) -> None:
        (d / "curves.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows if isinstance(r.get("step"), int)),
            encoding="utf-8",
        )
        CurveLogger(d).plot()

    return _from_file(draw, "curves.png") if rows else None


def eval_plots(report: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, str]:
    """The evaluation's plots by file name (``win_tie_loss.png``, ``safety.png``,
    ``reward_hist.png``), drawn by :func:`rlaif.evaluate.policy_eval.write_plots`."""
    from rlaif.evaluate.policy_eval import MODELS, write_plots

    metrics = copy.deepcopy(report["metrics"])
    if "win_rate" not in metrics or not all(isinstance(metrics.get(m), dict) for m in MODELS):
        return {}
    for role in MODELS:  # histogram input: eval.json keeps only the summaries
        metrics[role]["reward_scores"] = [
            r["reward"][role]
            for r in rows
            if isinstance(r.get("reward"), dict) and isinstance(r["reward"].get(role), (int, float))
        ]
    tmp = Path(tempfile.mkdtemp(prefix="rlaif-report-"))
    try:
        return {p.name: png_uri(p.read_bytes()) for p in write_plots(metrics, tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
