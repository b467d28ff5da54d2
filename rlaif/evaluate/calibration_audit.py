"""A judge raw and calibrated, side by side: the audit's option prior and the rates it changes.

The audit (:func:`rlaif.evaluate.audit.run_audit`) judges every comparison in both orders
without calibration. :func:`estimate_prior` estimates the judge's prior for the option shown
first (:mod:`rlaif.stages.calibrate`): ``pride`` from those same scored orders (no model call),
``content_free`` from a few requests whose responses carry no content. :func:`calibrated_run`
judges every comparison again from the stored scores with the prior removed, and
:func:`calibration_report` puts the two side by side (:data:`SIDE_BY_SIDE`), each rate with
its Wilson 95 % interval. Multiple-choice items with two options (the CAI paper's
HarmfulVsEthical) are a pair in both orders and are calibrated like pairs (``pride`` only:
their prompts are the items' own); items with more options stay as they are, since their
prior is over all their labels, not two. :func:`verdict_rates` does the same for a
pipeline's verdicts, which carry the calibrated probabilities and keep the raw ones in their
orders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rlaif.calls.caller import ModelCaller
from rlaif.constitution import Constitution
from rlaif.errors import ConfigError
from rlaif.evaluate.audit import AuditRun, Judgement, audit_metrics, from_verdict, summarize
from rlaif.evaluate.pairs_io import AuditData
from rlaif.prompts import PromptBook
from rlaif.stages import calibrate as C
from rlaif.stages.judge import JudgeConfig, Verdict

# The rates the option prior moves, raw next to calibrated (audit.DEFINITIONS says what each is).
SIDE_BY_SIDE = (
    "first_position_rate",
    "position_consistency",
    "tie_rate",
    "agreement_decided",
    "agreement_ties_half",
)
LABEL_FREE = SIDE_BY_SIDE[:3]  # the ones that need no human label (a pipeline's own pairs)


def _judged(run: AuditRun) -> list[tuple[Judgement, Verdict]]:
    """The single-principle AI judgements of the audit's pairs and two-option items, with
    their verdicts."""
    if len(run.verdicts) != len(run.judgements):
        raise ValueError("this audit run keeps no verdicts: judge it with run_audit")
    return [
        (j, v)
        for j, v in zip(run.judgements, run.verdicts, strict=True)
        if v is not None and j.kind in ("pair", "mc") and C.verdict_log_odds(v) is not None
    ]


def estimate_prior(
    run: AuditRun,
    method: str,
    n: int,
    seed: int,
    *,
    data: AuditData | None = None,
    constitution: Constitution | None = None,
    caller: ModelCaller | None = None,
    cfg: JudgeConfig | None = None,
    book: PromptBook | None = None,
) -> C.OptionPrior:
    """The judge's option prior from ``n`` of the audit's pairs (drawn by ``seed``).

    ``pride`` uses the raw scores the audit already has (a pair judged under several
    principles contributes the mean of its log-odds per order). ``content_free`` asks
    ``caller`` up to ``n`` requests built from those pairs' conversations and principles with
    content-free responses (it needs ``data``, ``constitution`` and ``caller``).
    """
    per_pair: dict[str, list[tuple[float | None, float | None]]] = {}
    principle: dict[str, str] = {}
    for j, v in _judged(run):
        per_pair.setdefault(j.item_id, []).append(C.verdict_log_odds(v))  # type: ignore[arg-type]
        principle.setdefault(j.item_id, j.principle)
    ids = list(per_pair)
    chosen = [ids[i] for i in C.sample(ids, n, seed)]
    if method == "pride":
        return C.pride([C.pair_log_odds(per_pair[i]) for i in chosen])
    if method != "content_free":
        raise ValueError(f"no estimator {method!r}")
    if data is None or constitution is None or caller is None:
        raise ValueError("content_free calibration needs the audit data, constitution and caller")
    if not data.pairs:
        raise ConfigError(
            "content_free calibration needs pairs; for multiple-choice items use pride",
            field="calibrate",
        )
    cfg = cfg or JudgeConfig()
    conversations = {p.id: p.conversation for p in data.pairs}
    by_id = {p.id: p for p in constitution.principles}
    items = [(conversations[i], by_id[principle[i]]) for i in chosen if i in conversations]
    reqs = C.content_free_requests(book or PromptBook(), items, cfg, n)
    results = caller.score(reqs)
    return C.content_free(
        [C.order_log_odds(r.scores, cfg.options) if r.ok else None for r in results]
    )


def calibrated_run(run: AuditRun, cfg: JudgeConfig) -> AuditRun:
    """``run`` judged again from its stored scores under ``cfg`` (its ``option_prior``
    removed), with no model call; judgements of items with more than two options stay as
    they are."""
    _judged(run)  # the verdicts must be there

    def again(js: list[Judgement], vs: list[Verdict | None]) -> list[Judgement]:
        out = []
        for j, v in zip(js, vs, strict=True):
            if v is None:
                out.append(j)
                continue
            nj = from_verdict(C.rejudge(v, cfg), j.item_id, j.source, j.kind, j.principle, "", "")
            out.append(dataclasses.replace(nj, len_human=j.len_human, len_other=j.len_other))
        return out

    return dataclasses.replace(
        run,
        judgements=again(run.judgements, run.verdicts),
        ensembles=again(run.ensembles, run.ensemble_verdicts),
    )


def side_by_side(
    raw: dict[str, Any], calibrated: dict[str, Any], keys: Sequence[str] = SIDE_BY_SIDE
) -> dict[str, dict[str, Any]]:
    """``{metric: {"raw": rate, "calibrated": rate}}`` from two :func:`summarize` results."""
    return {k: {"raw": raw[k], "calibrated": calibrated[k]} for k in keys}


def calibration_report(
    prior: C.OptionPrior, cfg: JudgeConfig, raw: AuditRun, calibrated: AuditRun
) -> dict[str, Any]:
    """The ``calibration`` part of ``audit.json``: the prior, the calibrated judge's config
    and metrics, and the raw and calibrated rates side by side (overall and per comparison)."""
    raw_m, cal_m = audit_metrics(raw), audit_metrics(calibrated)
    return {
        "prior": prior.to_dict(),
        "line": prior.describe(),
        "config": cfg.to_dict(),
        "side_by_side": {g: side_by_side(raw_m[g], cal_m[g]) for g in ("overall", "ensemble")},
        "metrics": cal_m,
    }


def verdict_rates(verdicts: Sequence[Verdict], cfg: JudgeConfig) -> dict[str, dict[str, Any]]:
    """The label-free rates (:data:`LABEL_FREE`) of a pipeline's verdicts, raw (judged again
    from their stored scores with no option prior, under ``cfg``'s tie rule) and as they are
    (calibrated): ``{metric: {"raw": rate, "calibrated": rate}}``."""
    base = C.calibrated_config(cfg, None)

    def judgements(vs: Sequence[Verdict]) -> list[Judgement]:
        return [from_verdict(v, str(i), "", "pair", "pair", "", "") for i, v in enumerate(vs)]

    raw = summarize(judgements([C.rejudge(v, base) for v in verdicts]))
    return side_by_side(raw, summarize(judgements(verdicts)), LABEL_FREE)
