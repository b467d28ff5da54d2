"""``rlaif eval``: the trained policy against its starting model on held-out prompts.

Example::

    rlaif eval --policy runs/dpo/model --baseline HuggingFaceTB/SmolLM2-135M-Instruct \\
        --red-team pipelines/data/redteam-heldout-50.jsonl \\
        --safe pipelines/data/xstest-safe-50.jsonl --out runs/eval

writes ``eval.json``, ``responses.jsonl`` and PNG plots into ``--out`` and prints a summary.
Every model call is cached in ``<out>/cache/calls.jsonl`` (reward scores in
``<out>/cache/reward.jsonl``): the same command again makes no model call and loads no model.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlaif.backends.base import Backend
from rlaif.errors import ConfigError, DataError, ModelError

BACKENDS = ("transformers", "fake", "vllm")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="policy vs its starting model: win rate, harmlessness, over-refusal, rewards",
        description="Generate greedy responses from the policy and the baseline on held-out "
        "prompts; report the AI judge's win rate (both orders), refusal and judged-harmless "
        "rates on red-team prompts, over-refusal on safe prompts that look unsafe, and "
        "reward-model score distributions. JSON plus plots.",
    )
    p.add_argument("--policy", required=True, metavar="MODEL", help="trained model id or folder")
    p.add_argument("--baseline", required=True, metavar="MODEL", help="starting model")
    p.add_argument("--judge", metavar="MODEL", help="judge model (default: the baseline)")
    p.add_argument("--reward-model", metavar="DIR", help="reward model folder to score responses")
    p.add_argument("--red-team", metavar="FILE", help="harmful prompts (JSONL/CSV, column prompt)")
    p.add_argument("--safe", metavar="FILE", help="safe prompts that look unsafe (XSTest-style)")
    p.add_argument("--prompts", metavar="FILE", help="general held-out prompts for the win rate")
    p.add_argument("--field", default="prompt", help="prompt column of the files (default prompt)")
    p.add_argument(
        "--label-field",
        metavar="COL",
        help="label column of --prompts (harmful, safe, ...) for rule-checked compliance",
    )
    p.add_argument("--limit", type=int, metavar="N", help="first N prompts of each file")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="T")
    p.add_argument("--constitution", default="helpful-harmless", metavar="NAME")
    p.add_argument(
        "--templates",
        metavar="DIR",
        help="folder whose respond / judge_mc / harm_check .jinja replace the built-in ones",
    )
    p.add_argument("--seed", type=int, default=0, help="picks each prompt's judge principle")
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument("--out", metavar="DIR", help="output folder (default runs/eval)")
    p.add_argument("--backend", default="transformers", metavar="|".join(BACKENDS))
    p.add_argument("--no-plots", action="store_true", help="eval.json only, no PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=eval_command)


def _factory(
    kind: str, model: str, batch_size: int
) -> tuple[str, str | None, Callable[[], Backend]]:
    """Model id and revision for cache keys (without loading), and a lazy backend factory."""
    from rlaif.backends import load_backend, resolve_model

    if kind not in BACKENDS:
        raise ModelError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
    if kind == "fake":
        return model, None, lambda: load_backend("fake", model)
    resolved = resolve_model(model)
    options = {"batch_size": batch_size} if kind == "transformers" else {}
    return resolved.model_id, resolved.revision, lambda: load_backend(kind, model, **options)


def _file_info(path: Path) -> dict[str, Any]:
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def eval_command(args: argparse.Namespace) -> int:
    from rlaif.calls.caller import ModelCaller
    from rlaif.constitution import load_constitution
    from rlaif.evaluate.policy_eval import (
        DEFINITIONS,
        REFUSAL_PATTERNS,
        REFUSAL_WINDOW,
        eval_metrics,
        format_summary,
        run_eval,
        template_hashes,
        write_eval,
    )
    from rlaif.prompts import PromptBook
    from rlaif.sources import read_prompts
    from rlaif.store import CallCache
    from rlaif.version import __version__

    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1", field=name)
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1", field="limit")
    files = {"prompts": args.prompts, "red_team": args.red_team, "safe": args.safe}
    files = {k: Path(v) for k, v in files.items() if v}
    if not files:
        raise ConfigError("nothing to evaluate: give --prompts, --red-team and/or --safe")
    constitution = load_constitution(args.constitution)
    sets, data = {}, {}
    for name, path in files.items():
        if path.is_dir():
            raise DataError("expected a prompt file, got a folder", file=path)
        label_field = args.label_field if name == "prompts" else None
        items, skipped = read_prompts(path, field=args.field, limit=args.limit,
                                      label_field=label_field)  # fmt: skip
        sets[name] = items
        data[name] = {**_file_info(path), "prompts": len(items), "skipped": len(skipped)}

    out = Path(args.out or "runs/eval")
    cache = CallCache(out / "cache" / "calls.jsonl")
    callers: dict[str, ModelCaller] = {}  # one caller (one loaded model) per distinct model

    def caller_for(model: str) -> ModelCaller:
        if model not in callers:
            mid, rev, factory = _factory(args.backend, model, args.batch_size)
            callers[model] = ModelCaller(
                factory, model=mid, revision=rev, cache=cache, batch_size=args.batch_size
            )
        return callers[model]

    policy, baseline = caller_for(args.policy), caller_for(args.baseline)
    judge = caller_for(args.judge or args.baseline)
    reward_fn, reward_info = None, None
    if args.reward_model:
        from rlaif.evaluate.rewards import reward_fn_for

        reward_fn, reward_info = reward_fn_for(args.reward_model, out / "cache" / "reward.jsonl")
    book = PromptBook(args.templates)
    start = time.monotonic()
    try:
        rows = run_eval(
            sets,
            policy,
            baseline,
            judge,
            constitution,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            reward_fn=reward_fn,
            book=book,
            quiet=args.quiet,
        )
    finally:
        for c in callers.values():
            c.close()
        cache.close()
    metrics = eval_metrics(rows)
    calls = {m: c.stats.to_dict() for m, c in callers.items()}
    report = {
        "rlaif_version": __version__,
        "models": {
            role: {"model": c.model, "revision": c.revision, "backend": args.backend}
            for role, c in (("policy", policy), ("baseline", baseline), ("judge", judge))
        },
        "reward_model": reward_info,
        "data": data,
        "config": {
            "max_new_tokens": args.max_new_tokens,
            "decoding": "greedy",
            "limit": args.limit,
            "seed": args.seed,
            "judge_mode": "logprob",
            "constitution": constitution.provenance(),
            "templates": template_hashes(book),
            "refusal_patterns": list(REFUSAL_PATTERNS),
            "refusal_window": REFUSAL_WINDOW,
        },
        "metrics": metrics,
        "definitions": DEFINITIONS,
        "calls": calls,
        "seconds": round(time.monotonic() - start, 3),
    }
    paths = write_eval(out, report, rows, plots=not args.no_plots)
    print(f"eval: policy {policy.model} vs baseline {baseline.model}, judge {judge.model}")
    print(format_summary(metrics))
    n_calls = sum(c["model_calls"] for c in calls.values())
    hits = sum(c["cache_hits"] for c in calls.values())
    print(f"model calls {n_calls}, cache hits {hits}, {report['seconds']:.1f} s")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    sys.stdout.flush()
    return 0
