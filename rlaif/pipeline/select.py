"""One wave of the RL-CAI judge stage: its pairs, and which judged pairs its export keeps.

The runner calls :func:`wave_pairs` for a wave of prompts (their CAI-SL traces and sampled
responses), judges the pairs (:func:`rlaif.pipeline.rl_cai.judge_wave`, one store per judge
model), and :func:`wave_export_records` turns the judged pairs into the records the
preference export reads: a CAI-SL pair is kept only when the judge prefers the revision, the
sampled pairs are chosen by ``stages.judge.pairs``, and every prompt without a pair gets a
``skipped`` record with its reason, so every input is accounted for. The records of a wave
come in the order the whole run's did when it was judged in one piece: CAI-SL records, then
prompts whose sampling failed, then the chosen pairs, then prompts with no pair.
"""

from __future__ import annotations

from typing import Any

from rlaif.config.schema import JudgeStageConfig
from rlaif.pipeline.rl_cai import PairToJudge, select_pairs
from rlaif.sources import PromptItem
from rlaif.stages import judge as J
from rlaif.stages.pairs import candidate_pairs, keep_cai_sl_pair
from rlaif.store import record_id

PairKey = tuple[str, str, int, int]  # (source, prompt id, i, j)


def wave_pairs(
    wave: list[PromptItem],
    traces: list[dict[str, Any]] | None,
    samples: dict[str, list[str]] | None,
    cai_sl: bool,
) -> list[PairToJudge]:
    """The pairs to judge for one wave: revised vs initial response of each CAI-SL trace
    (when the revision changed it), then every pair of distinct sampled responses."""
    labels = {i.id: i.label for i in wave}
    pairs: list[PairToJudge] = []
    if traces is not None and cai_sl:
        pairs += [
            PairToJudge(
                t["prompt_id"],
                t["prompt"],
                t["final_response"],
                t["initial_response"],
                "cai_sl",
                label=labels.get(t["prompt_id"]),
            )
            for t in traces
            if t
            and t["status"] == "ok"
            and t["final_response"].strip() != t["initial_response"].strip()
        ]
    if samples is not None:
        for item in wave:
            texts = samples.get(item.id)
            if texts is None:
                continue
            ij, _ = candidate_pairs(texts, "all")
            conversation = item.messages()  # one object: the judge renders its pairs together
            pairs += [
                PairToJudge(item.id, conversation, texts[i], texts[j], "samples", i, j, item.label)
                for i, j in ij
            ]
    return pairs


def ensemble_record(records: list[dict[str, Any]], jcfg: J.JudgeConfig) -> dict[str, Any]:
    """One judged-pair record from the same pair judged by several models."""
    verdict = J.ensemble([J.Verdict.from_dict(r["verdict"]) for r in records], jcfg)
    rec = {
        **records[0],
        "id": record_id("judge-ensemble", [r["id"] for r in records]),
        "verdict": verdict.to_dict(),
        "status": verdict.status,
    }
    rec.pop("reason", None)
    if verdict.status != "ok":
        rec["reason"] = f"judge error: {verdict.reason or 'unknown'}"
    return rec


def combine(
    per_model: list[dict[PairKey, dict[str, Any]]], jcfg: J.JudgeConfig
) -> dict[PairKey, dict[str, Any]]:
    """The judged record per pair: the first judge's, or the ensemble of every judge model's."""
    by_pair = per_model[0]
    if len(per_model) > 1:  # several judge models: average their verdicts per pair
        by_pair = {
            k: ensemble_record([m[k] for m in per_model], jcfg)
            for k in by_pair
            if all(k in m for m in per_model)
        }
    return by_pair


def wave_export_records(
    wave: list[PromptItem],
    traces: list[dict[str, Any]] | None,
    samples: dict[str, list[str]] | None,
    by_pair: dict[PairKey, dict[str, Any]],
    jstage: JudgeStageConfig,
) -> list[dict[str, Any]]:
    """The export's input records of one wave (see the module docstring for their order)."""
    records: list[dict[str, Any]] = []
    for t in traces or []:  # CAI-SL: keep a revision only when the judge prefers it
        if not jstage.cai_sl or t is None:
            continue
        rec = by_pair.get(("cai_sl", t["prompt_id"], 0, 1))
        if rec is None:
            reason = (
                f"generation failed: {t.get('reason')}"
                if t["status"] != "ok"
                else "revision identical to initial response"
            )
            records.append({"id": t["id"], "prompt_id": t["prompt_id"], "source": "cai_sl",
                            "status": "skipped", "reason": reason})  # fmt: skip
            continue
        keep, why = keep_cai_sl_pair(J.Verdict.from_dict(rec["verdict"]), jstage.min_p_revision)
        records.append(rec if keep else {**rec, "status": "skipped", "reason": why})
    if samples is not None:
        records += [
            {"id": record_id("no-sample", {"prompt_id": i.id}), "prompt_id": i.id,
             "source": "samples", "status": "skipped", "reason": "sampling failed"}
            for i in wave
            if i.id not in samples
        ]  # fmt: skip
        sampled = {(pid, i, j): r for (src, pid, i, j), r in by_pair.items() if src == "samples"}
        ordered = {i.id: samples[i.id] for i in wave if i.id in samples}
        chosen, none = select_pairs(ordered, sampled, jstage.pairs)
        records += chosen
        records += [
            {"id": record_id("no-pair", {"prompt_id": pid}), "prompt_id": pid,
             "source": "samples", "status": "skipped", "reason": why}
            for pid, why in none.items()
        ]  # fmt: skip
    return records


def wave_errors(records: list[dict[str, Any]], judged: list[dict[str, Any]]) -> int:
    """Failed work behind a wave's records (a run that retries errors redoes the wave)."""
    failed = sum(1 for r in judged if r["status"] == "error")
    upstream = ("generation failed", "sampling failed")
    failed += sum(1 for r in records if str(r.get("reason", "")).startswith(upstream))
    return failed
