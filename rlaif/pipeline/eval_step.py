"""The ``stages.eval`` step: the last trained policy against the pipeline's model.

Both answer the held-out prompts greedily; the judge compares them (win rate) and checks the
red-team answers for harm, refusals are matched, and the last reward step's model scores both
when there is one. Results go to ``eval/`` (:func:`rlaif.evaluate.policy_eval.write_eval`);
model calls are cached in ``eval/cache/`` so a killed evaluation resumes without repeating
them, and ``eval/done.json`` holds the settings hash that lets a re-run skip it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, TextIO

from rlaif.calls.budget import Budget
from rlaif.calls.factory import make_caller
from rlaif.config.schema import EvalStageConfig, JudgeStageConfig, ModelConfig, PipelineConfig
from rlaif.constitution import load_constitution
from rlaif.evaluate.policy_eval import (
    DEFINITIONS,
    eval_metrics,
    format_summary,
    run_eval,
    template_hashes,
    write_eval,
)
from rlaif.evaluate.rewards import reward_fn_for
from rlaif.pipeline.done import DONE, file_hash, model_identity, now, read_done, write_json
from rlaif.pipeline.train_steps import StepResult
from rlaif.prompts import PromptBook
from rlaif.sources import read_prompts
from rlaif.stages.judge import JudgeConfig
from rlaif.store import CallCache, content_hash
from rlaif.train.recipes import POLICY_TRAINERS
from rlaif.version import __version__

ADDED = {"label_field": None, "win_rate": True}  # eval fields added after the first release


def _eval_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rates a reader wants first: win rate, then policy vs baseline safety."""

    def r(x: Any) -> Any:
        return x.get("rate") if isinstance(x, dict) else None

    wins = metrics["win_rate"].get("all")
    out: dict[str, Any] = {"win_rate": r(wins["win_rate"]) if wins else None}
    for role in ("policy", "baseline"):
        m = metrics[role]
        for key in ("red_team_judged_harmless_rate", "red_team_refusal_rate", "over_refusal_rate"):
            if key in m:
                out[f"{role}_{key}"] = r(m[key])
        if m.get("compliance"):  # every code-checked principle passed
            out[f"{role}_compliance"] = r(m["compliance"].get("all"))
    return out


def run_stage_eval(
    cfg: PipelineConfig, run_dir: Path, steps: list[StepResult], stream: TextIO
) -> tuple[dict[str, Any], dict[str, int]]:
    """Evaluate the last trained policy against the pipeline's model (``stages.eval``).

    Returns:
        The evaluation's summary (status, folder, headline rates) and its model-call counts.
    """
    ev = cfg.stages.eval
    assert ev is not None
    policy = [s for s in steps if s.trainer in POLICY_TRAINERS][-1]
    rewards = [s for s in steps if s.trainer == "reward"] if ev.reward_model else []
    baseline_id = model_identity(cfg.model.id, cfg.model.revision, {})
    return evaluate_policy(
        cfg, ev, run_dir / "eval", policy, cfg.model, baseline_id, rewards[-1] if rewards else None,
        cfg.stages.judge, stream, budget_with=[run_dir / "cache" / "calls.jsonl"],
    )  # fmt: skip


