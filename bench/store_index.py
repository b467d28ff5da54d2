"""The record store's and the call cache's id index: in-memory dict (before) vs SQLite (now).

Each variant runs in its own child process per phase, so peak RSS (``ru_maxrss``) is the
phase's own: ``write`` appends N records (stage: batches of 256 through ``append``; cache:
``put_many`` of 256), ``open`` reopens the finished files and looks ids up (per id, then in
batches where the variant has a batch API, then reads records), ``rebuild`` (index only)
opens after the index file was deleted. The "dict" variant is the previous implementation's
approach (parse every line at open into ``id -> packed (shard, offset, status)``), written
here on the same JSONL primitives. Printed: one row per (what, N, variant) and the
index/dict ratios.

    python bench/store_index.py --sizes 100000,1000000
    python bench/store_index.py --sizes 100000 --what stage --out bench/results/store_index.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
LOOKUPS = 100_000
READS = 10_000


def rid(i: int) -> str:
    return hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest()  # like record ids


def record(i: int, text: int) -> dict:
    return {"id": rid(i), "status": "ok" if i % 10 else "error", "reason": "x", "t": "y" * text}


# -- the previous approach: a dict built by reading every line at open -------------------------


class DictStage:
    """One shard list and ``id -> packed (shard, offset, code)``, as the old StageStore kept."""

    def __init__(self, folder: Path, shard_size: int = 10_000) -> None:
        from rlaif.store.jsonl import JsonlReader
        from rlaif.store.records import CODE, record_problem

        self.folder, self.shard_size = folder, shard_size
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, int] = {}
        self.shards = sorted(folder.glob("shard-*.jsonl"))
        self.last_lines, self.writer, self.fds = 0, None, {}
        for i, shard in enumerate(self.shards):
            reader = JsonlReader(shard, validate=record_problem)
            for offset, rec in reader:
                self.index[rec["id"]] = (((i << 40) | offset) << 2) | CODE[rec["status"]]
            self.last_lines = reader.lines

    def append(self, records: list[dict]) -> None:
        from rlaif.store.jsonl import JsonlAppender
        from rlaif.store.records import encode_record

        batch = []
        for pos, rec in enumerate(records):
            r, code, data = encode_record(rec, pos)
            prior = self.index.get(r)
            if prior is None or prior & 3 == 1:
                batch.append((r, code, data))
        while batch:
            if self.writer is None or self.last_lines >= self.shard_size:
                if self.writer is not None:
                    self.writer.close()
                if not self.shards or self.last_lines >= self.shard_size:
                    self.shards.append(self.folder / f"shard-{len(self.shards):05d}.jsonl")
                    self.last_lines = 0
                self.writer = JsonlAppender(self.shards[-1])
            part, batch = (
                batch[: self.shard_size - self.last_lines],
                batch[self.shard_size - self.last_lines :],
            )
            offset = self.writer.append(b"".join(d for _, _, d in part))
            shard = len(self.shards) - 1
            for r, code, data in part:
                self.index[r] = (((shard << 40) | offset) << 2) | code
                offset += len(data)
            self.last_lines += len(part)

    def is_done(self, r: str) -> bool:
        v = self.index.get(r)
        return v is not None and v & 3 != 1

    def get(self, r: str) -> dict | None:
        from rlaif.store.jsonl import decode_line, read_line_at

        v = self.index.get(r)
        if v is None:
            return None
        shard, offset = v >> 42, (v >> 2) & ((1 << 40) - 1)
        fd = self.fds.get(shard) or self.fds.setdefault(shard, os.open(self.shards[shard], 0))
        return decode_line(read_line_at(fd, offset))

    def __len__(self) -> int:
        return len(self.index)


class DictCache:
    """``key -> offset`` of one JSONL file, as the old CallCache kept."""

    def __init__(self, path: Path) -> None:
        from rlaif.store.jsonl import JsonlAppender, JsonlReader

        self.path, self.index, self.fd = path, {}, None
        for offset, entry in JsonlReader(path):
            self.index.setdefault(entry["key"], offset)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = JsonlAppender(path)

    def put_many(self, items: dict) -> None:
        from rlaif.store.jsonl import encode_line

        lines = [(k, encode_line({"key": k, "value": v})) for k, v in items.items()]
        lines = [(k, d) for k, d in lines if k not in self.index]
        offset = self.writer.append(b"".join(d for _, d in lines))
        for k, d in lines:
            self.index.setdefault(k, offset)
            offset += len(d)

    def get(self, key: str):
        from rlaif.store.jsonl import decode_line, read_line_at

        off = self.index.get(key)
        if off is None:
            return None
        self.fd = self.fd or os.open(self.path, 0)
        return decode_line(read_line_at(self.fd, off))["value"]

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)


# -- one phase in a child process -----------------------------------------------------------------


def _open(what: str, variant: str, work: Path):
    from rlaif.store import CallCache, StageStore

    if what == "stage":
        return DictStage(work / "stages" / "s") if variant == "dict" else StageStore(work, "s")
    path = work / "cache" / "calls.jsonl"
    return DictCache(path) if variant == "dict" else CallCache(path)


def child(what: str, variant: str, phase: str, n: int, work: Path, text: int) -> dict:
    import rlaif.store  # noqa: F401 - imports are not part of the open time

    out: dict = {}
    t0 = time.perf_counter()
    if phase == "rebuild":
        name = "stages/s/index.sqlite" if what == "stage" else "cache/calls.index.sqlite"
        (work / name).unlink()
    store = _open(what, variant, work)
    out["open_s"] = time.perf_counter() - t0
    if phase == "write":
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            recs = [record(i, text) for i in range(start, min(n, start + BATCH))]
            if what == "stage":
                store.append(recs)
            else:
                store.put_many({r["id"]: r for r in recs})
        out["write_s"] = time.perf_counter() - t0
    else:
        rng = random.Random(0)
        ids = [rid(i) for i in rng.sample(range(2 * n), LOOKUPS)]  # half of them absent
        t0 = time.perf_counter()
        if what == "stage":
            hit = sum(store.is_done(r) for r in ids)
        else:
            hit = sum(r in store for r in ids)
        out["lookup_us"] = (time.perf_counter() - t0) / LOOKUPS * 1e6
        if variant == "index":
            t0 = time.perf_counter()
            many = [ids[i : i + BATCH] for i in range(0, LOOKUPS, BATCH)]
            if what == "stage":
                got = sum(len(store.done_many(b)) for b in many)
            else:
                got = sum(len(store.contains_many(b)) for b in many)
            out["batch_lookup_us"] = (time.perf_counter() - t0) / LOOKUPS * 1e6
            assert got == hit, (got, hit)
        present = [rid(rng.randrange(n)) for _ in range(READS)]
        t0 = time.perf_counter()
        assert all(store.get(r) is not None for r in present)
        out["read_us"] = (time.perf_counter() - t0) / READS * 1e6
        out["records"] = len(store)
        out["found"] = hit
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_child(*args: object) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--what", default="stage,cache")
    ap.add_argument("--text", type=int, default=100, help="bytes of text per record")
    ap.add_argument("--work", default="/tmp/rlaif-store-index")
    ap.add_argument("--out")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, variant, phase, n, work, text = args.child
        print(json.dumps(child(what, variant, phase, int(n), Path(work), int(text))))
        return
    rows = []
    for what in args.what.split(","):
        for n in [int(s) for s in args.sizes.split(",")]:
            pair = {}
            for variant in ("dict", "index"):
                work = Path(args.work) / f"{what}-{n}-{variant}"
                shutil.rmtree(work, ignore_errors=True)
                row = {"what": what, "n": n, "variant": variant}
                for phase in ("write", "open") + (("rebuild",) if variant == "index" else ()):
                    got = run_child(what, variant, phase, n, work, args.text)
                    row.update({f"{phase}.{k}": round(v, 3) for k, v in got.items()})
                row["disk_mib"] = round(
                    sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) / 2**20, 1
                )
                pair[variant] = row
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(work, ignore_errors=True)
            d, x = pair["dict"], pair["index"]
            ratios = {
                "what": what,
                "n": n,
                "ratios index/dict": {
                    k: round(x[k] / d[k], 2)
                    for k in (
                        "write.write_s",
                        "write.peak_rss_mib",
                        "open.open_s",
                        "open.peak_rss_mib",
                        "open.lookup_us",
                        "open.read_us",
                        "disk_mib",
                    )
                    if d.get(k)
                },
                "index batch lookup / dict lookup": round(
                    x["open.batch_lookup_us"] / d["open.lookup_us"], 2
                ),
                "index rebuild_s / dict open_s": round(x["rebuild.open_s"] / d["open.open_s"], 2),
            }
            rows.append(ratios)
            print(json.dumps(ratios), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
