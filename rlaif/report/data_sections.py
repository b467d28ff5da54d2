"""Report sections about the data a run made: counts, principles, judge, margins, examples.

Each function returns ``(body, has_data)``; a section without data says "not run" and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from markupsafe import Markup

from rlaif.export.filters import FILTER_REASONS, SKIPPED
from rlaif.report import figures
from rlaif.report import html as H
from rlaif.report.collect import TRACE_STAGE, iter_stage
from rlaif.report.stats import LABEL_FREE, JudgeStats, PrincipleUse

Body = tuple[Markup, bool]
N_EXAMPLES = 3
_QUANTILES = ("count", "min", "p25", "median", "mean", "p75", "max")


def _join(parts: list[Markup]) -> Markup:
    return Markup("").join(parts)


def _reason_meaning(reason: str) -> str:
    if reason in FILTER_REASONS:
        return FILTER_REASONS[reason]
    if reason.startswith(SKIPPED):
        return FILTER_REASONS[SKIPPED]
    return ""


def _missing(manifest: dict[str, Any], stage: str) -> str:
    """Why an export is absent: the pipeline has no such stage, or the run did not get there."""
    configured = (((manifest.get("info") or {}).get("config") or {}).get("stages") or {}).get(stage)
    if configured:
        return f"not exported yet: the run has a {stage} stage but did not finish it"
    return f"the pipeline has no {stage} stage"


def counts(manifest: dict[str, Any] | None) -> Body:
    """Records per stage and status, their reasons, and the exports' counts and filters."""
    if not manifest:
        return H.not_run("no manifest.json and no stage records"), False
    stages = manifest.get("stages") or {}
    parts = [H.h3("Records per stage")]
    if stages:
        parts.append(
            H.table(
                ["stage", "ok", "error", "skipped", "total", "expected", "unaccounted"],
                [
                    [
                        name,
                        s.get("ok"),
                        s.get("error"),
                        s.get("skipped"),
                        s.get("total"),
                        s.get("expected"),
                        s.get("unaccounted"),
                    ]
                    for name, s in stages.items()
                ],
            )
        )
        reasons = [
            [name, status, reason, r.get("count"), ", ".join(r.get("examples") or [])]
            for name, s in stages.items()
            for status, by_reason in (s.get("reasons") or {}).items()
            for reason, r in by_reason.items()
        ]
        parts.append(H.h3("Errors and skips by reason"))
        parts.append(
            H.table(["stage", "status", "reason", "count", "example ids"], reasons)
            if reasons
            else H.p("No record failed or was skipped.", "note")
        )
    else:
        parts.append(H.not_run("no stage has records yet"))
    export = (manifest.get("info") or {}).get("export") or {}
    parts.append(H.h3("SL-CAI export (SFT rows and revision pairs)"))
    if "sft_rows" in export:
        parts.append(
            H.kv(
                [
                    ("SFT rows", H.num(export["sft_rows"])),
                    ("revision pairs", H.num(export.get("pair_rows"))),
                ]
            )
        )
        filtered = export.get("filtered") or {}
        parts.append(
            H.table(["filtered: reason", "rows"], sorted(filtered.items()))
            if filtered
            else H.p("No trace was filtered.", "note")
        )
    else:
        parts.append(H.not_run(_missing(manifest, "critique_revise")))
    prefs = export.get("preferences")
    parts.append(H.h3("Preference export (RL-CAI)"))
    if prefs:
        splits = prefs.get("splits") or {}
        parts.append(
            H.kv(
                [
                    ("pair records in", H.num(prefs.get("inputs"))),
                    ("rows kept", H.num(prefs.get("kept"))),
                    ("filtered", H.num(sum((prefs.get("filtered") or {}).values()))),
                    *[
                        (f"{s} split", f"{v.get('rows')} rows, {v.get('prompts')} prompts")
                        for s, v in splits.items()
                    ],
                    (
                        "rows by source",
                        ", ".join(f"{k}: {v}" for k, v in (prefs.get("sources") or {}).items())
                        or "-",
                    ),
                    (
                        "export filters",
                        ", ".join(f"{k}={v}" for k, v in (prefs.get("config") or {}).items()),
                    ),
                ]
            )
        )
        rows = [[k, n, _reason_meaning(k)] for k, n in (prefs.get("filtered") or {}).items()]
        parts.append(
            H.table(["filter reason", "pairs", "meaning"], rows)
            if rows
            else H.p("No pair was filtered.", "note")
        )
    else:
        parts.append(H.not_run(_missing(manifest, "judge")))
    return _join(parts), True