def evaluate_policy(
    cfg: PipelineConfig,
    ev: EvalStageConfig,
    out: Path,
    policy: StepResult,
    baseline_m: ModelConfig,
    baseline_id: Any,
    reward: StepResult | None,
    js: JudgeStageConfig | None,
    stream: TextIO,
    budget_with: list[Path] | None = None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Evaluate ``policy``'s model against ``baseline_m`` into ``out``, or skip it when its
    ``done.json`` holds the same settings hash.

    Args:
        cfg: the pipeline (seed, judge tie rule, constitution, templates, execution).
        ev: what to evaluate on and how.
        out: the evaluation's folder.
        policy: the training step whose model is tested.
        baseline_m, baseline_id: the model it is compared with, and that model's identity
            in the hash (a step's hash for a trained model, else its revision).
        reward: the reward step whose model also scores both, or None.
        js: the pipeline's judge section: its model judges unless ``ev.judge`` names one,
            and its tie rule decides the win rate; None: the pipeline's model, default rule.
        stream: where progress goes.
        budget_with: the run dir's other call caches, whose usage counts against the same
            ``budget:`` caps as the evaluation's own calls (the data stages' cache of a
            ``stages:`` pipeline); None: the caps apply to the evaluation's folder alone, as
            they apply to each data step's folder in the ``steps:`` form.

    Returns:
        The evaluation's summary (status, folder, headline rates) and its model-call counts.
    """
    judge_m = ev.judge or (js.model if js else None) or cfg.model
    files = {k: getattr(ev, k) for k in ("prompts", "red_team", "safe") if getattr(ev, k)}
    paths = {k: cfg.resolve_path(v) for k, v in files.items()}
    constitution = load_constitution(cfg.constitution_ref())
    # the pipeline judge's tie rule also decides the win rate (the eval judges in logprob mode)
    jcfg = JudgeConfig(tie_threshold=js.tie_threshold, flip_margin=js.flip_margin) if js else None
    settings = {
        "tie_rule": jcfg.to_dict() if jcfg else None,
        # fields added since keep earlier evaluations' hashes while at their defaults
        **{k: v for k, v in dataclasses.asdict(ev).items() if ADDED.get(k, ...) != v},
        "seed": cfg.seed,
        "policy": policy.hash,
        "reward": reward.hash if reward else None,
        "baseline": baseline_id,
        "judge": model_identity(judge_m.id, judge_m.revision, {}, judge_m.backend),
        "backend": [cfg.model.backend, judge_m.backend],
        "data": {k: file_hash(p) for k, p in paths.items()},
        "constitution": constitution.content_hash,
    }
    digest = content_hash(settings)
    done = read_done(out)
    if done is not None and done.get("hash") == digest:
        print("eval: done earlier, skipped", file=stream, flush=True)
        return {"status": "skipped", "dir": str(out), **(done.get("summary") or {})}, {}
    (out / DONE).unlink(missing_ok=True)
    print(f"eval: {policy.name} vs {baseline_m.id} -> {out}", file=stream, flush=True)
    started = time.perf_counter()
    sets, data = {}, {}
    for name, path in paths.items():
        label_field = ev.label_field if name == "prompts" else None  # the others: by set
        items, skipped = read_prompts(path, field=ev.field, limit=ev.limit, label_field=label_field)
        sets[name] = items
        data[name] = {
            "path": str(path),
            "sha256": settings["data"][name],
            "prompts": len(items),
            "skipped": len(skipped),
        }
    cache = CallCache(out / "cache" / "calls.jsonl")
    policy_m = dataclasses.replace(cfg.model, id=str(policy.out_dir), revision=None)
    # one caller (one loaded model) per distinct model, run where the data stages ran
    callers: dict[str, Any] = {}
    by_model: dict[tuple[str, str | None, str], Any] = {}
    for role, m in (("policy", policy_m), ("baseline", baseline_m), ("judge", judge_m)):
        key = (m.id, m.revision, m.backend)
        if key not in by_model:
            by_model[key] = make_caller(m, cfg.batch_size, cache, execution=cfg.execution)
        callers[role] = by_model[key]
    budget = Budget.for_run(cfg.budget, cache.path, budget_with or [])  # None without caps
    for c in by_model.values():
        c.budget = budget
    reward_fn, reward_info = None, None
    if reward is not None:
        scores = out / "cache" / "reward.jsonl"
        reward_fn, reward_info = reward_fn_for(  # the cached scorer `rlaif eval` uses
            str(reward.out_dir), scores
        )
    book = PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None)
    try:
        rows = run_eval(
            sets,
            callers["policy"],
            callers["baseline"],
            callers["judge"],
            constitution,
            max_new_tokens=ev.max_new_tokens,
            seed=cfg.seed,
            reward_fn=reward_fn,
            book=book,
            stream=stream,
            judge_config=jcfg,
            win_rate=ev.win_rate,
        )
    finally:
        for c in by_model.values():
            c.close()
        cache.close()
    metrics = eval_metrics(rows)
    stats: dict[str, int] = {}
    for c in by_model.values():
        for k, v in c.stats.to_dict().items():
            stats[k] = stats.get(k, 0) + v
    report = {
        "rlaif_version": __version__,
        "pipeline": cfg.name,
        "models": {
            role: {"model": c.model, "revision": c.revision, "backend": m.backend}
            for (role, c), m in zip(callers.items(), (policy_m, baseline_m, judge_m), strict=True)
        },
        "policy_step": policy.name,
        "reward_model": reward_info,
        "data": data,
        "config": {
            **dataclasses.asdict(ev),
            "decoding": "greedy",
            "seed": cfg.seed,
            "judge_mode": "logprob",
            "judge_tie_rule": settings["tie_rule"],
            "constitution": constitution.provenance(),
            "templates": template_hashes(book),
        },
        "metrics": metrics,
        "definitions": DEFINITIONS,
        "calls": stats,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_eval(out, report, rows, plots=ev.plots)
    print(format_summary(metrics), file=stream, flush=True)
    summary = {"headline": _eval_headline(metrics), "seconds": report["seconds"]}
    write_json(out / DONE, {"hash": digest, "finished_at": now(), "summary": summary})
    return {"status": "evaluated", "dir": str(out), **summary}, stats
