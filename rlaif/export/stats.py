"""The statistics of a preference export and its margins plot, gathered as rows stream past.

:class:`RowTally` keeps, per kept row, its margin and p_chosen (two floats, 16 bytes: the
quartiles and the histograms need every value) and otherwise only sums and counts.
:func:`summarize` turns it and the selection's counts into the JSON-ready statistics the
manifest and the card (:mod:`rlaif.export.card`) show.
"""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlaif.export.filters import FILTER_REASONS, SPLITS, PreferenceExportConfig, Selection


class RowTally:
    """What :func:`summarize` needs of the kept rows, added one row at a time."""

    def __init__(self) -> None:
        self.margins, self.p_chosen = array("d"), array("d")
        self.by_split = dict.fromkeys(SPLITS, 0)
        self.chosen_chars = self.rejected_chars = 0
        self.unequal = self.longer_chosen = 0  # pairs of unequal lengths; the longer chosen
        self.sources: Counter[str] = Counter()

    def add(self, row: Mapping[str, Any], split: str) -> None:
        """Count one kept row (conversational form) of ``split``."""
        self.margins.append(row["margin"])
        self.p_chosen.append(row["p_chosen"])
        self.by_split[split] += 1
        c, r = len(row["chosen"][0]["content"]), len(row["rejected"][0]["content"])
        self.chosen_chars += c
        self.rejected_chars += r
        self.unequal += c != r
        self.longer_chosen += c > r
        self.sources[row["source"]] += 1

    @property
    def rows(self) -> int:
        return len(self.margins)


def _summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """Count, min, quartiles, mean and max (rounded); None values when there are none."""
    if not len(values):
        return {k: None for k in ("min", "p25", "median", "mean", "p75", "max")} | {"count": 0}
    import numpy as np

    v = np.sort(np.asarray(values, dtype=np.float64))  # one copy: 8 bytes a value

    def q(f: float) -> float:  # linear interpolation, as numpy's default
        pos = f * (len(v) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(v) - 1)
        return float(v[lo]) + (float(v[hi]) - float(v[lo])) * (pos - lo)

    # sum() over the sorted values, one at a time: the same rounding as a sorted list's sum
    out = {
        "min": float(v[0]),
        "p25": q(0.25),
        "median": q(0.5),
        "mean": sum(memoryview(v)) / len(v),
    }
    out |= {"p75": q(0.75), "max": float(v[-1])}
    return {k: round(x, 6) for k, x in out.items()} | {"count": len(v)}


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def summarize(
    sel: Selection,
    tally: RowTally,
    prompts: Mapping[str, int],
    cfg: PreferenceExportConfig,
) -> dict[str, Any]:
    """JSON-ready statistics of one export, for the manifest and the card.

    Args:
        sel: the counts of the filters (after the pass that wrote the rows, which fills the
            per-prompt cap's examples).
        tally: the kept rows' numbers.
        prompts: distinct prompts per split.
        cfg: the export's settings.
    """
    n = tally.rows
    # The fixed reasons in pipeline order, then the upstream skip reasons alphabetically.
    extra = sorted(k for k in sel.filtered if k not in FILTER_REASONS)
    reasons = [k for k in [*FILTER_REASONS, *extra] if sel.filtered[k]]
    jd = sel.judge
    return {
        "inputs": sel.inputs,
        "kept": n,
        "filtered": {k: sel.filtered[k] for k in reasons},
        "filtered_examples": {k: sel.examples[k] for k in reasons},
        "splits": {s: {"rows": tally.by_split[s], "prompts": prompts[s]} for s in SPLITS},
        "margin": _summary(tally.margins),
        "p_chosen": _summary(tally.p_chosen),
        "length": {
            "chosen_mean_chars": round(tally.chosen_chars / n, 2) if n else None,
            "rejected_mean_chars": round(tally.rejected_chars / n, 2) if n else None,
            "longer_chosen_rate": _rate(tally.longer_chosen, tally.unequal),
            "equal_length_pairs": n - tally.unequal,
        },
        "sources": dict(sorted(tally.sources.items())),
        "judge": {
            "verdicts": jd.verdicts,
            "errors": jd.errors,
            "tie_rate": _rate(jd.ties, jd.ok),
            "position_consistency": _rate(jd.consistent, jd.consistency_known),
            "first_position_rate": _rate(jd.first_position, jd.orders),
        },
        "config": {
            "min_confidence": cfg.min_confidence,
            "max_length_ratio": cfg.max_length_ratio,
            "max_pairs_per_prompt": cfg.max_pairs_per_prompt,
            "test_size": cfg.test_size,
            "seed": cfg.seed,
        },
    }


# -- plot ---------------------------------------------------------------------------------------


def plot_margins(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Histograms of rows' margins and p_chosen, as a PNG (Agg, no global backend)."""
    margins, p_chosen = array("d"), array("d")
    for r in rows:
        margins.append(r["margin"])
        p_chosen.append(r["p_chosen"])
    return plot_margin_values(margins, p_chosen, path)


def plot_margin_values(
    margins: Sequence[float], p_chosen: Sequence[float], path: str | Path
) -> Path:
    """:func:`plot_margins` of the two columns (e.g. a :class:`RowTally`'s arrays)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself; pyplot's global state is never touched
    panels = (
        (margins, "margin = logit(p_chosen)", None),
        (p_chosen, "p_chosen (judge's soft label)", (0.5, 1.0)),
    )
    for i, (values, title, span) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, i)
        if len(values):
            data = np.asarray(values, dtype=np.float64)
            ax.hist(data, bins=20, range=span, color="#4c72b0", edgecolor="white")
        else:
            ax.text(0.5, 0.5, "no rows", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return Path(path)
