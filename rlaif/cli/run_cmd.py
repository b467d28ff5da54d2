"""``rlaif run PIPELINE [--set key=value ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from rlaif.errors import ConfigError
from rlaif.resources import resource_dir


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
    from rlaif.pipeline import load_pipeline, run_pipeline

    cfg = load_pipeline(find_pipeline(args.pipeline), args.overrides)
    result = run_pipeline(cfg, out=args.out, retry_errors=args.retry_errors)
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
    if not args.quiet:
        _show_rows(result.exports.get("pairs") or [], cfg.stages.export.show)
    return 0


def _show_rows(pairs: list[dict], n: int) -> None:
    for row in pairs[:n]:
        prompt = row["prompt"][-1]["content"]
        print("\n" + "-" * 78)
        print(textwrap.shorten(f"PROMPT: {prompt}", 400))
        print(textwrap.shorten(f"REJECTED (initial): {row['rejected'][0]['content']}", 400))
        print(textwrap.shorten(f"CHOSEN (revised):   {row['chosen'][0]['content']}", 400))
    if pairs[:n]:
        print("-" * 78)
