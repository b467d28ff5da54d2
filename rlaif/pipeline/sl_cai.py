"""The SL-CAI wave: respond, then N rounds of critique and revision, then one trace per prompt."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlaif.calls.caller import ModelCaller
from rlaif.config.schema import CritiqueReviseConfig
from rlaif.pipeline.steps import run_gen_step
from rlaif.progress import Progress
from rlaif.sources import PromptItem
from rlaif.stages import critique as cai
from rlaif.store import StageStore

TRACE_STAGE = "critique_revise"


def step_names(rounds: int) -> list[str]:
    return ["respond"] + [f"{s}-{r}" for r in range(1, rounds + 1) for s in ("critique", "revise")]


def critique_revise_wave(
    chunk: list[PromptItem],
    stage: CritiqueReviseConfig,
    ctx: cai.CritiqueContext,
    caller: ModelCaller,
    stores: dict[str, StageStore],
    traces: StageStore,
    progress: Progress,
    trace_id: Callable[[PromptItem], str],
    provenance: dict[str, Any],
) -> None:
    """Run every step for a chunk of prompts (full batches per step) and append their traces.

    A prompt whose request fails gets an ``error`` trace naming the step; the others go on.
    Sampling seeds are the run seed plus a per-step offset, so each step samples differently
    while a prompt's result never depends on which prompts share its batch.
    """
    convs = {i.id: i.messages() for i in chunk}
    start_n = progress.n
    seed = ctx.seed
    resp = run_gen_step(
        "respond",
        {pid: cai.respond_request(ctx, c, stage.respond.params(seed)) for pid, c in convs.items()},
        stores["respond"],
        caller,
        progress,
    )
    current = {pid: cai.clean(r["text"]) for pid, r in resp.items() if r["status"] == "ok"}
    rounds: dict[str, list[dict[str, Any]]] = {pid: [] for pid in convs}
    failed = {pid: f"respond: {r.get('reason')}" for pid, r in resp.items() if r["status"] != "ok"}
    for r in range(1, stage.rounds + 1):
        alive = [pid for pid in convs if pid not in failed]
        princ = {pid: cai.principle_for(ctx, pid, r) for pid in alive}
        tags = {pid: {"principle_id": princ[pid].id} for pid in alive}
        crit = run_gen_step(
            f"critique-{r}",
            {
                pid: cai.critique_request(
                    ctx,
                    convs[pid],
                    current[pid],
                    princ[pid],
                    stage.critique.params(seed + 1000 * r + 1),
                )
                for pid in alive
            },
            stores[f"critique-{r}"],
            caller,
            progress,
            extra=tags,
        )
        failed.update(
            {
                pid: f"critique-{r}: {rec.get('reason')}"
                for pid, rec in crit.items()
                if rec["status"] != "ok"
            }
        )
        alive = [pid for pid in alive if pid not in failed]
        critiques = {pid: cai.clean(crit[pid]["text"]) for pid in alive}
        rev = run_gen_step(
            f"revise-{r}",
            {
                pid: cai.revise_request(
                    ctx,
                    convs[pid],
                    current[pid],
                    princ[pid],
                    critiques[pid],
                    stage.revise.params(seed + 1000 * r + 2),
                )
                for pid in alive
            },
            stores[f"revise-{r}"],
            caller,
            progress,
            extra=tags,
        )
        for pid in alive:
            if rev[pid]["status"] != "ok":
                failed[pid] = f"revise-{r}: {rev[pid].get('reason')}"
                continue
            revision = cai.clean(rev[pid]["text"])
            p = princ[pid]
            rounds[pid].append(
                {
                    "round": r,
                    "principle_id": p.id,
                    "response": current[pid],
                    "critique_request": p.critique,
                    "critique": critiques[pid],
                    "revision_request": p.revision,
                    "revision": revision,
                }
            )
            current[pid] = revision
    records = []
    for item in chunk:
        pid = item.id
        rec: dict[str, Any] = {
            "id": trace_id(item),
            "prompt_id": pid,
            "prompt": convs[pid],
            "provenance": provenance,
        }
        if pid in failed:
            rec.update(status="error", reason=failed[pid])
        else:
            rec.update(
                status="ok",
                initial_response=cai.clean(resp[pid]["text"]),
                rounds=rounds[pid],
                final_response=current[pid],
                principle_ids=[x["principle_id"] for x in rounds[pid]],
            )
        records.append(rec)
    traces.append(records)
    # Prompts that failed part-way never make their later requests: count them as done.
    progress.update(max(0, start_n + len(chunk) * len(step_names(stage.rounds)) - progress.n))