def principles(uses: list[PrincipleUse], texts: dict[str, tuple[str, str]]) -> Body:
    """Critiques per principle (and round) and judge verdicts per principle."""
    if not uses:
        return H.not_run("no critique or judge records name a principle"), False
    rounds = sorted({r for u in uses for r in u.critiques})
    head = [
        "principle",
        "title",
        "critiques",
        *[f"round {r}" for r in rounds],
        "critique errors",
        "judge verdicts",
        "ok",
        "ties",
        "judge errors",
    ]
    rows = [
        [
            u.id,
            texts.get(u.id, ("", ""))[0],
            u.total_critiques,
            *[u.critiques.get(r, 0) for r in rounds],
            u.critique_errors,
            u.judged,
            u.judge_ok,
            u.judge_ties,
            u.judge_errors,
        ]
        for u in uses
    ]
    parts = [H.table(head, rows), H.img(figures.principle_usage(uses), "principle usage")]
    if texts:
        used = [u.id for u in uses if u.id in texts]
        parts.append(H.h3("Principle text (critique request, or the judge's question)"))
        parts.append(H.table(["principle", "text"], [[pid, texts[pid][1]] for pid in used]))
    else:
        parts.append(
            H.p(
                "Principle text not shown: the constitution file of the run could "
                "not be loaded, or it changed since (its hash differs).",
                "note",
            )
        )
    return _join(parts), True


def _metric_row(name: str, m: dict[str, Any]) -> list[Any]:
    lb = m["length_bias"]
    return [
        name,
        m["n"],
        m["n_ok"],
        H.rate(m["error_rate"], ci=False),
        H.rate(m["tie_rate"]),
        H.rate(m["position_consistency"]),
        H.rate(m["first_position_rate"]),
        H.rate(lb["judge_prefers_longer"]),
        H.rate(lb["judge_leans_longer"]),
        m["mean_confidence"],
    ]


def _calibration(cal: dict[str, Any]) -> Markup:
    """A calibrated judge's option prior and the label-free rates raw vs calibrated."""
    names = {"first_position_rate": "first position", "position_consistency":
             "position consistent", "tie_rate": "ties"}  # fmt: skip
    rows = [[names.get(k, k), H.rate(r["raw"]), H.rate(r["calibrated"])]
            for k, r in cal["rates"].items()]  # fmt: skip
    note = H.p(
        f"Calibrated judge: option prior {cal['prior'].describe()}. The judge's log-odds b for "
        "the option shown first is removed from each order before the tie rule; 'raw' judges "
        "the same scores again without removing it (pairs, the verdict the export used).",
        "note",
    )
    return _join([note, H.table(["rate", "raw", "calibrated"], rows)])


def judge(stats: list[JudgeStats]) -> Body:
    """Position consistency, ties, errors and length bias of every judge stage."""
    if not stats:
        return H.not_run("the pipeline has no judge stage"), False
    head = [
        "verdicts",
        "n",
        "ok",
        "errors",
        "ties",
        "position consistent",
        "first position",
        "winner is longer",
        "leans longer",
        "mean |p - 0.5|",
    ]
    parts = [
        H.p(
            "Every pair (x, y) is judged in both orders (for a CAI-SL pair x is the revision and "
            "y the initial response). The numbers below need no human label; rates carry "
            "Wilson 95 % intervals and (k/n). 0.5 is the unbiased value of "
            "'first position', 'winner is longer' and 'leans longer'.",
            "note",
        )
    ]
    for s in stats:
        m = s.metrics
        parts.append(H.h3(f"Stage '{s.stage}'"))
        parts.append(
            H.kv(
                [
                    ("judge model(s)", ", ".join(s.models) or "-"),
                    ("mode", s.mode or "-"),
                    ("judged pairs", H.num(s.records)),
                ]
            )
        )
        if s.calibration:
            parts.append(_calibration(s.calibration))
        rows = [_metric_row("pairs (the verdict the export used)", m["ensemble"])]
        rows += [_metric_row(f"pairs from {src}", sm) for src, sm in s.by_source.items()]
        rows.append(_metric_row("single-principle judgements", m["overall"]))
        rows += [_metric_row(f"principle {pid}", pm) for pid, pm in m["per_principle"].items()]
        parts.append(H.table(head, rows))
        if s.reasons:
            parts.append(
                H.table(["ties and errors (pairs), by kind", "pairs"], s.reasons.most_common())
            )
        title = f"{', '.join(s.models) or s.stage} ({s.mode})"
        parts.append(H.img(figures.judge_probabilities(s.judgements, title), "P(x better)"))
        parts.append(H.img(figures.position_bias(m, title), "position bias"))
    parts.append(H.h3("Definitions"))
    parts.append(H.kv(sorted(LABEL_FREE.items())))
    return _join(parts), True


