"""The ``--dry-run`` estimate of an evaluation (``stages.eval`` or an ``eval`` step).

It replays :func:`rlaif.evaluate.policy_eval.run_eval` without a model: the policy and the
baseline each answer every prompt of the evaluation's sets once, greedily (identical
requests are sent once); the judge compares the two answers of each prompt in both orders
(two score requests, none when the answers are identical) and asks whether each red-team
answer is harmful (two score requests per answer). Compliance with code-checked principles
and refusal matching need no model call; the last reward step's model, when it scores the
answers, runs on this machine outside the budget.

Generation requests are exact. A judge request shows both answers: where they are in the
evaluation's call cache (an earlier, unfinished evaluation) the request is exact and may be
found done; where not, it is counted with each missing answer at ``max_new_tokens`` (an
upper bound, ``≤``) and as a call, as if the two answers differ. A policy no training step has
made yet is counted with the base model's tokenizer, and none of its answers is cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.backends.base import SamplingParams
from rlaif.calls.caller import GenRequest, request_key
from rlaif.config.schema import EvalStageConfig, JudgeStageConfig, PipelineConfig
from rlaif.constitution import load_constitution
from rlaif.evaluate.policy_eval import SETS, harm_requests
from rlaif.pipeline.estimate_base import CountingModel, RunDirView, StageEstimate, add_call
from rlaif.prompts import PromptBook
from rlaif.sources import read_prompts
from rlaif.stages.judge import JudgeConfig, judge_principles, judge_requests


@dataclass
class EvalEstimate:
    """What an evaluation still needs: its model calls per role, and what runs besides them.

    Attributes:
        stages: ``eval policy``, ``eval baseline`` (generations) and ``eval judge`` (scores).
        prompts: prompts per set.
        reward_scores: answers the reward model scores at most (2 per prompt), 0 without one.
        compliance: code-checked principles every answer is checked against (no model call).
    """

    stages: list[StageEstimate] = field(default_factory=list)
    prompts: dict[str, int] = field(default_factory=dict)
    reward_scores: int = 0
    compliance: int = 0

    def notes(self) -> list[str]:
        sets = ", ".join(f"{k} {n}" for k, n in self.prompts.items())
        out = [f"eval: {sum(self.prompts.values())} prompts ({sets}), one greedy answer per model"]
        if self.compliance:
            out.append(f"eval: {self.compliance} code-checked principles, no model calls")
        if self.reward_scores:
            out.append(
                f"eval: the reward model scores ≤ {self.reward_scores} answers (on this machine, "
                "not in the budget)"
            )
        return out


def estimate_eval(
    cfg: PipelineConfig,
    ev: EvalStageConfig,
    folder: Path,
    policy: CountingModel,
    policy_known: bool,
    baseline: CountingModel,
    judge: CountingModel,
    js: JudgeStageConfig | None = None,
    reward: bool = False,
    baseline_known: bool = True,
) -> EvalEstimate:
    """The calls and tokens an evaluation into ``folder`` still needs.

    Args:
        cfg: the pipeline (seed, constitution, templates, relative paths).
        ev: the evaluation's section.
        folder: its folder; requests in ``folder/cache/calls.jsonl`` are done.
        policy: the trained model, as its step made it; or, when ``policy_known`` is false,
            a stand-in that counts tokens (no answer of it is looked up).
        baseline, judge: the baseline and the judge.
        baseline_known: false for a baseline no training step has made yet (a stand-in).
        js: the judge section whose tie rule the win rate uses (the requests do not depend on it).
        reward: a reward step's model also scores the answers.
    """
    constitution = load_constitution(cfg.constitution_ref())
    book = PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None)
    out = EvalEstimate()
    rows: list[tuple[str, str, list[dict[str, str]]]] = []  # set, id, conversation
    for name in SETS:  # the order run_eval reads them in
        path = getattr(ev, name)
        if not path:
            continue
        label_field = ev.label_field if name == "prompts" else None
        items, _ = read_prompts(
            cfg.resolve_path(path), field=ev.field, limit=ev.limit, label_field=label_field
        )
        out.prompts[name] = len(items)
        rows += [(name, it.id, it.messages()) for it in items]
    view = RunDirView(folder, retry_errors=False)
    try:
        answers = {}
        params = SamplingParams(temperature=0.0, max_new_tokens=ev.max_new_tokens)
        for role, m, known in (
            ("policy", policy, policy_known),
            ("baseline", baseline, baseline_known),
        ):
            st = StageEstimate(f"eval {role}", m.model)
            out.stages.append(st)
            answers[role] = _generate(st, m, known, view, book, rows, params)
        jst = StageEstimate("eval judge", judge.model)
        out.stages.append(jst)
        jcfg = (
            JudgeConfig(tie_threshold=js.tie_threshold, flip_margin=js.flip_margin) if js else None
        )
        reqs = _judge_requests(cfg, ev, constitution, book, rows, answers, jcfg or JudgeConfig())
        seen: set[str] = set()
        for req, missing in reqs:
            if not missing:
                key = request_key(judge.model, judge.revision, req)
                if key in seen:
                    continue  # run_eval sends identical requests once
                seen.add(key)
                if key in view.cache:
                    jst.done += 1
                    continue
            add_call(jst, judge.count, req, not missing, missing)
    finally:
        view.close()
    out.compliance = len(constitution.rule_principles)
    out.reward_scores = 2 * len(rows) if reward else 0
    return out


def _generate(
    st: StageEstimate,
    m: CountingModel,
    known: bool,
    view: RunDirView,
    book: PromptBook,
    rows: list[tuple[str, str, list[dict[str, str]]]],
    params: SamplingParams,
) -> list[str | None]:
    """One model's answers (None: not made yet), counting the requests still to send."""
    seen: dict[str, str | None] = {}
    texts: list[str | None] = []
    for _, _, conv in rows:
        r = book.render("respond", conversation=conv, system=None)
        req = GenRequest(r.messages, params, r.template_hash)
        key = request_key(m.model, m.revision, req)
        if key not in seen:  # identical requests are sent once
            value = view.cached(key) if known else None
            if isinstance(value, list) and value:
                st.done += 1
                seen[key] = value[0].get("text", "")
            else:
                add_call(st, m.count, req, True, 0)
                seen[key] = None
        texts.append(seen[key])
    return texts


