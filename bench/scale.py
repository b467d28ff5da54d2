"""rlaif's own cost at scale: the RL-CAI chain on the fake backend (no model), 1k to 1M prompts.

The chain: sample ``--samples`` responses per prompt -> judge every pair under
``--principles`` principles, both orders -> preference export (jsonl + parquet). Each size runs
in its own child process: first run, then a re-run of the finished run, then (``--resume``)
a run killed part-way and resumed. Reported per size: seconds, peak RSS of the child (its
``ru_maxrss``), RSS after imports, the run folder's size, requests per second, and the
export's sha256 (the same for the first run, the re-run and the resume).

    python bench/scale.py --sizes 1000,10000,100000 --out bench/results/scale.json
    python bench/scale.py --sizes 1000000 --samples 2 --principles 1   # the short chain
    python bench/scale.py --sizes 100000 --execution ray                # Ray, same bytes
    python bench/scale.py --sizes 10000 --profile prof.txt              # where the time goes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PIPE = """\
name: scale
seed: 0
output: {out}
batch_size: {batch}
constitution: helpful-harmless
model: {{id: fake-model, backend: fake}}
prompts: {{path: {prompts}, field: prompt, id_field: id}}
execution: {{mode: {mode}, workers: 2}}
stages:
  sample: {{n: {samples}, temperature: 0.8, max_new_tokens: 32}}
  judge: {{principles_k: {principles}, pairs: all}}
  export:
    formats: [jsonl, parquet]
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.05}}
"""


def write_prompts(path: Path, n: int) -> None:
    if path.exists():
        with open(path, "rb") as fh:
            if sum(1 for _ in fh) == n:
                return
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(
                json.dumps({"id": f"p{i}", "prompt": f"How do I do task number {i} safely?"}) + "\n"
            )


def child(args: argparse.Namespace) -> None:
    """Run the pipeline once in this process and print one JSON line about it."""
    t_import = time.perf_counter()
    from rlaif.pipeline import load_pipeline, run_pipeline

    rss_imports = _rss_now()
    cfg = load_pipeline(Path(args.pipeline))
    t0 = time.perf_counter()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    with open(os.devnull, "w") as devnull:
        res = run_pipeline(cfg, stream=devnull)
    seconds = time.perf_counter() - t0
    if prof is not None:
        import pstats

        prof.disable()
        with open(args.profile, "w") as fh:
            pstats.Stats(prof, stream=fh).sort_stats("cumulative").print_stats(60)
            pstats.Stats(prof, stream=fh).sort_stats("tottime").print_stats(40)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "import_seconds": t0 - t_import,
                "peak_rss_mib": peak,
                "rss_after_imports_mib": rss_imports,
                "stats": res.stats,
            }
        )
    )


def _rss_now() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _export_hash(run: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((run / "export").rglob("*")):
        if p.is_file() and p.suffix in (".jsonl", ".parquet"):
            h.update(p.relative_to(run).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def run_child(pipeline: Path, profile: str | None, kill_after: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--pipeline", str(pipeline)]
    if profile:
        cmd += ["--profile", profile]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if kill_after is not None:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"killed_after_s": kill_after}
        return {"finished_before_kill": True}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--principles", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--execution", default="local", choices=["local", "ray"])
    ap.add_argument("--work", default="/tmp/rlaif-scale")
    ap.add_argument("--resume", action="store_true", help="also kill a run part-way and resume")
    ap.add_argument("--profile", help="cProfile the first run into this text file")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        prompts = work / f"prompts-{n}.jsonl"
        write_prompts(prompts, n)
        tag = f"{n}-{args.samples}x{args.principles}-{args.execution}"
        run = work / f"run-{tag}"
        shutil.rmtree(run, ignore_errors=True)
        pipe = work / f"pipe-{tag}.yaml"
        pipe.write_text(
            PIPE.format(
                out=run,
                batch=args.batch,
                prompts=prompts,
                samples=args.samples,
                principles=args.principles,
                mode=args.execution,
            )
        )
        first = run_child(pipe, args.profile)
        digest = _export_hash(run)
        size = _tree_bytes(run)
        again = run_child(pipe, None)
        same_again = _export_hash(run) == digest
        row = {
            "prompts": n,
            "chain": f"{args.samples} samples, {args.principles} principles, both orders",
            "execution": args.execution,
            "first_s": round(first["seconds"], 2),
            "rerun_s": round(again["seconds"], 2),
            "peak_rss_mib": round(first["peak_rss_mib"], 1),
            "rss_after_imports_mib": round(first["rss_after_imports_mib"], 1),
            "rerun_peak_rss_mib": round(again["peak_rss_mib"], 1),
            "run_dir_mib": round(size / 2**20, 1),
            "requests": first["stats"].get("requests", 0),
            "requests_per_s": round(first["stats"].get("requests", 0) / first["seconds"], 1),
            "export_sha256": digest,
            "rerun_same_bytes": same_again,
            "rerun_model_calls": again["stats"].get("model_calls"),
        }
        if args.resume:
            shutil.rmtree(run, ignore_errors=True)
            kill = max(1.0, first["seconds"] * 0.5)
            run_child(pipe, None, kill_after=kill + first["import_seconds"])
            resumed = run_child(pipe, None)
            row["resume_after_kill_s"] = round(resumed["seconds"], 2)
            row["resume_same_bytes"] = _export_hash(run) == digest
        rows.append(row)
        print(json.dumps(row), flush=True)
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
