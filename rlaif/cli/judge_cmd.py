"""``rlaif judge audit``: measure an AI judge against human preference labels.

Example::

    rlaif judge audit --pairs dev-500.jsonl --format hh --principles all --out runs/audit-hh

writes ``audit.json``, ``judgements.jsonl`` and four PNG plots into ``--out`` and prints a
table. In logprob mode it also estimates the judge's prior for the option shown first
(``--calibrate pride``, the default there: from the same scored orders, no extra model call)
and shows the rates raw and calibrated side by side (a fifth plot, ``option_prior.png``).
Model calls are cached in ``<out>/cache/calls.jsonl``: the same command again makes no model
call (and loads no model).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rlaif.backends import DEFAULT_MODEL
from rlaif.backends.base import Backend, SamplingParams
from rlaif.errors import ConfigError, ModelError


def register(sub: argparse._SubParsersAction) -> None:
    judge = sub.add_parser("judge", help="AI-judge tools (audit against human labels)")
    judge_sub = judge.add_subparsers(dest="judge_command", metavar="COMMAND", required=True)
    p = judge_sub.add_parser(
        "audit",
        help="agreement, position and length bias of a judge on human-labelled pairs",
        description="Judge human-labelled comparisons in both orders and measure agreement, "
        "position consistency, first-position preference, ties, errors, length bias and "
        "calibration, overall and per principle.",
    )
    p.add_argument("--pairs", required=True, metavar="FILE", help="human-labelled comparisons")
    p.add_argument(
        "--format",
        required=True,
        metavar="hh|cai-mc|rlaif",
        help="hh: HH-RLHF chosen/rejected transcripts; cai-mc: CAI paper evals "
        "{prompt, corrects, incorrects}; rlaif: rlaif's preference export",
    )
    p.add_argument("--judge", default=DEFAULT_MODEL, metavar="MODEL", help="judge model id or path")
    p.add_argument(
        "--backend",
        default="transformers",
        metavar="transformers|vllm|fake",
        help="model backend (default: transformers)",
    )
    p.add_argument(
        "--constitution",
        default="helpful-harmless",
        metavar="NAME",
        help="constitution whose judge principles are used (name or YAML file)",
    )
    p.add_argument(
        "--principles",
        default="1",
        metavar="K|all",
        help="judge principles per pair: 'all' (per-principle metrics) or K sampled (default 1)",
    )
    p.add_argument(
        "--mode",
        default="logprob",
        metavar="logprob|reasoning",
        help="logprob: score the option letters (one forward pass an order); reasoning: the "
        "judge reasons, then answers 'Answer: A|B'",
    )
    p.add_argument(
        "--calibrate",
        metavar="none|pride|content_free",
        help="estimate the judge's prior for the option shown first and show every rate raw "
        "and calibrated: pride (from the audit's own pairs, no extra call; the default in "
        "logprob mode), content_free (requests with content-free responses), none (the "
        "default in reasoning mode)",
    )
    p.add_argument(
        "--calibration-sample",
        type=int,
        default=64,
        metavar="N",
        help="pairs (content_free: requests) the prior is estimated on (default 64)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="audit only the first N rows")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="requests per model call")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=512,
        metavar="T",
        help="reasoning mode: token budget of each judge reply",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling principles")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/audit-<file stem>)")
    p.add_argument("--no-plots", action="store_true", help="write audit.json only, no PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=audit_command)


def parse_principles(value: str) -> str | int:
    """``"all"`` or a positive integer."""
    if value.strip().lower() == "all":
        return "all"
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise ConfigError(
            f"--principles must be 'all' or a positive integer, got {value!r}", field="principles"
        )
    return k


def backend_factory(
    kind: str, model: str, batch_size: int
) -> tuple[str, str | None, Callable[[], Backend]]:
    """Model id and revision for cache keys (found without loading the model), and a factory
    that loads the backend on the first uncached call."""
    from rlaif.backends import BACKEND_KINDS, load_backend, resolve_model

    if kind not in BACKEND_KINDS:
        raise ModelError(
            f"unknown backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}", field="backend"
        )
    if kind == "fake":
        return model, None, lambda: load_backend("fake", model)
    resolved = resolve_model(model)
    options = {"batch_size": batch_size} if kind == "transformers" else {}
    return resolved.model_id, resolved.revision, lambda: load_backend(kind, model, **options)


def audit_command(args: argparse.Namespace) -> int:
    from rlaif.calls.caller import ModelCaller
    from rlaif.constitution import load_constitution
    from rlaif.evaluate.audit import run_audit
    from rlaif.evaluate.calibration_audit import calibrated_run, calibration_report, estimate_prior
    from rlaif.evaluate.pairs_io import read_comparisons
    from rlaif.evaluate.plots import audit_report, format_calibration, format_table, write_audit
    from rlaif.stages.calibrate import calibrated_config, check_settings
    from rlaif.stages.judge import JudgeConfig
    from rlaif.store import CallCache

    principles = parse_principles(args.principles)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}", field="batch_size")
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1", field="max_new_tokens")
    cfg = JudgeConfig(mode=args.mode, sampling=SamplingParams(max_new_tokens=args.max_new_tokens))
    method = args.calibrate or ("pride" if cfg.mode == "logprob" else "none")
    check_settings(method, args.calibration_sample, cfg.mode, cli=True)
    constitution = load_constitution(args.constitution)
    data = read_comparisons(args.pairs, args.format, args.limit)
    if not data.pairs and not data.mc_items:
        raise ConfigError(
            f"nothing to audit in {args.pairs}: every row was skipped ({data.skip_counts()})",
            field="pairs",
        )
    out = Path(args.out or f"runs/audit-{Path(args.pairs).stem}")
    model, revision, factory = backend_factory(args.backend, args.judge, args.batch_size)
    cache = CallCache(out / "cache" / "calls.jsonl")
    caller = ModelCaller(
        factory, model=model, revision=revision, cache=cache, batch_size=args.batch_size
    )
    start = time.monotonic()
    try:
        run = run_audit(
            data, caller, constitution, cfg, principles=principles, seed=args.seed, quiet=args.quiet
        )
        calibration = None
        if method != "none":
            prior = estimate_prior(run, method, args.calibration_sample, args.seed, data=data,
                                   constitution=constitution, caller=caller, cfg=cfg)  # fmt: skip
            ccfg = calibrated_config(cfg, prior)
            calibration = calibration_report(prior, ccfg, run, calibrated_run(run, ccfg))
    finally:
        caller.close()
        cache.close()
    report = audit_report(
        data,
        run,
        caller,
        constitution,
        cfg,
        principles=principles,
        seed=args.seed,
        seconds=time.monotonic() - start,
        backend=args.backend,
        calibration=calibration,
    )
    paths = write_audit(out, report, run, plots=not args.no_plots)
    skipped = data.skip_counts()
    print(
        f"judge audit: {model} ({cfg.mode}) on {args.pairs} [{args.format}]: "
        f"{len(data.pairs)} pairs, {len(data.mc_items)} multiple-choice items, "
        f"{sum(skipped.values())} rows skipped"
        + (f" ({'; '.join(f'{r}: {n}' for r, n in skipped.items())})" if skipped else "")
    )
    print(format_table(report["metrics"]))
    if calibration:
        print(format_calibration(calibration))
    s = caller.stats
    print(
        f"model calls {s.model_calls}, cache hits {s.cache_hits}, errors {s.errors}, "
        f"{report['seconds']:.1f} s"
    )
    print(f"wrote {', '.join(str(p) for p in paths)}")
    sys.stdout.flush()
    return 0
