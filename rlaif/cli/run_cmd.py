"""``rlaif run PIPELINE [--set key=value ...] [--out DIR] [--dry-run]``.

Exit status: 0 done; 2 a user error (one ``rlaif: error:`` line); 3 a budget cap of the
pipeline (``budget:``) stopped the run before a call that could exceed it (one
``rlaif: stopped:`` line; finished work is kept and the same command with a higher cap
resumes it).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from rlaif.errors import ConfigError
from rlaif.resources import resource_dir

if TYPE_CHECKING:
    from rlaif.config.schema import PipelineConfig
    from rlaif.pipeline.estimate import Estimate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run or resume a pipeline (generation, judging, export)")
    p.add_argument(
        "pipeline",
        metavar="PIPELINE",
        help="pipeline YAML file, or the name of a built-in pipeline",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set prompts.limit=5",
    )
    p.add_argument("--out", metavar="DIR", help="run directory (default: the pipeline's output)")
    p.add_argument(
        "--retry-errors", action="store_true", help="redo requests that failed in an earlier run"
    )
    p.add_argument("--quiet", action="store_true", help="print only where the results are")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the model calls and tokens (and cost, with prices) each step still needs; "
        "loads no model and writes nothing",
    )
    p.set_defaults(func=run_command)


def find_pipeline(ref: str) -> Path:
    path = Path(ref)
    if path.is_file():
        return path
    builtin = resource_dir("pipelines") / (ref if ref.endswith(".yaml") else f"{ref}.yaml")
    if builtin.is_file():
        return builtin
    names = ", ".join(sorted(p.stem for p in resource_dir("pipelines").glob("*.yaml")))
    raise ConfigError(f"no pipeline file or built-in named '{ref}' (built-ins: {names})", file=ref)


def run_command(args: argparse.Namespace) -> int:
    from rlaif.calls.budget import EXIT_BUDGET, BudgetExceeded
    from rlaif.pipeline import load_pipeline, run_pipeline

    cfg = load_pipeline(find_pipeline(args.pipeline), args.overrides)
    if args.dry_run and cfg.steps:
        from rlaif.pipeline.estimate_steps import estimate_steps

        rows = estimate_steps(cfg, out=args.out, retry_errors=args.retry_errors)
        for p, est in rows:
            print(f"step {p.name} ({p.trainer or p.kind}):")
            print(textwrap.indent(format_estimate(est), "  "))
        print(_steps_total([est for _, est in rows]))
        return 0
    if args.dry_run:
        from rlaif.pipeline.estimate import estimate_pipeline

        print(format_estimate(estimate_pipeline(cfg, out=args.out, retry_errors=args.retry_errors)))
        return 0
    try:
        if cfg.steps:
            return _run_steps(cfg, args)
        result = run_pipeline(cfg, out=args.out, retry_errors=args.retry_errors)
    except BudgetExceeded as exc:
        print(f"rlaif: stopped: {exc}", file=sys.stderr)
        return EXIT_BUDGET
    m = result.manifest
    stats = result.stats
    print(f"\nrun dir: {result.run_dir}")
    for name, s in m.stages.items():
        reasons = "; ".join(
            f"{status} {reason}: {slot['count']}"
            for status, by_reason in s.reasons.items()
            for reason, slot in by_reason.items()
        )
        print(
            f"  {name:<16} ok {s.ok:>5}  error {s.error:>4}  skipped {s.skipped:>4}"
            + (f"  ({reasons})" if reasons else "")
        )
    print(
        f"  model calls {stats.get('model_calls', 0)}, cache hits {stats.get('cache_hits', 0)}, "
        f"generated tokens {stats.get('completion_tokens', 0)}, {result.seconds:.1f} s"
    )
    for name, info in result.exports.get("files", {}).items():
        print(f"  {name}: {info['rows']} rows -> {', '.join(info['paths'])}")
    filtered = result.exports.get("filtered") or {}
    if filtered:
        print("  filtered: " + "; ".join(f"{r}: {n}" for r, n in filtered.items()))
    prefs = result.exports.get("preferences")
    if prefs:
        splits = ", ".join(f"{s} {v['rows']}" for s, v in prefs["splits"].items())
        print(
            f"  preferences: {prefs['kept']} of {prefs['inputs']} judged pairs kept ({splits})"
            f" -> {prefs['export_dir']}"
        )
        if prefs["filtered"]:
            print("  filtered: " + "; ".join(f"{r}: {n}" for r, n in prefs["filtered"].items()))
    if not args.quiet:
        _show_rows(result.exports.get("pairs") or [], cfg.stages.export.show)
    return 0


def _run_steps(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    """A pipeline of ``steps:``: run them, then one line per step."""
    from rlaif.pipeline import run_steps

    result = run_steps(cfg, out=args.out, retry_errors=args.retry_errors)
    print(f"\nrun dir: {result.run_dir}")
    for o in result.steps:
        what = o.trainer or o.kind
        shown = [(k, v) for k, v in o.numbers.items() if v is not None and k != "seconds"]
        if o.kind == "eval":  # the policy's rates; the baseline's are in its eval.json
            shown = sorted(
                ((k, v) for k, v in shown if not k.startswith("baseline_")),
                key=lambda kv: kv[0] != "win_rate",  # the win rate first
            )
        numbers = ", ".join(f"{k.removeprefix('policy_')} {_short(v)}" for k, v in shown[:4])
        print(f"  {o.name:<22} {what:<6} {o.status:<8} {o.seconds:>8.1f} s  {numbers}")
    stats = result.stats
    print(
        f"  model calls {stats.get('model_calls', 0)}, cache hits {stats.get('cache_hits', 0)}, "
        f"{result.seconds:.1f} s; steps: {result.run_dir / 'steps.json'}"
    )
    if result.rounds:
        print(f"  by round: {result.run_dir / 'rounds.json'} (plot: rounds.png)")
    return 0


def _short(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _show_rows(pairs: list[dict], n: int) -> None:
    for row in pairs[:n]:
        prompt = row["prompt"][-1]["content"]
        print("\n" + "-" * 78)
        print(textwrap.shorten(f"PROMPT: {prompt}", 400))
        print(textwrap.shorten(f"REJECTED (initial): {row['rejected'][0]['content']}", 400))
        print(textwrap.shorten(f"CHOSEN (revised):   {row['chosen'][0]['content']}", 400))
    if pairs[:n]:
        print("-" * 78)


def _table(head: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    """Fixed-width rows: the first ``left`` columns flush left, the others flush right."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [head, *rows]
    ]


