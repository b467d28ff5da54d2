"""Statistics the report computes from stage records: principle usage and judge behaviour.

Judge statistics reuse the judge audit (:mod:`rlaif.evaluate.audit`): each judged pair becomes
a :class:`~rlaif.evaluate.audit.Judgement` with the pair's first response ``x`` in the place
the audit gives the human-preferred one. With no human label, only the metrics that do not
depend on which response is called "human" are meaningful, and those are the ones reported
(:data:`LABEL_FREE`): position consistency, first-position rate, ties, errors, length bias
(the winner is the longer response) and confidence. A calibrated judge's stage (the manifest's
``judge_calibration``) also gets its option prior and the label-free rates raw (judged again
from the stored scores with no prior) next to calibrated (as the run used them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.errors import DataError, RlaifError
from rlaif.evaluate.audit import DEFINITIONS, AuditRun, Judgement, audit_metrics, from_verdict
from rlaif.evaluate.audit import summarize as summarize_judgements
from rlaif.evaluate.calibration_audit import verdict_rates
from rlaif.report.collect import critique_stages, iter_stage, judge_stages
from rlaif.stages.calibrate import OptionPrior
from rlaif.stages.judge import JudgeConfig, Verdict

# Audit metrics that mean the same whichever response of a pair is called "human".
LABEL_FREE = {
    "position_consistency": DEFINITIONS["position_consistency"],
    "first_position_rate": DEFINITIONS["first_position_rate"],
    "tie_rate": DEFINITIONS["tie_rate"],
    "error_rate": DEFINITIONS["error_rate"],
    "length_bias.judge_prefers_longer": "decided verdicts whose winner is the longer response "
    "(characters), over decided verdicts with responses of different lengths (0.5 = no bias)",
    "length_bias.judge_leans_longer": "verdicts (ties included) whose p leans to the longer "
    "response, over verdicts that lean either way with responses of different lengths",
    "mean_confidence": "mean |p - 0.5| over ok verdicts",
}


@dataclass
class PrincipleUse:
    """How often one principle was used: critiques per round, and judge verdicts."""

    id: str
    critiques: Counter[int] = field(default_factory=Counter)  # round -> critique requests
    critique_errors: int = 0
    judged: int = 0
    judge_ok: int = 0
    judge_ties: int = 0
    judge_errors: int = 0

    @property
    def total_critiques(self) -> int:
        return sum(self.critiques.values())


@dataclass
class JudgeStats:
    """One judge stage: audit metrics over its verdicts and the data behind its plots."""

    stage: str
    models: list[str]
    mode: str | None
    records: int
    metrics: dict[str, Any]  # audit_metrics(): overall (per principle), ensemble, per_principle
    by_source: dict[str, dict[str, Any]]  # summarize() per pair source (cai_sl, samples)
    judgements: list[Judgement]  # one per judged pair (the record's verdict)
    reasons: Counter[str]  # tie and error reasons, first words only
    # a calibrated judge: {"prior": OptionPrior, "rates": {metric: {"raw", "calibrated"}}}
    calibration: dict[str, Any] | None = None


def _leaves(v: Verdict) -> list[Verdict]:
    """The single-principle verdicts behind a verdict (itself when it has no members)."""
    if not v.members:
        return [v]
    return [leaf for m in v.members for leaf in _leaves(m)]


def _verdict(rec: dict[str, Any], stage: str) -> Verdict:
    try:
        return Verdict.from_dict(rec["verdict"])
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"judge record {rec.get('id')!r} has no readable verdict: {exc}",
            file=f"stages/{stage}",
            field="verdict",
        ) from None


def _reason_kind(reason: str | None) -> str:
    """A reason without its numbers, so reasons of one kind count together."""
    if not reason:
        return "(none)"
    head = reason.split(":")[0].split("(")[0].strip()
    return head or reason[:60]


def principle_usage(run_dir: Path, stages: list[str]) -> list[PrincipleUse]:
    """Critique requests per principle and round (``critique-N`` stages, every status) and
    single-principle judge verdicts per principle (every ``judge*`` stage), most used first."""
    uses: dict[str, PrincipleUse] = {}

    def use(pid: str) -> PrincipleUse:
        return uses.setdefault(pid, PrincipleUse(pid))

    for round_, stage in critique_stages(stages):
        for rec in iter_stage(run_dir, stage):
            pid = rec.get("principle_id")
            if not isinstance(pid, str):
                continue  # a record written before principle tags existed
            u = use(pid)
            u.critiques[round_] += 1
            u.critique_errors += rec.get("status") == "error"
    for stage in judge_stages(stages):
        for rec in iter_stage(run_dir, stage):
            for leaf in _leaves(_verdict(rec, stage)):
                for pid in leaf.principle_ids or ["(none)"]:
                    u = use(pid)
                    u.judged += 1
                    u.judge_ok += leaf.status == "ok"
                    u.judge_ties += leaf.status == "ok" and leaf.winner == "tie"
                    u.judge_errors += leaf.status != "ok"
    return sorted(uses.values(), key=lambda u: (-(u.total_critiques + u.judged), u.id))


_TIE_RULE = (
    "mode",
    "tie_threshold",
    "flip_margin",
    "tie_margin",
    "band",
    "options",
    "min_option_mass",
)


def _calibration(
    manifest: dict[str, Any] | None, stage: str
) -> tuple[OptionPrior, JudgeConfig] | None:
    """The option prior of a judge stage and the run's judge settings, from the manifest."""
    cal = ((manifest or {}).get("info") or {}).get("judge_calibration") or {}
    entry = next((j for j in cal.get("judges") or [] if j.get("stage") == stage), None)
    if entry is None or not isinstance(cal.get("config"), dict):
        return None
    c = cal["config"]
    try:
        cfg = JudgeConfig(**{k: c[k] for k in _TIE_RULE if k in c})
        return OptionPrior.from_dict(entry["prior"]), cfg
    except (KeyError, TypeError, RlaifError):
        return None  # a manifest from another version: no calibration shown


