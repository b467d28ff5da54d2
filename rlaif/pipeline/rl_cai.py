"""RL-CAI waves: sample n responses per prompt, then judge pairs of responses in both orders.

The judge may be another model than the policy; each has its own :class:`ModelCaller` (and
both share the run's call cache, whose keys include the model). Judge scores are made durable
per backend batch by the cache, and one record per judged pair is appended per wave, so a
crash costs at most the batch in flight and a resume answers the rest from the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlaif.backends.base import SamplingParams
from rlaif.calls.caller import GenRequest, ModelCaller, ScoreRequest
from rlaif.constitution import Constitution
from rlaif.pipeline.judges import JudgeKind
from rlaif.pipeline.steps import recorded, run_gen_step
from rlaif.progress import Progress
from rlaif.prompts import PromptBook
from rlaif.sources import PromptItem
from rlaif.stages import critique as cai
from rlaif.stages import judge as J
from rlaif.stages import scored as S
from rlaif.stages.pairs import candidate_pairs
from rlaif.store import Encoded, StageStore, record_id


@dataclass(frozen=True)
class PairToJudge:
    """Responses x and y to one prompt; ``source`` is ``samples`` or ``cai_sl``."""

    prompt_id: str
    prompt: list[dict[str, str]]
    x: str
    y: str
    source: str
    i: int = 0  # indices of x and y among the prompt's samples
    j: int = 1
    label: str | None = None  # the prompt's label, for rule checks that depend on it


def sample_wave(
    items: Sequence[PromptItem],
    params: SamplingParams,
    book: PromptBook,
    system: str | None,
    caller: ModelCaller,
    store: StageStore,
    progress: Progress,
) -> dict[str, list[str]]:
    """``params.n`` responses per prompt (prompt id -> texts; failed prompts are absent)."""
    with book.pinned():
        requests = {i.id: _sample_request(i, params, book, system) for i in items}
    records = run_gen_step("sample", requests, store, caller, progress)
    return {pid: _texts(rec) for pid, rec in records.items() if rec["status"] == "ok"}


def _sample_request(
    item: PromptItem, params: SamplingParams, book: PromptBook, system: str | None
) -> GenRequest:
    r = book.render("respond", conversation=item.messages(), system=system)
    return GenRequest(r.messages, params, r.template_hash)


def _texts(rec: dict[str, Any]) -> list[str]:
    return [cai.clean(t) for t in rec.get("texts") or [rec["text"]]]


def read_samples(
    items: Sequence[PromptItem],
    params: SamplingParams,
    book: PromptBook,
    system: str | None,
    caller: ModelCaller,
    store: StageStore,
) -> dict[str, list[str]]:
    """The responses :func:`sample_wave` recorded for ``items`` (prompt id -> texts, in
    ``items`` order; prompts whose sampling failed or never ran are absent). Reads the store
    only: the policy model is never called (it may be closed already)."""
    with book.pinned():
        requests = {i.id: _sample_request(i, params, book, system) for i in items}
    return {pid: _texts(rec) for pid, rec in recorded("sample", requests, store, caller).items()}


def judge_wave(
    pairs: Sequence[PairToJudge],
    jcfg: J.JudgeConfig,
    constitution: Constitution,
    book: PromptBook,
    system: str | None,
    seed: int,
    caller: ModelCaller,
    store: StageStore,
    progress: Progress,
    kind: JudgeKind | None = None,
) -> dict[str, dict[str, Any]]:
    """Judge every pair: by ``kind``'s scorer (python, reward_model), or under
    ``jcfg.principles_k`` sampled principles, each by its rule check or by the AI judge (both
    orders); then turn ``kind.label_noise`` of the verdicts around.

    Returns pair record id -> judge record ``{id, prompt_id, prompt, x, y, source, i, j,
    verdict, status, reason}``; ``status`` is the verdict's (``ok`` or ``error``).
    """
    kind = kind or JudgeKind()
    identity = kind.identity()
    out: dict[str, dict[str, Any]] = {}
    judge_json = Encoded(jcfg.to_dict())  # the same in every pair's record id: encoded once
    wave: list[tuple[str, PairToJudge, list, list]] = []
    drawn = [
        J.judge_principles(constitution, jcfg.principles_k, seed, pair_key(pair), kind.kind)
        if kind.scorer is None
        else []
        for pair in pairs
    ]
    with book.pinned():  # one version of each template for the wave, checked once
        requests = _judge_requests(pairs, drawn, kind.kind, jcfg, book, system)
    for pair, principles, reqs in zip(pairs, drawn, requests, strict=True):
        inputs = {
            "prompt": pair.prompt,
            "x": pair.x,
            "y": pair.y,
            "source": pair.source,
            "requests": [
                [r.messages_json for r in rr] if rr else {"check": p.check.to_dict()}
                for p, rr in zip(principles, reqs, strict=True)
            ],
            "judge": judge_json,
            "model": caller.model,
            "revision": caller.revision,
        }
        if identity is not None:  # the plain AI judge keeps its records' ids
            inputs.update(kind=identity, label=pair.label)
        wave.append((record_id("judge", inputs), pair, principles, reqs))
    found = store.get_many((rid for rid, *_ in wave), done_only=True)
    todo = []
    for w in wave:  # ``out`` keeps the pairs' order
        if w[0] in found:
            out[w[0]] = found[w[0]]
        else:
            todo.append(w)
    progress.update(len(pairs) - len(todo))
    flat = [r for _, _, _, reqs in todo for rr in reqs if rr for r in rr]
    if jcfg.mode == "logprob":
        results = caller.score([r for r in flat if isinstance(r, ScoreRequest)])
    else:
        results = caller.generate([r for r in flat if isinstance(r, GenRequest)])
    scored = _scores(kind, [p for _, p, _, _ in todo])
    records = []
    pos = 0
    for n, (rid, pair, principles, reqs) in enumerate(todo):
        members = []
        if kind.scorer is not None:
            sx, sy, err = scored[n]
            members.append(S.scored_verdict(sx, sy, jcfg, kind=kind.kind, scale=kind.scale,
                                            model=kind.name, details=err))  # fmt: skip
        for p, rr in zip(principles, reqs, strict=True):
            if rr is None:
                members.append(S.rule_verdict(p, pair.x, pair.y, pair.label, jcfg))
                continue
            r1, r2 = results[pos], results[pos + 1]
            pos += 2
            members.append(_ai_verdict(r1, r2, p.id, jcfg, caller.model))
        verdict = members[0] if len(members) == 1 else J.ensemble(members, jcfg)
        verdict = S.noisy(verdict, seed, pair_key(pair), kind.label_noise)
        rec = {
            "id": rid,
            "prompt_id": pair.prompt_id,
            "prompt": pair.prompt,
            "x": pair.x,
            "y": pair.y,
            "source": pair.source,
            "i": pair.i,
            "j": pair.j,
            "verdict": verdict.to_dict(),
            "status": verdict.status,
        }
        if verdict.status != "ok":
            rec["reason"] = f"judge error: {verdict.reason or 'unknown'}"
        records.append(rec)
        out[rid] = rec
    store.append(records)
    progress.update(len(todo))
    return out


def _judge_requests(
    pairs: Sequence[PairToJudge],
    drawn: list[list],
    kind: str,
    jcfg: J.JudgeConfig,
    book: PromptBook,
    system: str | None,
) -> list[list]:
    """Per pair, per drawn principle: the two judge requests, or None for a rule check.

    Pairs after the same conversation (the same object: a prompt's pairs share it) judged
    under the same principle are built together, so the template renders once for them.
    """
    out: list[list] = [[None] * len(ps) for ps in drawn]
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for n, (pair, principles) in enumerate(zip(pairs, drawn, strict=True)):
        for k, p in enumerate(principles):
            if not J.rule_judged(p, kind):
                groups.setdefault((id(pair.prompt), id(p)), []).append((n, k))
    for members in groups.values():
        n0, k0 = members[0]
        xy = [(pairs[n].x, pairs[n].y) for n, _ in members]
        built = J.judge_requests_many(book, pairs[n0].prompt, xy, drawn[n0][k0], jcfg,
                                      system=system)  # fmt: skip
        for (n, k), reqs in zip(members, built, strict=True):
            out[n][k] = reqs
    return out


def pair_key(pair: PairToJudge) -> str:
    """The key that seeds a pair's principle draw and label noise (not its record id)."""
    return f"{pair.prompt_id}:{pair.i}:{pair.j}:{pair.source}"


def _scores(
    kind: JudgeKind, pairs: list[PairToJudge]
) -> list[tuple[float | None, float | None, dict[str, Any] | None]]:
    """(score of x, score of y, error details) per pair from ``kind``'s scorer, one batch; a
    scorer that fails leaves every pair of the wave unscored, with its error."""
    if kind.scorer is None or not pairs:
        return []
    triples = [(p.prompt, t, p.label) for p in pairs for t in (p.x, p.y)]
    try:
        s = kind.scorer(triples)
    except Exception as exc:  # a user's function or a reward model: recorded, never guessed
        return [(None, None, {"error": f"{type(exc).__name__}: {exc}"})] * len(pairs)
    return [(s[2 * k], s[2 * k + 1], None) for k in range(len(pairs))]


def _ai_verdict(r1: Any, r2: Any, pid: str, jcfg: J.JudgeConfig, model: str) -> J.Verdict:
    if not (r1.ok and r2.ok):
        return J.Verdict(
            "error",
            reason=f"judge call failed: {r1.error or r2.error}",
            mode=jcfg.mode,
            principle_ids=[pid],
            models=[model],
            n_errors=1,
        )
    if jcfg.mode == "logprob":
        return J.verdict_from_logprobs(r1.scores, r2.scores, jcfg, principle_id=pid, model=model)
    return J.verdict_from_texts(
        r1.completions[0].text, r2.completions[0].text, jcfg, principle_id=pid, model=model
    )


def select_pairs(
    samples: dict[str, list[str]],
    judged: dict[tuple[str, int, int], dict[str, Any]],
    strategy: str,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The judged pair records to export per prompt, and prompts with none (id -> reason)."""
    chosen: list[dict[str, Any]] = []
    none: dict[str, str] = {}
    for pid, texts in samples.items():
        pairs, skipped = candidate_pairs(texts, "all")
        if strategy == "best_vs_worst":
            verdicts = {
                (i, j): J.Verdict.from_dict(judged[(pid, i, j)]["verdict"])
                for i, j in pairs
                if (pid, i, j) in judged
            }
            pairs, skipped = candidate_pairs(texts, "best_vs_worst", verdicts)
        recs = [judged[(pid, i, j)] for i, j in pairs if (pid, i, j) in judged]
        if recs:
            chosen.extend(recs)
        else:
            none[pid] = skipped[0]["reason"] if skipped else "no pair of distinct responses"
    return chosen, none
