"""Peak memory and time of the preference export, the former in-memory path vs the stream.

Both paths read the same synthetic judged pair records, made on the fly by a re-iterable source
(what the runner passes: records read back from disk; two pairs per prompt, distinct texts,
every record kept), and write every format of both variants with the default settings:

* ``memory``: the steps of the former export: every kept row in a list
  (``select_preferences``), the split over the list, per split and variant a
  ``datasets.Dataset.from_list`` written with ``save_to_disk`` and ``to_parquet``, JSONL from
  the list, the plot from the list;
* ``stream``: :func:`rlaif.export.export_preferences` as it is now (two passes, every file
  written row group by row group).

Each export runs in its own child process, so every peak is that export's alone. Printed side
by side: peak RSS, its growth over the child's RSS after imports, wall time; then the ratios
(memory / stream).

    python bench/export_stream.py --sizes 100000 1000000 --out bench/results/export_stream.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("memory", "stream")


class Synthetic:
    """``n`` judged pair records made on the fly; each ``iter`` starts over."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        from rlaif.stages.judge import Verdict

        for i in range(self.n):
            p = 0.6 + (i % 37) / 100
            p = p if i % 2 else 1 - p
            v = Verdict("ok", "a" if p > 0.5 else "b", p, p, p, True, 1, 2)
            yield {
                "id": f"pair-{i}",
                "prompt_id": f"prompt-{i // 2}",
                "prompt": [{"role": "user", "content": f"Question {i // 2}: how do I {i % 97}?"}],
                "x": f"Here is a careful answer number {i}, with some detail. " * 6,
                "y": f"A shorter reply {i}, less helpful. " * 5,
                "source": "samples",
                "verdict": v.to_dict(),
                "status": "ok",
            }


def _memory_export(records: Any, run_dir: Path) -> int:
    """The former export's steps, rows held in lists (see the module docstring)."""
    import datasets

    from rlaif.export.filters import SPLITS, PreferenceExportConfig, select_preferences
    from rlaif.export.preferences import _features, split_rows, variant_row
    from rlaif.export.sl_cai import write_jsonl
    from rlaif.export.stats import plot_margins

    datasets.disable_progress_bars()
    cfg = PreferenceExportConfig()
    rows = select_preferences(records, cfg).rows
    where = split_rows(rows, cfg.test_size, cfg.seed)
    by_split = {s: [r for r, w in zip(rows, where, strict=True) if w == s] for s in SPLITS}
    for variant in cfg.variants:
        folder = run_dir / variant
        folder.mkdir(parents=True)
        feats = _features(variant)
        split_rows_ = {s: [variant_row(r, variant) for r in by_split[s]] for s in SPLITS}
        dss = {s: datasets.Dataset.from_list(r, features=feats) for s, r in split_rows_.items()}
        datasets.DatasetDict(dss).save_to_disk(str(folder / "disk"))
        for s, r in split_rows_.items():
            write_jsonl(r, folder / f"{s}.jsonl")
            dss[s].to_parquet(str(folder / f"{s}.parquet"))
    plot_margins(rows, run_dir / "margins.png")
    return len(rows)


def _stream_export(records: Any, run_dir: Path) -> int:
    from rlaif.export.filters import PreferenceExportConfig
    from rlaif.export.preferences import export_preferences
    from rlaif.store import Manifest

    stats = export_preferences(records, run_dir, PreferenceExportConfig(), {}, Manifest())
    return stats["kept"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(path: str, n: int, work: Path) -> dict[str, Any]:
    """One export in this process; what it cost."""
    import datasets  # noqa: F401  (imports before the baseline, as in a pipeline process)
    import matplotlib.figure  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import rlaif.export.preferences  # noqa: F401

    base = _rss_mb()
    t = time.perf_counter()
    export = _memory_export if path == "memory" else _stream_export
    kept = export(Synthetic(n), work)
    seconds = time.perf_counter() - t
    size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
    return {"path": path, "records": n, "kept": kept, "seconds": round(seconds, 2),
            "peak_rss_mb": round(_rss_mb(), 1), "growth_mb": round(_rss_mb() - base, 1),
            "written_mb": round(size / 2**20, 1)}  # fmt: skip


def measure(path: str, n: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="export-stream-"))
    try:
        cmd = [sys.executable, __file__, "--child", path, "--sizes", str(n), "--work", str(work)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-3:]
            return {"path": path, "records": n, "error": " | ".join(tail)}
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(child(args.child, args.sizes[0], args.work / "run")))
        return
    results = []
    print(f"{'records':>9} {'path':<7} {'kept':>9} {'seconds':>8} {'peak RSS MB':>12} "
          f"{'growth MB':>10} {'written MB':>11}")  # fmt: skip
    for n in args.sizes:
        for path in args.paths:
            r = measure(path, n)
            results.append(r)
            if "error" in r:
                print(f"{n:>9} {path:<7} failed: {r['error']}")
                continue
            print(f"{n:>9} {path:<7} {r['kept']:>9} {r['seconds']:>8} {r['peak_rss_mb']:>12} "
                  f"{r['growth_mb']:>10} {r['written_mb']:>11}", flush=True)  # fmt: skip
    print("\nratios, memory / stream:")
    for n in args.sizes:
        got = {r["path"]: r for r in results if r["records"] == n and "error" not in r}
        if len(got) == 2:
            m, s = got["memory"], got["stream"]
            print(f"{n:>9}: peak RSS {m['peak_rss_mb'] / s['peak_rss_mb']:.2f}x, "
                  f"growth {m['growth_mb'] / max(s['growth_mb'], 1):.1f}x, "
                  f"time {m['seconds'] / s['seconds']:.2f}x")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