def judge_stats(run_dir: Path, stage: str, manifest: dict[str, Any] | None = None) -> JudgeStats:
    """Audit metrics of one judge stage's verdicts (see the module docstring)."""
    pairs: list[Judgement] = []
    leaves: list[Judgement] = []
    by_source: dict[str, list[Judgement]] = {}
    reasons: Counter[str] = Counter()
    models: dict[str, None] = {}
    modes: Counter[str] = Counter()
    principle_ids: dict[str, None] = {}
    n = 0
    verdicts: list[Verdict] = []
    for rec in iter_stage(run_dir, stage):
        n += 1
        v = _verdict(rec, stage)
        verdicts.append(v)
        x, y = str(rec.get("x", "")), str(rec.get("y", ""))
        rid, source = str(rec.get("id")), str(rec.get("source", "?"))
        models.update(dict.fromkeys(v.models))
        modes[v.mode] += 1
        j = from_verdict(v, rid, source, "pair", "ensemble", x, y)
        pairs.append(j)
        by_source.setdefault(source, []).append(j)
        if v.status != "ok" or v.winner == "tie":
            reasons[f"{v.status if v.status != 'ok' else 'tie'}: {_reason_kind(v.reason)}"] += 1
        for leaf in _leaves(v):
            pid = leaf.principle_ids[0] if len(leaf.principle_ids) == 1 else "(none)"
            principle_ids[pid] = None
            leaves.append(from_verdict(leaf, rid, source, "pair", pid, x, y))
    metrics = audit_metrics(AuditRun(leaves, pairs, [], sorted(principle_ids)))
    found = _calibration(manifest, stage)
    calibration = None
    if found is not None:
        calibration = {"prior": found[0], "rates": verdict_rates(verdicts, found[1])}
    return JudgeStats(
        stage,
        list(models),
        modes.most_common(1)[0][0] if modes else None,
        n,
        metrics,
        {s: summarize_judgements(js) for s, js in sorted(by_source.items())},
        pairs,
        reasons,
        calibration,
    )


def all_judge_stats(
    run_dir: Path, stages: list[str], manifest: dict[str, Any] | None = None
) -> list[JudgeStats]:
    """:func:`judge_stats` of every judge stage (``judge``, ``judge-2``, ...)."""
    return [judge_stats(run_dir, s, manifest) for s in judge_stages(stages)]


def principle_texts(manifest: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """Principle id -> (title, critique or judge text), from the run's constitution when it
    can still be loaded and its content hash is the one the run recorded (a changed file would
    show the wrong text)."""
    if not manifest:
        return {}
    info = manifest.get("info") or {}
    ref = (info.get("config") or {}).get("constitution")
    recorded = ((info.get("provenance") or {}).get("constitution") or {}).get("hash")
    if not isinstance(ref, str) or not recorded:
        return {}
    from rlaif.constitution import load_constitution
    from rlaif.errors import RlaifError

    try:
        c = load_constitution(ref)
    except RlaifError:
        return {}  # moved or edited since the run: ids only
    if c.content_hash != recorded:
        return {}
    return {p.id: (p.title, p.critique or p.judge or "") for p in c.principles}
