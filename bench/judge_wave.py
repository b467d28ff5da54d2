"""rlaif's own cost per judge request: the RL-CAI judge wave on the fake backend, two code
versions side by side.

Each version runs in its own child process (``PYTHONPATH`` set to its checkout) on the same
pairs: ``--pairs`` synthetic pairs, each judged under ``--principles`` principles in both
orders (2 x principles score requests a pair), in waves of 512 pairs with a fresh call cache
and stage store, as a pipeline's judge stage does. CPU time (``time.process_time``) is
measured, not wall time, so a shared machine changes the figures less; the fake backend's own
CPU time (it hashes every request to make up scores) is measured apart and taken out:
"rlaif's own" is everything else (rendering, keys, the call cache, verdicts, record ids,
the store). The waves run as ``run_pipeline`` runs its stages: under ``run_gc`` (the
garbage collector's setting for a run) where the version has it. Versions alternate for
``--rounds`` rounds.

    python bench/judge_wave.py --before /tmp/old-checkout --pairs 6000 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_items(pairs: int) -> list:
    """``pairs`` synthetic pairs to judge; a prompt's six pairs share its conversation object,
    as the pipeline's pairs do."""
    from rlaif.pipeline.rl_cai import PairToJudge

    prompts = [[{"role": "user", "content": f"How do I do task number {n} safely?"}]
               for n in range(pairs // 6 + 1)]  # fmt: skip
    return [
        PairToJudge(
            f"p{k // 6}",
            prompts[k // 6],
            f"fake response {k:08x} with some words to judge",
            f"fake response {k + 1:08x} with other words to judge",
            "samples",
            k % 6,
            k % 6 + 1,
        )
        for k in range(pairs)
    ]


def run_waves(backend, items: list, principles: int, batch_size: int = 256) -> dict:  # type: ignore[no-untyped-def]
    """Judge ``items`` under ``principles`` principles in waves of 512 pairs, as a pipeline's
    judge stage does (fresh call cache and stage store): CPU and wall seconds."""
    from rlaif.calls.caller import ModelCaller
    from rlaif.constitution import load_constitution
    from rlaif.pipeline.rl_cai import judge_wave
    from rlaif.progress import Progress
    from rlaif.prompts import PromptBook
    from rlaif.stages import judge as J
    from rlaif.store import CallCache, StageStore

    try:  # run_pipeline runs its stages under run_gc (rlaif/pipeline/gc_tuning.py)
        from rlaif.pipeline.gc_tuning import run_gc
    except ImportError:  # code from before it
        run_gc = contextlib.nullcontext

    constitution = load_constitution("helpful-harmless")
    book = PromptBook(None)
    jcfg = J.JudgeConfig(principles_k=principles)
    with tempfile.TemporaryDirectory() as tmp, run_gc():
        cache = CallCache(Path(tmp) / "calls.jsonl")
        caller = ModelCaller(lambda: backend, model=backend.model_id, revision=None,
                             cache=cache, batch_size=batch_size)  # fmt: skip
        store = StageStore(Path(tmp), "judge")
        progress = Progress(None, "judge", quiet=True)
        t0 = time.process_time()
        w0 = time.perf_counter()
        for start in range(0, len(items), 512):
            judge_wave(items[start : start + 512], jcfg, constitution, book, None, 0, caller,
                       store, progress)  # fmt: skip
        cpu = time.process_time() - t0
        wall = time.perf_counter() - w0
        store.close()
        cache.close()
    return {"requests": len(items) * principles * 2, "cpu_s": cpu, "wall_s": wall}


def child(pairs: int, principles: int) -> dict:
    from rlaif.backends.fake import FakeBackend

    fake_cpu = [0.0]

    class TimedFake(FakeBackend):
        def score_choices(self, conversations, choices):  # type: ignore[no-untyped-def]
            t = time.process_time()
            try:
                return super().score_choices(conversations, choices)
            finally:
                fake_cpu[0] += time.process_time() - t

    res = run_waves(TimedFake(model_id="fake-model"), make_items(pairs), principles)
    requests, cpu = res["requests"], res["cpu_s"]
    own = cpu - fake_cpu[0]
    return {
        "requests": requests,
        "cpu_s": round(cpu, 3),
        "wall_s": round(res["wall_s"], 3),
        "fake_cpu_s": round(fake_cpu[0], 3),
        "own_cpu_s": round(own, 3),
        "own_requests_per_cpu_s": round(requests / own, 1),
        "own_us_per_request": round(own / requests * 1e6, 1),
    }


def run_version(code: Path, pairs: int, principles: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, __file__, "--child", "--pairs", str(pairs),
           "--principles", str(principles)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{code}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="checkout of the code to compare with (PYTHONPATH)")
    ap.add_argument("--after", default=str(ROOT))
    ap.add_argument("--pairs", type=int, default=6000)
    ap.add_argument("--principles", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.pairs, args.principles)))
        return
    versions = {"after": Path(args.after)}
    if args.before:
        versions = {"before": Path(args.before), **versions}
    runs: dict[str, list[dict]] = {v: [] for v in versions}
    for r in range(args.rounds):
        for name, code in versions.items():
            res = run_version(code, args.pairs, args.principles)
            runs[name].append(res)
            print(json.dumps({"round": r + 1, "version": name, **res}), flush=True)
    best = {v: min(rs, key=lambda x: x["own_cpu_s"]) for v, rs in runs.items()}
    summary = {v: {k: b[k] for k in ("own_us_per_request", "own_requests_per_cpu_s",
                                      "fake_cpu_s", "cpu_s")}
               for v, b in best.items()}  # fmt: skip
    if "before" in best:
        summary["ratio_own_throughput"] = round(
            best["after"]["own_requests_per_cpu_s"] / best["before"]["own_requests_per_cpu_s"], 2
        )
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