def format_estimate(est: Estimate) -> str:
    """The ``--dry-run`` report: one row per step that calls a model (data stages and
    evaluation), totals, one row per training step, notes and the budget."""
    if not est.stages and est.train:  # a training step of the steps: form
        return "\n".join(_train_lines(est))
    state = "has earlier work, not counted again" if est.started else "not started"
    lines = [
        f"dry run of pipeline '{est.pipeline}': {est.prompts} prompts, run dir {est.run_dir} "
        f"({state}); no model was loaded and nothing was written",
        *(f"tokens of {model}: {how}" for model, how in est.counting.items()),
        "",
    ]
    priced = est.budget.priced
    head = ["step", "model", "calls", "done", "prompt tokens", "max completion tokens"]
    rows = []
    for s in est.stages:
        model = s.model.rstrip("/").rsplit("/", 1)[-1]
        row = [s.name, model[:28], f"{s.calls:,}", f"{s.done:,}"]
        row += [("≤ " if s.bounded else "") + f"{s.prompt_tokens:,}", f"{s.completion_tokens:,}"]
        rows.append(row + ([f"≤ ${s.usage.cost(est.budget):,.4f}"] if priced else []))
    total = est.total
    bounded = any(s.bounded for s in est.stages)
    rows.append(
        ["total", "", f"{total.calls:,}", f"{est.done:,}"]
        + [("≤ " if bounded else "") + f"{total.prompt_tokens:,}", f"{total.completion_tokens:,}"]
        + ([f"≤ ${total.cost(est.budget):,.4f}"] if priced else [])
    )
    if priced:
        head.append("max cost (USD)")
    lines += _table(head, rows)
    lines.append("")
    if bounded:
        lines.append(
            "≤ an upper bound: these prompts hold model outputs not made yet, counted at their "
            "max_new_tokens; the other counts are exact."
        )
    lines.append(
        "calls: requests still to send, if every request succeeds; done: answered already "
        "(free on resume); max completion tokens: max_new_tokens x n per call."
    )
    if any(s.name == "eval judge" for s in est.stages):
        lines.append(
            "eval judge: 2 requests per prompt whose answers differ (both orders; identical "
            "answers are a tie without a call) + 2 per red-team answer (harm check)."
        )
    lines += est.notes
    if est.train:
        lines += ["", *_train_lines(est)]
    lines += _budget_lines(est)
    return "\n".join(lines)


