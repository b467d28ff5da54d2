"""What an RLCD contrast export holds beside its rows: ``contrast.json`` (how far the positive
and negative responses differ, from :func:`rlaif.stages.contrast.contrast_stats`) and
``contrast.png`` (the same, side by side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlaif.store.atomic import write_atomic

PANELS = (
    ("refusal_rate", "refusal rate", (0.0, 1.0)),
    ("check_pass_rate", "rule check pass rate", (0.0, 1.0)),
    ("mean_words", "mean length (words)", None),
)


def write_contrast(stats: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write ``contrast.json`` and ``contrast.png`` into ``folder`` (the preference export)."""
    folder = Path(folder)
    out = [
        write_atomic(folder / "contrast.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    ]
    out.append(write_atomic(folder / "contrast.png", plot_contrast(stats)))
    return out


def plot_contrast(stats: dict[str, Any]) -> bytes:
    """Positive vs negative responses per measure, overall and per principle (PNG bytes)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in PANELS if stats.get("positive", {}).get(p[0]) is not None]
    groups = [("all", stats), *sorted((stats.get("by_principle") or {}).items())]
    fig = Figure(figsize=(max(4.0, 3.2 * len(panels)), 3.6), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself; pyplot's global state is never touched
    for k, (key, title, span) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, max(1, len(panels)), k)
        xs = range(len(groups))
        for shift, side, color in ((-0.2, "positive", "#4c72b0"), (0.2, "negative", "#c44e52")):
            ys = [(g.get(side) or {}).get(key) for _, g in groups]
            ax.bar([x + shift for x in xs], [y if y is not None else 0 for y in ys], 0.4,
                   color=color, label=side)  # fmt: skip
        ax.set_xticks(list(xs), [name for name, _ in groups], rotation=60, ha="right", fontsize=7)
        ax.set_title(title, fontsize=10)
        if span:
            ax.set_ylim(*span)
        if k == 1:
            ax.legend(fontsize=8)
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no pairs", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"contrast pairs: {stats.get('pairs', 0)} made, {stats.get('kept', 0)} kept",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
