"""The report of a ``steps:`` pipeline run: its steps, each evaluation metric by round, the
training curves of every training step and the last evaluation.

A data step's folder is a run directory of its own: ``rlaif report RUN_DIR/steps/<step>``
gives its full data report (counts, principles, judge statistics, margins, examples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup

from rlaif.errors import DataError
from rlaif.report import collect, figures, model_sections
from rlaif.report import html as H

SECTIONS = (
    ("steps", "Steps"),
    ("rounds", "By round"),
    ("evals", "Evaluations side by side"),
    ("training", "Training curves"),
    ("eval", "Evaluation (last)"),
)


def _steps(summary: dict[str, Any], run: Path) -> tuple[Markup, bool]:
    rows = []
    for s in summary.get("steps") or []:
        numbers = "; ".join(
            f"{k} {H.num(v)}" for k, v in (s.get("numbers") or {}).items() if v is not None
        )
        rows.append([s.get("name"), s.get("trainer") or s.get("kind"), s.get("status"),
                     s.get("model"), H.num(s.get("seconds"), 1), numbers])  # fmt: skip
    left = [n for n in summary.get("planned") or [] if n not in {r[0] for r in rows}]
    parts = [H.table(["step", "kind", "status", "model", "seconds", "numbers"], rows)]
    if left:
        parts.append(H.p(f"not run yet: {', '.join(left)}"))
    parts.append(H.p(f"data steps: rlaif report {run}/steps/<step> for their data report"))
    return Markup("").join(parts), bool(rows)


def _metric_rows(by_role: dict[str, Any], role: str) -> list[list[Any]]:
    """One row per metric: its values (rates with intervals, or numbers) in order."""
    return [[m, *(H.rate(v) if isinstance(v, dict) else H.num(v) for v in values)]
            for m, values in (by_role.get(role) or {}).items()]  # fmt: skip


def _figure(run: Path, name: str, alt: str) -> list[Markup]:
    path = run / name
    return [H.img(figures.png_uri(path.read_bytes()), alt)] if path.is_file() else []


def _rounds(run: Path) -> tuple[Markup, bool]:
    path = run / "rounds.json"
    if not path.is_file():
        return H.not_run("no rounds.json (no block of rounds with an evaluation)"), False
    rounds = collect.read_json(path)
    if not isinstance(rounds, dict):
        raise DataError("expected a JSON object", file=str(path))
    parts = _figure(run, "rounds.png", "metrics by round")
    for block, b in rounds.items():
        for role in ("policy", "baseline"):
            rows = _metric_rows(b, role)
            if rows:
                heads = ["metric", *(f"round {k}" for k in b.get("rounds") or [])]
                parts.append(H.h3(f"{block}: {role}"))
                parts.append(H.table(heads, rows))
    return Markup("").join(parts), True


def _evals(run: Path) -> tuple[Markup, bool]:
    path = run / "evals.json"
    if not path.is_file():
        return H.not_run("no evals.json (fewer than two evaluations)"), False
    table = collect.read_json(path)
    if not isinstance(table, dict):
        raise DataError("expected a JSON object", file=str(path))
    parts = _figure(run, "evals.png", "evaluations")
    names = table.get("evals") or []
    for role in ("policy", "baseline"):
        rows = _metric_rows(table, role)
        if rows:
            parts.append(H.h3(f"{role} of each evaluation"))
            parts.append(H.table(["metric", *names], rows))
    return Markup("").join(parts), True


def build_steps_body(run: Path) -> list[tuple[str, str, Markup, bool]]:
    """The sections of a ``steps:`` run's report, for :func:`rlaif.report.html.page`."""
    summary = collect.read_json(run / "steps.json")
    if not isinstance(summary, dict):
        raise DataError("expected a JSON object", file=str(run / "steps.json"))
    done = summary.get("steps") or []
    trained = [(s["name"], Path(s["dir"])) for s in done if s.get("kind") == "train"]
    evals = [Path(s["dir"]) for s in done if s.get("kind") == "eval"]
    ev = collect.eval_data(run, evals[-1]) if evals else None
    plots = figures.eval_plots(ev.report, ev.rows) if ev else {}
    bodies = {
        "steps": _steps(summary, run),
        "rounds": _rounds(run),
        "evals": _evals(run),
        "training": model_sections.training(collect.train_folders(trained)),
        "eval": model_sections.evaluation(ev, plots),
    }
    return [(sid, name, *bodies[sid]) for sid, name in SECTIONS]
