"""Peak memory of reading prompts from a dataset repository, streaming vs prepared.

Builds a local dataset laid out as a Hub repository (a README with ``configs:`` front matter
and ``--shards`` parquet shards of ``--rows`` short prompts), then reads it through
:mod:`rlaif.sources.hub` three ways, each once with ``streaming: true`` and once without
(``datasets`` first writes the whole set to its Arrow cache, then memory-maps it):

* ``first N``: the first ``--first`` prompts (``prompts.limit``), what a small run reads;
* ``all prompts``: every prompt, kept as prompt items (what a pipeline holds);
* ``all rows``: every row iterated and dropped (what a consumer that streams would hold).

Each reading runs in its own child process with its own empty datasets cache, so every peak
is that reading's alone. Printed side by side: peak RSS, its growth over the child's RSS after
imports (``datasets``, and torch, which ``datasets``' streaming imports when installed, as a
pipeline process has loaded anyway), wall time, and the cache written; then the ratios
(prepared / streaming).

    python bench/hub_prompts.py --rows 1000000 --out bench/results/hub_prompts.json
    python bench/hub_prompts.py --rows 2000000 --modes first,all-rows   # is streaming flat?
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

README = """\
---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---
# Short prompts for the streaming bench
"""
MODES = ("first", "all-items", "all-rows")


def build(repo: Path, rows: int, shards: int) -> int:
    """The dataset repository: ``shards`` parquet files of short prompts; returns its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (repo / "data").mkdir(parents=True, exist_ok=True)
    (repo / "README.md").write_text(README, encoding="utf-8")
    per = -(-rows // shards)
    for k in range(shards):
        ids = range(k * per, min(rows, (k + 1) * per))
        table = pa.table(
            {
                "prompt": [f"How do I do task number {i} safely and well?" for i in ids],
                "id": [f"p{i}" for i in ids],
            }
        )
        name = f"train-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, repo / "data" / name, row_group_size=10_000)
    return sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())


def rss_now() -> int:
    """This process's resident set, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(repo: str, mode: str, streaming: bool, first: int) -> dict[str, Any]:
    """One reading, in this (fresh) process; the parent set HF_DATASETS_CACHE."""
    sys.path.insert(0, str(ROOT))
    import importlib.util

    import datasets  # noqa: F401  # imports are the baseline: a pipeline has them loaded

    from rlaif.sources import read_dataset
    from rlaif.sources.hub import DatasetSpec, resolve_dataset

    if importlib.util.find_spec("torch") is not None:
        import torch  # noqa: F401  # datasets' streaming imports it; a local model has it loaded

    base = rss_now()
    t0 = time.perf_counter()
    ds = resolve_dataset(DatasetSpec("bench", repo, True, streaming=streaming))
    if mode == "all-rows":
        count = sum(1 for _ in ds.rows(0, ["prompt", "id"]))
    else:
        limit = first if mode == "first" else None
        count = len(read_dataset(ds, id_field="id", limit=limit).items)
    seconds = time.perf_counter() - t0
    return {"count": count, "seconds": seconds, "base_rss": base, "peak_rss": peak_rss()}


def run_child(repo: Path, mode: str, streaming: bool, first: int) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix="hub-bench-cache-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, __file__, "--child", str(repo), mode, str(int(streaming)), str(first)]
    try:
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"mode": mode, "streaming": streaming, **result}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def ratio(a: float, b: float) -> float | None:
    """``a / b``, or None when ``b`` is not positive."""
    return round(a / b, 2) if b > 0 else None


def table(
    results: list[dict[str, Any]], first: int, modes: tuple[str, ...] = MODES
) -> tuple[str, dict[str, Any]]:
    """The side-by-side table and the prepared / streaming ratios of each mode."""
    names = {"first": f"first {first:,} prompts", "all-items": "all prompts (kept)",
             "all-rows": "all rows (iterated)"}  # fmt: skip
    lines = [
        "| reading | streaming | prompts | peak RSS | growth over imports | seconds | cache |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios: dict[str, Any] = {}
    for mode in modes:
        pair = {r["streaming"]: r for r in results if r["mode"] == mode}
        for streaming in (True, False):
            r = pair[streaming]
            lines.append(
                f"| {names[mode]} | {'yes' if streaming else 'no'} | {r['count']:,} | "
                f"{mib(r['peak_rss'])} | {mib(r['peak_rss'] - r['base_rss'])} | "
                f"{r['seconds']:.1f} | {mib(r['cache_bytes'])} |"
            )
        s, p = pair[True], pair[False]
        ratios[mode] = {
            "peak_rss": ratio(p["peak_rss"], s["peak_rss"]),
            "growth": ratio(p["peak_rss"] - p["base_rss"], s["peak_rss"] - s["base_rss"]),
            "seconds": ratio(p["seconds"], s["seconds"]),
        }
    lines += ["", "| reading | prepared / streaming: peak RSS | growth | seconds |",
              "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for mode in modes:
        r = ratios[mode]
        lines.append(f"| {names[mode]} | {r['peak_rss']} | {r['growth']} | {r['seconds']} |")
    return "\n".join(lines), ratios


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        repo, mode, streaming, first = sys.argv[2:6]
        print(json.dumps(child(repo, mode, streaming == "1", int(first))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="prompts in the dataset")
    ap.add_argument("--shards", type=int, default=16, help="parquet files")
    ap.add_argument("--first", type=int, default=1000, help="prompts read by the 'first' mode")
    ap.add_argument("--modes", default=",".join(MODES), help=f"some of {', '.join(MODES)}")
    ap.add_argument("--out", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    work = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    try:
        size = build(work / "repo", args.rows, args.shards)
        print(f"dataset: {args.rows:,} prompts in {args.shards} parquet shards, {mib(size)}",
              flush=True)  # fmt: skip
        results = []
        for mode in modes:
            for streaming in (True, False):  # pairs side by side, streaming first
                results.append(run_child(work / "repo", mode, streaming, args.first))
                r = results[-1]
                print(f"  {mode} streaming={streaming}: {mib(r['peak_rss'])} peak, "
                      f"{r['seconds']:.1f} s", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text, ratios = table(results, args.first, modes)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"rows": args.rows, "shards": args.shards, "first": args.first,
                "dataset_bytes": size, "results": results, "ratios": ratios}  # fmt: skip
        args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
