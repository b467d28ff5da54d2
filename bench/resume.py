"""Re-running a finished pipeline: its time as a share of the first run (target <= 5 %).

Workload CAI-32 (as in ``generation.py``: 32 HH prompts, respond -> critique -> revise, greedy,
64 new tokens, SmolLM2-135M-Instruct on the transformers backend). The first run and each
re-run are the ``rlaif run`` command in a fresh process, as a user would type it, so both
include interpreter start and imports; the first also loads the model, a re-run should not.
Each re-run is checked: no model call (manifest), export files byte-identical. The in-process
figure (``run_pipeline`` on the finished directory, imports already done) is printed too.

    python bench/resume.py --out bench/results/resume.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.generation import (  # noqa: E402
    add_workload_args,
    busy_threads,
    machine,
    write_workload,
)


def tree_digest(folder: Path) -> str:
    """sha256 over every file's relative path and bytes under ``folder`` (sorted)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def model_calls(run_dir: Path) -> int:
    """Backend calls the last run made, from its manifest."""
    info = json.loads((run_dir / "manifest.json").read_text())
    calls = info.get("calls") or info.get("info", {}).get("calls") or {}
    return sum(int(c.get("model_calls", 0)) for c in calls.values())


def share(rerun_s: float, first_s: float) -> float:
    """A re-run's time as a fraction of the first run's."""
    return rerun_s / first_s


def timed_cli(pipe: Path, run_dir: Path, env: dict[str, str]) -> float:
    """Wall seconds of ``rlaif run PIPE --out RUN_DIR --quiet`` in a fresh process."""
    cmd = [sys.executable, "-m", "rlaif.cli.main", "run", str(pipe), "--out", str(run_dir)]
    t = time.perf_counter()
    subprocess.run([*cmd, "--quiet"], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--reruns", type=int, default=3)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    if not args.data.is_file():
        print(f"bench: data not found: {args.data} (needs ../shared beside the repo)")
        return 2

    work = Path(tempfile.mkdtemp(prefix="rlaif-bench-resume-"))
    _, pipe = write_workload(work, args)
    threads = busy_threads()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    run_dir = work / "run"
    loads = [os.getloadavg()[0]]
    first = timed_cli(pipe, run_dir, env)
    loads.append(os.getloadavg()[0])
    print(f"first run: {first:.1f} s ({model_calls(run_dir)} model calls)", flush=True)
    digest = tree_digest(run_dir / "export")
    reruns = []
    for k in range(args.reruns):
        s = timed_cli(pipe, run_dir, env)
        calls, same = model_calls(run_dir), tree_digest(run_dir / "export") == digest
        reruns.append({"seconds": s, "model_calls": calls, "exports_identical": same})
        print(
            f"re-run {k}: {s:.2f} s = {share(s, first):.1%} of the first "
            f"({calls} model calls, exports identical: {same})",
            flush=True,
        )
    loads.append(os.getloadavg()[0])
    from rlaif.pipeline import load_pipeline, run_pipeline

    t = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        run_pipeline(load_pipeline(pipe), out=run_dir, stream=quiet)
    in_process = time.perf_counter() - t
    median = statistics.median(r["seconds"] for r in reruns)
    summary: dict[str, Any] = {
        "workload": f"CAI-{args.prompts}, {args.tokens} new tokens, transformers backend",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "first_s": first,
        "reruns": reruns,
        "rerun_median_s": median,
        "rerun_share": share(median, first),
        "in_process_rerun_s": in_process,
        "in_process_share": share(in_process, first),
        "threads": threads,
        "load_average": loads,
        "machine": machine(),
    }
    print(
        f"\nre-run: {median:.2f} s = {summary['rerun_share']:.1%} of the first run ({first:.1f} s)"
        f"; in-process re-run {in_process:.2f} s = {summary['in_process_share']:.2%}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    ok = all(r["model_calls"] == 0 and r["exports_identical"] for r in reruns)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