def _steps_total(ests: list[Estimate]) -> str:
    """One line over every step of a ``steps:`` pipeline."""
    calls = sum(e.total.calls for e in ests)
    tokens = sum(e.total.tokens for e in ests)
    bound = "≤ " if any(s.bounded for e in ests for s in e.stages) else ""
    train = [t for e in ests for t in e.train if not t.done]
    steps = sum(t.steps or 0 for t in train)
    unknown = " (and steps not known yet)" if any(t.steps is None for t in train) else ""
    gens = sum(t.generations for t in train)
    return (
        f"all steps: {calls:,} model calls still to send ({bound}{tokens:,} tokens), "
        f"{len(train)} training steps to run: {steps:,} optimizer steps{unknown}, "
        f"{gens:,} online-RL completions"
    )


def _train_lines(est: Estimate) -> list[str]:
    """The training steps: optimizer steps, rows, tokens read, completions sampled, rewards."""
    head = ["training", "trainer", "steps", "rows", "tokens", "completions", "reward calls"]
    rows, basis = [], []
    for t in est.train:
        mark = "" if t.exact_steps else "≤ " if t.rows_bound else "≈ "
        steps = "?" if t.steps is None else mark + f"{t.steps:,}"
        if t.resumed:
            steps += f" (after {t.resumed:,})"
        reward = f"{t.reward_calls:,}" if t.reward_calls else "-"
        if t.judge_requests:
            reward += f" ({t.judge_requests:,} judge requests)"
        rows.append([
            t.name + (" (done)" if t.done else ""),
            t.trainer,
            steps,
            "?" if t.rows is None else ("≤ " if t.rows_bound else "") + f"{t.rows:,}",
            "?" if t.tokens is None else f"≈ {t.tokens:,}",
            f"{t.generations:,}" if t.generations else "-",
            reward,
        ])  # fmt: skip
        basis.append(f"  {t.name}: steps: {t.steps_basis}; rows: {t.rows_basis}"
                     + (f"; reward: {t.reward}" if t.reward else ""))  # fmt: skip
    return [
        *_table(head, rows),
        "",
        *basis,
        "steps: optimizer steps (ppo: rollout batches), exact when max_steps / total_steps set "
        "them; rows: training rows (pairs, chat rows or prompts);",
        "tokens: about what the trainer reads (prompts and responses; online RL: at most "
        "max_completion_length per completion); completions: sampled by online RL, each scored "
        "once by its reward;",
        "done: finished earlier, skipped on resume while its inputs are unchanged.",
    ]


def _budget_lines(est: Estimate) -> list[str]:
    b = est.budget
    if not b.active:
        spent = [f"spent so far in this run dir: {est.spent.describe(b)}"] if est.started else []
        return [
            *spent,
            "budget: none (add budget: {max_calls, max_tokens, max_cost_usd, prices} to cap)",
        ]
    after = est.spent + est.total  # the worst case for the run dir once this run is done
    caps, over = [], []
    for name, limit, value, money in (
        ("max_calls", b.max_calls, after.calls, False),
        ("max_tokens", b.max_tokens, after.tokens, False),
        ("max_cost_usd", b.max_cost_usd, after.cost(b), True),
    ):
        if limit is None:
            continue
        shown = f"${limit:g}" if money else f"{limit:,}"
        caps.append(f"{name} {shown}")
        if value > limit:
            over.append(f"budget.{name} ({f'${value:.4f}' if money else f'{value:,}'} > {shown})")
    if not est.total.calls:
        verdict = "nothing left to call"
    elif over:
        verdict = "it may stop early: the worst case would pass " + ", ".join(over)
    else:
        verdict = "the worst case fits every cap"
    return [
        f"budget (for the whole run dir): {', '.join(caps)}",
        f"  spent so far: {est.spent.describe(b)}",
        f"  this run at most: {est.total.describe(b)}",
        f"  {verdict}",
    ]