def margins(
    manifest: dict[str, Any] | None, rows: list[dict[str, Any]], source: str | None, run_dir: Path
) -> Body:
    """Quantiles of margin and p_chosen of the kept rows, their lengths, and histograms."""
    prefs = (((manifest or {}).get("info") or {}).get("export") or {}).get("preferences")
    if not prefs and not rows:
        return H.not_run("no preference export"), False
    parts = []
    if prefs:
        parts.append(
            H.table(
                ["", *_QUANTILES],
                [
                    [k, *[(prefs.get(k) or {}).get(q) for q in _QUANTILES]]
                    for k in ("margin", "p_chosen")
                ],
            )
        )
        length = prefs.get("length") or {}
        parts.append(H.kv([(k.replace("_", " "), H.num(v)) for k, v in length.items()]))
    uri = figures.margins(rows)
    if uri is None and (run_dir / "export/preferences/margins.png").is_file():
        uri = figures.png_uri((run_dir / "export/preferences/margins.png").read_bytes())
        source = "export/preferences/margins.png"
    if uri:
        parts.append(H.img(uri, "margin and p_chosen histograms"))
        parts.append(
            H.p(
                Markup("Histograms of {} kept rows, read from {}.").format(
                    len(rows), H.code(source or "-")
                ),
                "note",
            )
        )
    else:
        parts.append(H.p("No kept rows to plot.", "note"))
    return _join(parts), True


def contrast(manifest: dict[str, Any] | None, run_dir: Path) -> Body:
    """RLCD: how far the positive and negative responses differ, overall and per principle."""
    c = ((manifest or {}).get("info") or {}).get("contrast")
    if not c:
        return H.not_run("no contrast stage (stages.contrast)"), False
    measures = [m for m in ("refusal_rate", "mean_words", "check_pass_rate")
                if (c.get("positive") or {}).get(m) is not None]  # fmt: skip

    def row(name: str, b: dict[str, Any]) -> list[Any]:
        sides = [H.num((b.get(s) or {}).get(m)) for m in measures for s in ("positive", "negative")]
        return [name, b.get("pairs"), b.get("kept"), b.get("identical"), *sides]

    heads = [f"{m.replace('_', ' ')} {s[:3]}" for m in measures for s in ("positive", "negative")]
    groups = [("all", c), *sorted((c.get("by_principle") or {}).items())]
    parts = [
        H.kv([("placement", c.get("placement")), ("generation failed", c.get("failed"))]),
        H.table(["principle", "pairs", "kept", "identical", *heads],
                [row(n, b) for n, b in groups]),
    ]  # fmt: skip
    j = c.get("judge")
    if j:
        parts.append(H.p(f"Filter judge: prefers the positive response in {j['prefers_positive']}"
                         f" of {j['pairs']} pairs, the negative in {j['prefers_negative']}; mean "
                         f"P(positive better) {H.num(j['mean_p_positive'])}."))  # fmt: skip
    png = run_dir / "export" / "preferences" / "contrast.png"
    if png.is_file():
        parts.append(H.img(figures.png_uri(png.read_bytes()), "positive vs negative responses"))
    return _join(parts), True


def examples(run_dir: Path, stages: list[str], rows: list[dict[str, Any]]) -> Body:
    """A few kept preference rows and critique-and-revise traces, as text."""
    parts = []
    if rows:
        parts.append(H.h3(f"Preference rows (first {min(N_EXAMPLES, len(rows))} of {len(rows)})"))
        for r in rows[:N_EXAMPLES]:
            info = H.kv(
                [
                    ("source", r.get("source")),
                    ("margin", H.num(r.get("margin"))),
                    ("p_chosen", H.num(r.get("p_chosen"))),
                ]
            )
            inner = [info, H.label("prompt"), H.conversation(r.get("prompt"))]
            inner += [H.label("chosen"), H.conversation(r.get("chosen"))]
            inner += [H.label("rejected"), H.conversation(r.get("rejected"))]
            parts.append(Markup('<div class="example">{}</div>').format(_join(inner)))
    traces = []
    if TRACE_STAGE in stages:
        for t in iter_stage(run_dir, TRACE_STAGE):
            if t.get("status") == "ok":
                traces.append(t)
                if len(traces) == N_EXAMPLES:
                    break
    if traces:
        parts.append(H.h3(f"Critique-and-revise traces (first {len(traces)})"))
        for t in traces:
            inner = [
                H.label("prompt"),
                H.conversation(t.get("prompt")),
                H.label("initial response"),
                H.text_block(t.get("initial_response")),
            ]
            for rd in t.get("rounds") or []:
                inner += [
                    H.label(f"round {rd.get('round')}: critique under {rd.get('principle_id')}"),
                    H.text_block(rd.get("critique")),
                    H.label("revision"),
                    H.text_block(rd.get("revision")),
                ]
            parts.append(Markup('<div class="example">{}</div>').format(_join(inner)))
    if not parts:
        return H.not_run("no exported preference rows and no critique traces"), False
    return _join(parts), True
