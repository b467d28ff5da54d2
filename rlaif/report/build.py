"""Build the HTML report of one run directory: :func:`build_report` and :func:`write_report`.

The page is one self-contained file (inline CSS, plots as embedded PNGs, no scripts, no
external resources) with these sections, each shown with its data or marked "not run":
run summary, counts and filter reasons, principle usage, judge statistics, margins, reward
distributions, training curves, evaluation results, and example records.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from markupsafe import Markup

from rlaif.errors import DataError, StoreError
from rlaif.report import collect, data_sections, figures, model_sections, stats
from rlaif.report import html as H
from rlaif.report.steps_report import build_steps_body
from rlaif.store.atomic import write_atomic
from rlaif.version import __version__

REPORT_NAME = "report.html"
SECTIONS = (
    ("summary", "Run summary"),
    ("counts", "Counts and filter reasons"),
    ("principles", "Principle usage"),
    ("judge", "Judge statistics"),
    ("contrast", "Contrast pairs (RLCD)"),
    ("margins", "Margins"),
    ("rewards", "Reward distributions"),
    ("training", "Training curves"),
    ("eval", "Evaluation"),
    ("examples", "Examples"),
)
ONLY_WHEN_RUN = {"contrast"}  # sections of one kind of run: left out of the others' reports


def _when(stamp: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(stamp))
    except ValueError:
        return None


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def wall_time(manifest: dict[str, Any]) -> str:
    """From the first start to the last finish (resumes included), or why there is none."""
    start, end = _when(manifest.get("started_at")), _when(manifest.get("finished_at"))
    if start is None:
        return "-"
    if end is None:
        return "not finished (still running, interrupted or crashed)"
    return _duration((end - start).total_seconds())


def _model(name: Any, revision: Any) -> str:
    return f"{name} @ {revision}" if revision else str(name or "-")


def summary(manifest: dict[str, Any] | None, run_dir: Path) -> tuple[Markup, bool]:
    """Pipeline, models, constitution, seed, times, versions, prompts and model calls."""
    if not manifest:
        return H.not_run("no manifest.json (the directory holds no pipeline run)"), False
    info = manifest.get("info") or {}
    prov = info.get("provenance") or {}
    const = prov.get("constitution") or {}
    prompts = info.get("prompts") or {}
    judges = prov.get("judge_models") or (
        [{"model": prov["judge_model"], "revision": prov.get("judge_revision")}]
        if prov.get("judge_model")
        else []
    )
    dropped = prompts.get("dropped") or {}
    pairs = [
        ("pipeline", info.get("pipeline")),
        ("run directory", str(run_dir.resolve())),
        (
            "model",
            f"{_model(prov.get('model'), prov.get('model_revision'))} "
            f"(backend {prov.get('backend', '-')})",
        ),
        (
            "judge model",
            ", ".join(_model(j.get("model"), j.get("revision")) for j in judges) or "-",
        ),
        ("judge mode", (prov.get("judge") or {}).get("mode")),
        ("constitution", f"{const.get('name', '-')} v{const.get('version', '-')}"),
        ("constitution hash", H.code(const.get("hash", "-"))),
        ("seed", prov.get("seed")),
        ("started", manifest.get("started_at")),
        ("finished", manifest.get("finished_at")),
        ("wall time", wall_time(manifest)),
        ("rlaif version (run)", prov.get("rlaif_version")),
        (
            "prompts",
            f"{prompts.get('read', '-')} read, {prompts.get('kept', '-')} kept"
            + (f", dropped: {dropped}" if dropped else ""),
        ),
    ]
    parts = [H.kv(pairs)]
    calls = info.get("calls") or {}
    if calls:
        keys = sorted({k for c in calls.values() for k in c})
        parts.append(H.h3("Model calls"))
        # The manifest keeps the counts of the latest invocation: after a resume that found
        # everything done they are zeros, which says the re-run cost nothing.
        parts.append(H.p("in the latest invocation of the run (a resume counts only its own)"))
        parts.append(
            H.table(["caller", *keys], [[n, *[c.get(k) for k in keys]] for n, c in calls.items()])
        )
    problems = manifest.get("problems") or []
    if problems:
        parts.append(H.h3("Problems"))
        parts += [H.p(x, "warn") for x in problems]
    return Markup("").join(parts), True


def build_report(run_dir: str | Path) -> str:
    """The report of ``run_dir`` as one HTML document (a string).

    Raises:
        DataError: ``run_dir`` is not a directory, holds no run, or a file in it is broken
            (the message names the file and line). StoreError: a stage shard is corrupt.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError("not a directory", file=str(run))
    if (run / "steps.json").is_file():  # a pipeline of steps: one section per kind of step
        steps_json = collect.read_json(run / "steps.json")
        name = steps_json.get("pipeline") if isinstance(steps_json, dict) else None
        made = datetime.now(timezone.utc).isoformat(timespec="seconds")
        subtitle = f"{run} · made {made} by rlaif {__version__}"
        return H.page(f"rlaif report: {name or run.name}", subtitle, build_steps_body(run))
    manifest = collect.load_manifest(run)
    names = collect.stage_names(run)
    steps = collect.train_steps(run)
    ev = collect.eval_data(run)
    if manifest is None and not steps and ev is None:
        raise DataError(
            "not a run directory: no manifest.json, stages/, train/ or eval/eval.json",
            file=str(run),
        )
    rows, rows_from = collect.preference_rows(run)
    uses = stats.principle_usage(run, names)
    plots = figures.eval_plots(ev.report, ev.rows) if ev else {}  # drawn once, shown twice
    bodies = {
        "summary": summary(manifest, run),
        "counts": data_sections.counts(manifest),
        "principles": data_sections.principles(uses, stats.principle_texts(manifest)),
        "judge": data_sections.judge(stats.all_judge_stats(run, names, manifest)),
        "contrast": data_sections.contrast(manifest, run),
        "margins": data_sections.margins(manifest, rows, rows_from, run),
        "rewards": model_sections.rewards(ev, steps, plots),
        "training": model_sections.training(steps),
        "eval": model_sections.evaluation(ev, plots),
        "examples": data_sections.examples(run, names, rows),
    }
    info = (manifest or {}).get("info") or {}
    title = f"rlaif report: {info.get('pipeline') or run.name}"
    made = datetime.now(timezone.utc).isoformat(timespec="seconds")
    subtitle = f"{run} · made {made} by rlaif {__version__}"
    shown = [(sid, name) for sid, name in SECTIONS if sid not in ONLY_WHEN_RUN or bodies[sid][1]]
    return H.page(title, subtitle, [(sid, name, *bodies[sid]) for sid, name in shown])


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write :func:`build_report` to ``out`` (default ``RUN_DIR/report.html``) atomically.

    Raises:
        DataError, StoreError: as :func:`build_report`; StoreError when ``out`` cannot be
        written.
    """
    text = build_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise StoreError(
            f"cannot write the report: {exc.strerror or exc}", file=str(path)
        ) from None
    return path
