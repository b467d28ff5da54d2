"""Judge audit: how well an AI judge agrees with human preference labels, and how it is biased.

Every comparison is judged in both orders, the way the pipeline judges (:mod:`rlaif.stages.judge`):
order 1 shows the human-preferred response first, order 2 second. A :class:`Judgement` keeps
the resulting verdict from the human label's point of view (``winner == "human"`` is agreement).
:func:`summarize` turns judgements into metrics (see :data:`DEFINITIONS`), each rate with its
Wilson 95 % interval. Multiple-choice items (:class:`~rlaif.evaluate.pairs_io.MCItem`) are scored
once per order over all their labels; each (correct, incorrect) option pair then gets a pairwise
verdict from those same two calls, so the pairwise metrics cover them too, and
:func:`mc_summary` adds plain multiple-choice accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from rlaif.calls.caller import ModelCaller, ScoreRequest
from rlaif.constitution import Constitution
from rlaif.errors import ConfigError
from rlaif.evaluate.pairs_io import AuditData, AuditPair, MCItem
from rlaif.progress import Progress
from rlaif.prompts import PromptBook
from rlaif.stages.judge import (
    TOL,
    JudgeConfig,
    Verdict,
    ensemble,
    judge_principles,
    judge_requests,
    verdict_from_logprobs,
    verdict_from_texts,
)
from rlaif.stages.scored import rule_verdict

Z95 = 1.959963984540054
MC_PRINCIPLE = "mc"  # the "principle" of a multiple-choice item: the eval's own question
CALIBRATION_EDGES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFINITIONS = {
    "agreement_decided": "judge winner == human label, over decided verdicts (ties excluded)",
    "agreement_ties_half": "as agreement_decided, over all ok verdicts, a tie counting 0.5",
    "position_consistency": "both orders pick the same winner, over ok verdicts",
    "first_position_rate": "single-order answers that pick the option shown first, over orders "
    "that pick one (0.5 = no position bias)",
    "tie_rate": "verdicts that are ties (the tie rule of rlaif.stages.judge), over ok verdicts",
    "error_rate": "verdicts that failed (unparseable reply, failed call), over all",
    "length_bias.judge_prefers_longer": "decided verdicts whose winner is the longer response "
    "(characters), over decided verdicts with responses of different lengths",
    "length_bias.human_prefers_longer": "the baseline: the human-preferred response is the "
    "longer one, over the same verdicts",
    "length_bias.judge_leans_longer": "the side the judge leans to (p(human-chosen) != 0.5, "
    "ties included) is the longer response; baseline: length_bias.human_prefers_longer_all_ok",
    "mean_confidence": "mean |p(human-chosen better) - 0.5| over ok verdicts",
    "calibration": "verdicts bucketed by the judge's confidence max(p, 1 - p); agreement = the "
    "side the judge leans to (p > 0.5) is the human's, p == 0.5 left out",
    "ci95": "Wilson score interval (a tie's 0.5 in agreement_ties_half enters as half a success)",
}


@dataclass
class Judgement:
    """One comparison judged under one principle (or an ensemble), from the human's view.

    Attributes:
        item_id: the pair's or multiple-choice item's id.
        source: ``file:line`` of the row.
        kind: ``"pair"`` or ``"mc"`` (an option pair of a multiple-choice item).
        principle: principle id, ``"mc"``, or ``"ensemble"``.
        status: ``"ok"`` or ``"error"``.
        winner: ``"human"``, ``"other"``, ``"tie"`` or None on error.
        p_human: P(human-preferred better), both orders combined.
        p_orders: the same per order: [order 1 (human's shown first), order 2].
        p_first: P(the option shown first is better) per order (of every member, for an
            ensemble), as the verdict used it (calibrated, for a calibrated judge).
        position_consistent: both orders pick the same winner.
        len_human: characters of the human-preferred response; len_other: of the other.
        reason: why a tie or an error.
    """

    item_id: str
    source: str
    kind: str
    principle: str
    status: str
    winner: str | None
    p_human: float | None
    p_orders: list[float | None]
    p_first: list[float | None]
    position_consistent: bool | None
    len_human: int
    len_other: int
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_verdict(
    v: Verdict, item_id: str, source: str, kind: str, principle: str, human: str, other: str
) -> Judgement:
    """A judgement from a verdict on (x = human-preferred, y = the other)."""
    # Every single-order answer behind the verdict: its two orders, or its members' orders.
    members = [m for m in v.members if m.status == "ok"]
    p_first = [o.p_used for o in v.orders] or [o.p_used for m in members for o in m.orders]
    return Judgement(
        item_id,
        source,
        kind,
        principle,
        v.status,
        {"a": "human", "b": "other", "tie": "tie"}.get(v.winner or ""),
        v.p_a_better,
        [v.p_order1, v.p_order2],
        p_first,
        v.position_consistent,
        len(human),
        len(other),
        v.reason,
    )


# -- running the judge -----------------------------------------------------------------------


@dataclass
class AuditRun:
    """Judgements of one audit: per principle, per comparison (ensembles), and MC details;
    ``verdicts`` and ``ensemble_verdicts`` are the verdicts behind ``judgements`` and
    ``ensembles`` (None for multiple-choice ones), to judge again with another option prior
    (:mod:`rlaif.evaluate.calibration_audit`)."""

    judgements: list[Judgement]
    ensembles: list[Judgement]
    mc: list[dict[str, Any]]  # per item: per-order option distributions and argmaxes
    principle_ids: list[str]
    verdicts: list[Verdict | None] = field(default_factory=list)
    ensemble_verdicts: list[Verdict | None] = field(default_factory=list)


def _call(caller: ModelCaller, reqs: list, bar: Progress, generate: bool) -> list:
    """All requests through the caller in chunks, so progress moves during long runs; only
    requests sent to the model count (cached ones are the progress bar's ``initial``)."""
    out: list = []
    step = max(32, caller.batch_size * 4)
    for start in range(0, len(reqs), step):
        chunk = reqs[start : start + step]

        def on_batch(idx: list[int], _res: list) -> None:
            bar.update(len(idx))

        out.extend((caller.generate if generate else caller.score)(chunk, on_batch))
    return out


def _pair_verdict(results: list, cfg: JudgeConfig, pid: str, model: str) -> Verdict:
    failed = [f"order {i}: {r.error}" for i, r in enumerate(results, 1) if not r.ok]
    if failed:
        common = {"mode": cfg.mode, "principle_ids": [pid], "models": [model]}
        return Verdict("error", reason="; ".join(failed), n_errors=1, **common)
    if cfg.mode == "logprob":
        return verdict_from_logprobs(
            results[0].scores, results[1].scores, cfg, principle_id=pid, model=model
        )
    texts = [r.completions[0].text if r.completions else "" for r in results]
    return verdict_from_texts(texts[0], texts[1], cfg, principle_id=pid, model=model)


def principle_plan(
    pairs: Sequence[AuditPair], constitution: Constitution, principles: str | int, seed: int
) -> list[list[str]]:
    """Judge principle ids per pair: all of them, or ``principles`` drawn per pair (seeded,
    with replacement as in the pipeline's ensembles)."""
    pool = [p.id for p in constitution.judge_principles]
    if not pool:
        raise ConfigError(f"constitution '{constitution.name}' has no judge principles")
    if principles == "all":
        return [list(pool) for _ in pairs]
    if not isinstance(principles, int) or principles < 1:
        raise ConfigError(
            f"principles must be 'all' or >= 1, got {principles!r}", field="principles"
        )
    return [[p.id for p in judge_principles(constitution, principles, seed, x.id)] for x in pairs]


def run_audit(
    data: AuditData,
    caller: ModelCaller,
    constitution: Constitution,
    cfg: JudgeConfig | None = None,
    *,
    principles: str | int = 1,
    seed: int = 0,
    book: PromptBook | None = None,
    stream: TextIO | None = None,
    quiet: bool = False,
) -> AuditRun:
    """Judge every comparison of ``data`` in both orders through ``caller``.

    Args:
        data: pairs and multiple-choice items from :func:`read_comparisons`.
        caller: cached model access (a re-run is answered from its cache).
        constitution: where the judge principles come from.
        cfg: judge settings (mode, tie rule); default :class:`JudgeConfig`.
        principles: ``"all"`` judges each pair under every judge principle; ``k`` samples k.
        seed: for sampling principles.
        book: templates; default the built-in ones.
        stream, quiet: where progress goes, or nowhere.

    Raises:
        ConfigError: reasoning mode on multiple-choice items, bad ``principles``.
    """
    cfg = cfg or JudgeConfig()
    book = book or PromptBook()
    if data.mc_items and cfg.mode != "logprob":
        raise ConfigError(
            "multiple-choice items are scored by option log-probabilities; use --mode logprob",
            field="mode",
        )
    plan = principle_plan(data.pairs, constitution, principles, seed)
    by_id = {p.id: p for p in constitution.judge_principles}
    tasks = [
        (pair, pid)
        for pair, pids in zip(data.pairs, plan, strict=True)
        for pid in dict.fromkeys(pids)
    ]
    # a principle with a check is judged by its rule, as in a pipeline (no model call)
    rules = {pid for pid, p in by_id.items() if p.check is not None}
    reqs: list = []
    for pair, pid in tasks:
        if pid in rules:
            continue
        reqs.extend(
            judge_requests(book, pair.conversation, pair.chosen, pair.rejected, by_id[pid], cfg)
        )
    mc_reqs = [
        ScoreRequest([{"role": "user", "content": it.render(order)}], it.labels)
        for it in data.mc_items
        for order in _mc_orders(it)
    ]
    total = len(reqs) + len(mc_reqs)
    # Cached calls show as done up front, so the rate and ETA count only real model calls.
    cached = sum(caller.key(r) in caller.cache for r in (*reqs, *mc_reqs))
    desc = f"judge audit ({cfg.mode})"
    with Progress(total, desc, "calls", stream, initial=cached, quiet=quiet) as bar:
        results = _call(caller, reqs, bar, generate=cfg.mode == "reasoning")
        mc_results = _call(caller, mc_reqs, bar, generate=False)

    judgements: list[Judgement] = []
    verdicts: dict[tuple[str, str], Verdict] = {}
    k = 0
    for pair, pid in tasks:
        if pid in rules:
            v = rule_verdict(by_id[pid], pair.chosen, pair.rejected, None, cfg)
        else:
            v = _pair_verdict(results[2 * k : 2 * k + 2], cfg, pid, caller.model)
            k += 1
        verdicts[(pair.id, pid)] = v
        judgements.append(
            from_verdict(v, pair.id, pair.source, "pair", pid, pair.chosen, pair.rejected)
        )
    ensembles, ensemble_verdicts = [], []
    for pair, pids in zip(data.pairs, plan, strict=True):
        v = ensemble([verdicts[(pair.id, pid)] for pid in pids], cfg)
        ensemble_verdicts.append(v)
        ensembles.append(
            from_verdict(v, pair.id, pair.source, "pair", "ensemble", pair.chosen, pair.rejected)
        )
    mc_rows, mc_verdicts = [], []
    for k, item in enumerate(data.mc_items):
        mc_js, row, vs = _mc_judge(item, mc_results[2 * k : 2 * k + 2], cfg, caller.model)
        judgements.extend(mc_js)
        ensembles.extend(mc_js)
        mc_rows.append(row)
        # two options: a pair in both orders, whose option prior calibration can remove
        mc_verdicts += vs if len(item.texts) == 2 else [None] * len(vs)
    judged = {pid for _, pid in tasks}
    used = [p for p in by_id if p in judged] + ([MC_PRINCIPLE] if data.mc_items else [])
    behind: list[Verdict | None] = [verdicts[(pair.id, pid)] for pair, pid in tasks]
    return AuditRun(judgements, ensembles, mc_rows, used, behind + mc_verdicts,
                    [*ensemble_verdicts, *mc_verdicts])  # fmt: skip


# -- multiple choice --------------------------------------------------------------------------


def _mc_orders(item: MCItem) -> tuple[list[int], list[int]]:
    """Order 1: the prompt's own; order 2: the option texts reversed under the same labels."""
    n = len(item.texts)
    return list(range(n)), list(range(n - 1, -1, -1))


def _mc_judge(
    item: MCItem, results: list, cfg: JudgeConfig, model: str
) -> tuple[list[Judgement], dict[str, Any], list[Verdict | None]]:
    """Pairwise judgements (correct vs each incorrect), the MC row and the verdicts behind the
    judgements, from the two order calls."""
    orders = _mc_orders(item)
    pair_cfg = dataclasses.replace(cfg, options=("A", "B"))
    correct = item.correct
    behind: list[Verdict | None] = []
    row: dict[str, Any] = {"item_id": item.id, "source": item.source, "n_options": len(item.texts)}
    row["correct"] = correct
    out = []
    for j in range(len(item.texts)):
        if j == correct:
            continue
        human, other = item.texts[correct], item.texts[j]
        if not all(r.ok for r in results):
            v = _pair_verdict(results, pair_cfg, MC_PRINCIPLE, model)
        else:
            # Reversal flips every pair's relative position: one order shows the correct
            # option first (the pair's "order 1"), the other shows it second.
            def lp(o: int, text: int) -> float:
                return results[o].scores.logprobs[item.labels[orders[o].index(text)]]

            f = 0 if orders[0].index(correct) < orders[0].index(j) else 1
            lp1 = {"A": lp(f, correct), "B": lp(f, j)}
            lp2 = {"A": lp(1 - f, j), "B": lp(1 - f, correct)}
            v = verdict_from_logprobs(lp1, lp2, pair_cfg, principle_id=MC_PRINCIPLE, model=model)
        out.append(from_verdict(v, item.id, item.source, "mc", MC_PRINCIPLE, human, other))
        behind.append(v)
    dists = [
        _option_dist(r.scores.logprobs, item.labels, o) if r.ok else None
        for r, o in zip(results, orders, strict=True)
    ]
    if None not in dists:
        combined = [(a + b) / 2 for a, b in zip(*dists, strict=True)]  # type: ignore[misc]
        row["dist_orders"] = dists
        row["argmax_orders"] = [_argmax(d) for d in dists]  # type: ignore[arg-type]
        row["argmax_positions"] = [orders[o].index(row["argmax_orders"][o]) for o in (0, 1)]
        row["argmax"] = _argmax(combined)
        row["p_correct"] = combined[correct]
    else:
        row["error"] = "; ".join(r.error for r in results if not r.ok) or "unusable option scores"
    return out, row, behind


def _option_dist(
    logprobs: dict[str, float], labels: Sequence[str], order: list[int]
) -> list[float] | None:
    """P(option text i), renormalized over the labels, from one order's label scores; None
    when the scores are not usable (NaN, +inf, all -inf): an error, never a uniform guess."""
    vals = [float(logprobs.get(label, math.nan)) for label in labels]
    top = max(vals)
    if any(math.isnan(v) or v == math.inf for v in vals) or top == -math.inf:
        return None
    ws = [math.exp(v - top) for v in vals]
    z = sum(ws)
    dist = [0.0] * len(vals)
    for position, text in enumerate(order):
        dist[text] = ws[position] / z
    return dist


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


# -- metrics ----------------------------------------------------------------------------------


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of ``k`` successes in ``n`` trials; None when ``n == 0``."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / denom
    # Exact ends where they are exact: round-off must not put 1/1 above its own upper bound.
    lo = 0.0 if k <= 0 else max(0.0, centre - half)
    hi = 1.0 if k >= n else min(1.0, centre + half)
    return lo, hi


def rate(k: float, n: int) -> dict[str, Any]:
    """``{"rate", "k", "n", "ci95"}``; rate and interval are None when ``n == 0``."""
    ci = wilson(k, n)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": list(ci) if ci else None}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _leans(p: float | None) -> bool:
    """Whether ``p`` picks a side; within the judge's round-off tolerance of 0.5 it does not."""
    return p is not None and abs(p - 0.5) > TOL


def summarize(judgements: Sequence[Judgement]) -> dict[str, Any]:
    """All metrics of :data:`DEFINITIONS` over a set of judgements."""
    ok = [j for j in judgements if j.status == "ok" and j.p_human is not None]
    decided = [j for j in ok if j.winner in ("human", "other")]
    agree = sum(j.winner == "human" for j in decided)
    ties = sum(j.winner == "tie" for j in ok)
    picks = [p for j in ok for p in j.p_first if p is not None and _leans(p)]
    unequal = [j for j in decided if j.len_human != j.len_other]
    judge_longer = sum((j.winner == "human") == (j.len_human > j.len_other) for j in unequal)
    human_longer = sum(j.len_human > j.len_other for j in unequal)
    ok_unequal = [j for j in ok if j.len_human != j.len_other]
    leaning = [j for j in ok_unequal if _leans(j.p_human)]
    leans_longer = sum((j.p_human > 0.5) == (j.len_human > j.len_other) for j in leaning)  # type: ignore[operator]
    return {
        "n": len(judgements),
        "n_ok": len(ok),
        "n_decided": len(decided),
        "agreement_decided": rate(agree, len(decided)),
        "agreement_ties_half": rate(agree + 0.5 * ties, len(ok)),
        "position_consistency": rate(sum(bool(j.position_consistent) for j in ok), len(ok)),
        "first_position_rate": rate(sum(p > 0.5 for p in picks), len(picks)),
        "tie_rate": rate(ties, len(ok)),
        "error_rate": rate(len(judgements) - len(ok), len(judgements)),
        "length_bias": {
            "judge_prefers_longer": rate(judge_longer, len(unequal)),
            "human_prefers_longer": rate(human_longer, len(unequal)),
            "judge_leans_longer": rate(leans_longer, len(leaning)),
            "human_prefers_longer_all_ok": rate(
                sum(j.len_human > j.len_other for j in ok_unequal), len(ok_unequal)
            ),
        },
        "mean_confidence": _mean([abs(j.p_human - 0.5) for j in ok]),  # type: ignore[operator]
        "mean_p_human": _mean([j.p_human for j in ok]),  # type: ignore[misc]
        "mean_p_human_orders": [
            _mean([j.p_orders[o] for j in ok if j.p_orders[o] is not None]) for o in (0, 1)
        ],
        "calibration": calibration(ok),
    }


def calibration(judgements: Sequence[Judgement]) -> list[dict[str, Any]]:
    """Agreement of the judge's lean per confidence bucket ``max(p, 1 - p)``."""
    edges = CALIBRATION_EDGES
    buckets = []
    for lo, hi in itertools.pairwise(edges):
        last = hi == edges[-1]
        inside = [
            j
            for j in judgements
            if j.p_human is not None
            and _leans(j.p_human)
            and lo <= max(j.p_human, 1 - j.p_human) < hi + (1e-12 if last else 0)
        ]
        agree = sum(j.p_human > 0.5 for j in inside)  # type: ignore[operator]
        conf = _mean([max(j.p_human, 1 - j.p_human) for j in inside])  # type: ignore[type-var]
        buckets.append(
            {"lo": lo, "hi": hi, "mean_confidence": conf, "agreement": rate(agree, len(inside))}
        )
    return buckets


def mc_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Multiple-choice accuracy: per order, of the two orders combined, and position effects."""
    ok = [r for r in rows if "argmax" in r]
    n_orders = 2 * len(ok)
    return {
        "n_items": len(rows),
        "n_ok": len(ok),
        "options": sorted({r["n_options"] for r in rows}),
        "chance": _mean([1 / r["n_options"] for r in ok]),
        "accuracy_order1": rate(sum(r["argmax_orders"][0] == r["correct"] for r in ok), len(ok)),
        "accuracy_order2": rate(sum(r["argmax_orders"][1] == r["correct"] for r in ok), len(ok)),
        "accuracy_combined": rate(sum(r["argmax"] == r["correct"] for r in ok), len(ok)),
        "position_consistency": rate(
            sum(r["argmax_orders"][0] == r["argmax_orders"][1] for r in ok), len(ok)
        ),
        "first_position_rate": rate(
            sum(p == 0 for r in ok for p in r["argmax_positions"]), n_orders
        ),
        "mean_p_correct": _mean([r["p_correct"] for r in ok]),
    }


def audit_metrics(run: AuditRun) -> dict[str, Any]:
    """``overall`` (every principle judgement), ``ensemble`` (one per comparison, as the
    pipeline would use it), ``per_principle`` and, for multiple-choice items, ``mc``."""
    metrics: dict[str, Any] = {
        "overall": summarize(run.judgements),
        "ensemble": summarize(run.ensembles),
        "per_principle": {
            pid: summarize([j for j in run.judgements if j.principle == pid])
            for pid in run.principle_ids
        },
    }
    if run.mc:
        metrics["mc"] = mc_summary(run.mc)
    return metrics