def _judge_requests(
    cfg: PipelineConfig,
    ev: EvalStageConfig,
    constitution: Any,
    book: PromptBook,
    rows: list[tuple[str, str, list[dict[str, str]]]],
    answers: dict[str, list[str | None]],
    jcfg: JudgeConfig,
) -> list[tuple[Any, int]]:
    """The judge's requests in run_eval's order, each with the tokens of its missing answers
    (0: the request is exactly the one the evaluation will send)."""
    most = ev.max_new_tokens
    out: list[tuple[Any, int]] = []
    if ev.win_rate and constitution.judge_principles:
        by_id = {p.id: p for p in constitution.judge_principles}
        for n, (name, rid, conv) in enumerate(rows):
            x, y = answers["policy"][n], answers["baseline"][n]
            if x is not None and y is not None and x.strip() == y.strip():
                continue  # a tie without a judge call
            pid = judge_principles(constitution, 1, cfg.seed, name + ":" + rid, "ai")[0].id
            missing = most * ((x is None) + (y is None))
            for req in judge_requests(book, conv, x or "", y or "", by_id[pid], jcfg):
                out.append((req, missing))
    for n, (name, _, conv) in enumerate(rows):
        if name != "red_team":
            continue
        for role in ("policy", "baseline"):
            text = answers[role][n]
            for req in harm_requests(conv, text or "", book):
                out.append((req, 0 if text is not None else most))
    return out
