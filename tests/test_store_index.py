"""Tests for the persisted indexes of rlaif.store (``index.sqlite`` / ``calls.index.sqlite``).

The JSONL is the source of truth: whatever happens to an index (deleted, truncated, garbage,
lagging after a crash, from another file) a store answers exactly what a full read of the
JSONL answers, and memory does not grow with the number of records.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from rlaif.errors import StoreError
from rlaif.store import CallCache, StageStore
from rlaif.store import index as index_mod

REPO = Path(__file__).resolve().parents[1]


def ok(rid: str, **extra: object) -> dict:
    return {"id": rid, "status": "ok", **extra}


def err(rid: str, reason: str = "boom") -> dict:
    return {"id": rid, "status": "error", "reason": reason}


def stage_dir(run: Path, stage: str = "s") -> Path:
    return run / "stages" / stage


def snapshot(store: StageStore) -> dict:
    """Everything a store answers, for comparing two stores over the same shards."""
    ids = sorted({r["id"] for r in store.iter_records(all_versions=True)})
    return {
        "len": len(store),
        "counts": store.counts(),
        "done": sorted(store.done_ids()),
        "records": list(store.iter_records()),
        "get": {rid: store.get(rid) for rid in ids},
        "status": {rid: store.status_of(rid) for rid in ids},
    }


def reference(shards: list[Path], retry_errors: bool = True) -> dict:
    """The old semantics, computed from the JSONL alone (newest line per id wins)."""
    newest: dict[str, tuple[int, dict]] = {}
    order = 0
    for shard in shards:
        for line in shard.read_bytes().splitlines():
            rec = json.loads(line)
            newest[rec["id"]] = (order, rec)
            order += 1
    recs = [rec for _, rec in sorted(newest.values(), key=lambda x: x[0])]
    counts = {s: sum(r["status"] == s for r in recs) for s in ("ok", "error", "skipped")}
    done = sorted(r["id"] for r in recs if r["status"] != "error" or not retry_errors)
    return {"len": len(recs), "counts": counts, "done": done, "records": recs}


def fill(run: Path, n: int, *, batch: int = 256, shard_size: int = 10_000) -> None:
    with StageStore(run, "s", shard_size=shard_size) as store:
        for start in range(0, n, batch):
            store.append(ok(f"r{i}", n=i) for i in range(start, min(n, start + batch)))


# -- rebuilding -------------------------------------------------------------------------------


def _delete(ix: Path) -> None:
    ix.unlink()


def _truncate(ix: Path) -> None:
    with open(ix, "r+b") as fh:
        fh.truncate(ix.stat().st_size // 2)


def _garbage(ix: Path) -> None:
    ix.write_bytes(b"this is not a database\n" * 100)


def _zero_header(ix: Path) -> None:
    with open(ix, "r+b") as fh:
        fh.write(b"\x00" * 100)


@pytest.mark.parametrize("damage", [_delete, _truncate, _garbage, _zero_header])
def test_stage_index_is_rebuilt_after_damage(tmp_path, damage, caplog):
    fill(tmp_path, 3000, shard_size=700)
    with StageStore(tmp_path, "s") as store:
        store.append([err("r5"), err("x1"), {"id": "sk", "status": "skipped", "reason": "long"}])
        assert store.status_of("r5") == "ok"  # the error was dropped: r5 was done
        before = snapshot(store)
    ix = stage_dir(tmp_path) / "index.sqlite"
    damage(ix)
    with caplog.at_level(logging.INFO, logger="rlaif.store"):
        store = StageStore(tmp_path, "s", shard_size=700)
    notes = [r.getMessage() for r in caplog.records if "index" in r.getMessage()]
    assert len(notes) == 1 and "building it from the JSONL" in notes[0], notes
    assert snapshot(store) == before
    assert store.append([ok("x1")]) == 1 and store.append([ok("r6")]) == 0
    store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlaif.store"), StageStore(tmp_path, "s") as again:
        assert again.get("x1") == ok("x1") and len(again) == 3002
    assert not [r for r in caplog.records if "index" in r.getMessage()]  # usable again


def test_damage_found_after_open_is_repaired_not_raised(tmp_path):
    fill(tmp_path, 2000)
    with StageStore(tmp_path, "s") as store:
        assert store.get("r1") == ok("r1", n=1)
        _garbage(stage_dir(tmp_path) / "index.sqlite")  # under an open store
        assert store.get("r1999") == ok("r1999", n=1999)
        assert len(store) == 2000 and store.is_done("r7")


def test_index_pointing_at_the_wrong_line_is_rebuilt(tmp_path):
    fill(tmp_path, 50)
    ix = index_mod.Index(stage_dir(tmp_path) / "index.sqlite", "stage")
    assert ix.open() is None
    with ix.writing():  # r1 now points at r2's line: get() reads and checks the id
        ix.conn.execute("UPDATE ix.recs SET loc = (SELECT loc FROM ix.recs WHERE id='r2') "
                        "WHERE id='r1'")  # fmt: skip
    ix.close()
    with StageStore(tmp_path, "s") as store:
        assert store.get("r1") == ok("r1", n=1)
        assert store.get_many(["r1", "r2"]) == {"r1": ok("r1", n=1), "r2": ok("r2", n=2)}


def test_index_claiming_more_bytes_than_the_file_is_rebuilt(tmp_path, caplog):
    fill(tmp_path, 100)
    shard = stage_dir(tmp_path) / "shard-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(b"".join(lines[:40]))  # the file was replaced by a shorter one
    with caplog.at_level(logging.WARNING, logger="rlaif.store"), StageStore(tmp_path, "s") as s:
        assert len(s) == 40 and "r39" in s and "r40" not in s
        assert s.append([ok("r40")]) == 1
    assert any("claims" in r.getMessage() for r in caplog.records)


def test_a_shard_edited_in_place_is_noticed(tmp_path):
    fill(tmp_path, 20)
    shard = stage_dir(tmp_path) / "shard-00000.jsonl"
    data = shard.read_bytes()
    edited = data.replace(b'{"id":"r7","status":"ok","n":7}', b'{"id":"r7","status":"ok","n":8}')
    assert edited != data and len(edited) == len(data)
    os.utime(shard, ns=(0, shard.stat().st_mtime_ns + 10**9))
    shard.write_bytes(edited)
    with StageStore(tmp_path, "s") as store:
        assert store.get("r7") == ok("r7", n=8)


def test_a_deleted_shard_rebuilds_and_a_new_shard_is_caught_up(tmp_path):
    fill(tmp_path, 30, shard_size=10)
    folder = stage_dir(tmp_path)
    (folder / "shard-00001.jsonl").unlink()
    with StageStore(tmp_path, "s", shard_size=10) as store:
        assert len(store) == 20 and "r15" not in store and "r25" in store
    (folder / "shard-00003.jsonl").write_text(json.dumps(ok("new")) + "\n")
    with StageStore(tmp_path, "s", shard_size=10) as store:
        assert store.get("new") == ok("new") and len(store) == 21


# -- catching up after a crash ----------------------------------------------------------------


def test_lines_written_after_the_index_are_caught_up(tmp_path):
    """A crash between the JSONL fsync and the index update: the tail is indexed at open."""
    fill(tmp_path, 100)
    shard = stage_dir(tmp_path) / "shard-00000.jsonl"
    ix = stage_dir(tmp_path) / "index.sqlite"
    before = ix.read_bytes()
    with open(shard, "ab") as fh:  # committed lines the index never saw, then a torn one
        fh.write(b"".join(json.dumps(r).encode() + b"\n" for r in [ok("t1"), err("r3"), err("t2")]))
        fh.write(b'{"id":"t3","stat')
    with StageStore(tmp_path, "s", readonly=True) as reader:  # sees them, writes nothing
        assert "t1" in reader.done_ids() and reader.status_of("t2") == "error"
        assert reader.counts() == {"ok": 100, "error": 2, "skipped": 0}
    assert ix.read_bytes() == before
    with StageStore(tmp_path, "s") as store:
        assert store.get("t1") == ok("t1") and store.status_of("t2") == "error"
        assert store.status_of("r3") == "error"  # the newest line wins, as in a full read
        assert "t3" not in store and len(store) == 102
        assert store.counts() == {"ok": 100, "error": 2, "skipped": 0}
    assert shard.read_bytes().endswith(b"\n")
    assert snapshot(StageStore(tmp_path, "s", readonly=True)) | {"get": 0, "status": 0} == (
        reference([shard]) | {"get": 0, "status": 0}
    )


def test_a_failed_index_write_keeps_the_records_and_catches_up(tmp_path, monkeypatch):
    store = StageStore(tmp_path, "s")
    store.append([ok("a")])
    real = index_mod.Index.apply

    def broken(self, *args, **kwargs):
        raise index_mod.sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(index_mod.Index, "apply", broken)
    with pytest.raises(StoreError, match="records were written but the index could not"):
        store.append([ok("b"), err("c")])
    monkeypatch.setattr(index_mod.Index, "apply", real)
    assert store.append([ok("b"), ok("c")]) == 1  # b was written: not duplicated; c retried
    assert store.counts() == {"ok": 3, "error": 0, "skipped": 0}
    store.close()
    shard = stage_dir(tmp_path) / "shard-00000.jsonl"
    assert [json.loads(x)["id"] for x in shard.read_text().splitlines()] == ["a", "b", "c", "c"]


def test_a_buffer_that_cannot_be_written_is_caught_up_later(tmp_path, monkeypatch, caplog):
    """The only writer of a stage buffers index rows; when writing them fails (full disk),
    the records stay, the store keeps answering, and the next open catches up."""
    monkeypatch.setattr(index_mod, "FLUSH", 3)
    real = index_mod.Index.flush

    def broken(self):
        if self.buffered and self._pending:
            raise index_mod.sqlite3.OperationalError("database or disk is full")
        real(self)

    store = StageStore(tmp_path, "s")
    store.append([ok("a")])
    monkeypatch.setattr(index_mod.Index, "flush", broken)
    with pytest.raises(StoreError, match="disk is full"):
        store.append([ok("b"), ok("c"), err("d")])
    monkeypatch.setattr(index_mod.Index, "flush", real)  # space was freed
    assert store.append([ok("b"), ok("e")]) == 1  # b, c, d were written and are known
    assert store.counts() == {"ok": 4, "error": 1, "skipped": 0}
    store.append([ok("f")])
    monkeypatch.setattr(index_mod.Index, "flush", broken)
    with caplog.at_level(logging.WARNING, logger="rlaif.store"):
        store.close()  # the buffer cannot be written: one warning, nothing raised
    assert any("caught up at the next open" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(index_mod.Index, "flush", real)
    with StageStore(tmp_path, "s") as again:
        assert again.counts() == {"ok": 5, "error": 1, "skipped": 0}
        assert again.append([ok("f"), ok("d")]) == 1


# -- semantics against the reference ------------------------------------------------------------


@pytest.mark.parametrize("retry_errors", [True, False])
def test_random_histories_match_a_full_read(tmp_path, retry_errors):
    """Random batches (repeats, errors, retries), reopened at random points, index damaged at
    random: every answer equals the old full-read semantics."""
    rng = random.Random(7)
    ids = [f"id{i}" for i in range(60)]
    store = StageStore(tmp_path, "s", shard_size=17, retry_errors=retry_errors)
    for step in range(40):
        batch = []
        for rid in rng.sample(ids, rng.randint(1, 25)):
            status = rng.choice(["ok", "error", "error", "skipped"])
            rec = {"id": rid, "status": status, "step": step}
            if status != "ok":
                rec["reason"] = f"r{step}"
            batch.append(rec)
        store.append(batch + batch[:3])
        if rng.random() < 0.3:
            store.close()
            if rng.random() < 0.3:
                (stage_dir(tmp_path) / "index.sqlite").unlink()
            store = StageStore(tmp_path, "s", shard_size=17, retry_errors=retry_errors)
        want = reference(store.shard_paths(), retry_errors)
        got = snapshot(store)
        assert {k: got[k] for k in want} == want
        assert store.pending(ids + ids) == [i for i in ids if i not in set(want["done"])]
    store.close()


def test_newest_wins_after_error_then_ok_even_when_rebuilt(tmp_path):
    with StageStore(tmp_path, "s") as store:
        store.append([err("a", "timeout"), ok("b")])
        store.append([err("a", "again")])
        store.append([ok("a", v=1)])
        store.append([err("a", "late")])  # dropped: ok is final
    for rebuild in (False, True):
        if rebuild:
            (stage_dir(tmp_path) / "index.sqlite").unlink()
        with StageStore(tmp_path, "s") as store:
            assert store.get("a") == ok("a", v=1) and store.status_of("a") == "ok"
            assert store.counts() == {"ok": 2, "error": 0, "skipped": 0}
            assert [r["id"] for r in store.iter_records()] == ["b", "a"]


def test_batch_queries(tmp_path):
    with StageStore(tmp_path, "s") as store:
        store.append([ok("a"), err("b"), {"id": "c", "status": "skipped", "reason": "x"}])
        ids = ["a", "b", "c", "zz", "a"] + [f"n{i}" for i in range(1200)]
        assert store.done_many(ids) == {"a", "c"}
        assert store.status_many(ids) == {"a": "ok", "b": "error", "c": "skipped"}
        got = store.get_many(["c", "zz", "b", "a"])
        assert list(got) == ["c", "b", "a"] and got["b"] == err("b")
        assert list(store.get_many(["c", "b", "a"], done_only=True)) == ["c", "a"]
        assert store.pending(iter(["b", "zz", "a", "zz"])) == ["b", "zz"]
    with StageStore(tmp_path, "s", retry_errors=False) as store:
        assert store.done_many(["a", "b", "q"]) == {"a", "b"}


def test_ids_are_parameters_never_sql(tmp_path):
    nasty = ["'); DROP TABLE recs; --", 'a"b', "é\u2028", "%", "?", "x" * 5000]
    with StageStore(tmp_path, "s") as store:
        store.append([ok(rid) for rid in nasty])
    with StageStore(tmp_path, "s") as store:
        assert store.done_many(nasty) == set(nasty) and store.get(nasty[0]) == ok(nasty[0])
    with CallCache(tmp_path / "c.jsonl") as cache:
        cache.put_many({rid: rid for rid in nasty})
        assert cache.get_many(nasty) == {rid: rid for rid in nasty}


# -- readers and writers --------------------------------------------------------------------------


@pytest.mark.parametrize("flush", [5, index_mod.FLUSH], ids=["writer-flushes", "buffered"])
def test_readonly_sees_what_was_committed_when_loaded(tmp_path, monkeypatch, flush, caplog):
    caplog.set_level(logging.INFO, logger="rlaif.store")
    monkeypatch.setattr(index_mod, "FLUSH", flush)
    writer = StageStore(tmp_path, "s", shard_size=50)
    writer.append([ok(f"a{i}") for i in range(80)] + [err("e")])
    reader = StageStore(tmp_path, "s", readonly=True, shard_size=50)
    writer.append([ok(f"b{i}") for i in range(80)] + [ok("e")])
    assert len(reader) == 81 and "b0" not in reader and reader.status_of("e") == "error"
    assert reader.counts() == {"ok": 80, "error": 1, "skipped": 0}
    assert [r["id"] for r in reader.iter_records()] == [f"a{i}" for i in range(80)] + ["e"]
    assert reader.get_many(["a1", "b1", "e"]) == {"a1": ok("a1"), "e": err("e")}
    moved = any("written since it was loaded" in r.getMessage() for r in caplog.records)
    assert moved == (flush == 5)  # the writer's rows reached the index: a private view
    reader.load()  # refresh
    assert len(reader) == 161 and reader.status_of("e") == "ok" and "b79" in reader
    reader.close()
    writer.close()


def test_readonly_changes_nothing_in_the_folder(tmp_path):
    fill(tmp_path, 300, shard_size=100)
    folder = stage_dir(tmp_path)

    def tree():
        return {
            p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in [folder, *folder.iterdir()]
        }

    before = tree()
    with StageStore(tmp_path, "s", readonly=True) as reader:
        assert len(reader) == 300 and reader.done_many(["r1", "x"]) == {"r1"}
        assert len(list(reader.iter_records())) == 300
    assert tree() == before


def test_readonly_creates_and_repairs_nothing(tmp_path):
    fill(tmp_path, 10)
    folder = stage_dir(tmp_path)
    (folder / "index.sqlite").unlink()
    with open(folder / "shard-00000.jsonl", "ab") as fh:
        fh.write(b'{"id":"torn"')
    before = sorted(p.name for p in folder.iterdir())
    with StageStore(tmp_path, "s", readonly=True) as reader:  # a private index, elsewhere
        assert len(reader) == 10 and reader.get("r3") == ok("r3", n=3)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert (folder / "shard-00000.jsonl").read_bytes().endswith(b'{"id":"torn"')


def test_a_closed_store_still_answers(tmp_path):
    store = StageStore(tmp_path, "s")
    store.append([ok("a")])
    store.close()
    assert "a" in store and store.get("a") == ok("a") and len(store) == 1
    with StageStore(tmp_path, "s") as again:  # the lock was released by close()
        again.append([ok("b")])
    store.close()


_CACHE_CHILD = """
import sys
from rlaif.store import CallCache
cache = CallCache(sys.argv[1])
print(len(cache), cache.get("parent"), flush=True)
cache.put_many({f"child{i}": i for i in range(int(sys.argv[2]))} | {"parent": "child's"})
cache.close()
"""


def _child(path: Path, n: int) -> str:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", _CACHE_CHILD, str(path), str(n)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_two_processes_share_a_cache(tmp_path):
    path = tmp_path / "cache" / "calls.jsonl"
    cache = CallCache(path)
    cache.put_many({"parent": "first", "p2": 2})
    assert _child(path, 300) == "2 first"  # the child saw the parent's entries
    # The parent sees the child's entries through the shared index, and the first value wins.
    assert len(cache) == 302 and cache.get("child7") == 7 and cache.get("parent") == "first"
    assert cache.put_many({"child8": "again", "p3": 3}) == 1
    cache.close()
    again = CallCache(path)
    assert len(again) == 303 and again.get_many(["child299", "p3"]) == {"child299": 299, "p3": 3}
    lines = path.read_text().splitlines()
    assert len(lines) == 303 and len({json.loads(x)["key"] for x in lines}) == 303


def test_two_cache_objects_interleaving_buffered_writes(tmp_path, monkeypatch):
    """Each object buffers its index rows; appends by the other are indexed before each of
    its own, so no key is written twice and the counts stay exact."""
    monkeypatch.setattr(index_mod, "FLUSH", 7)
    path = tmp_path / "calls.jsonl"
    a, b = CallCache(path), CallCache(path)
    for i in range(30):
        a.put_many({f"k{i}": "a", f"a{i}": i})
        b.put_many({f"k{i}": "b", f"k{i + 1}": "b", f"b{i}": i})
    assert a.get("k0") == "a" and b.get("k0") == "a" and b.get("k30") == "b"
    assert a.get("k30") is None  # b's last rows are still in its buffer: a miss is safe
    assert len(b) == len(a) == 91  # len writes its own buffer first (b, then a)
    assert a.get("k30") == "b"
    b.close()
    a.close()
    keys = [json.loads(x)["key"] for x in path.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 91
    with CallCache(path) as again:
        assert len(again) == 91 and again.get_many(["k5", "b29"]) == {
            "k5": "b",
            "b29": 29,
        }  # b wrote k5 first
    path.with_name("calls.index.sqlite").unlink()
    with CallCache(path) as again:
        assert len(again) == 91


def test_put_after_a_lookup_still_skips_what_another_process_wrote_meanwhile(tmp_path):
    """``looked_up=True`` (the model caller's put after its get_many) skips the index query,
    not the check of the file's end: another process's entries written since stay first."""
    path = tmp_path / "calls.jsonl"
    mine, other = CallCache(path), CallCache(path)
    mine.put_many({"a": 1})
    assert mine.get_many(["b", "c"]) == {}
    assert other.put_many({"b": "other's"}) == 1  # appended after mine looked
    assert mine.put_many({"b": "mine", "c": 3}, looked_up=True) == 1
    assert mine.get_many(["a", "b", "c"]) == {"a": 1, "b": "other's", "c": 3}
    assert len(mine) == 3 and path.read_bytes().count(b'"key":"b"') == 1
    other.close()
    mine.close()


def test_cache_catches_up_lines_another_process_wrote_without_the_index(tmp_path, caplog):
    path = tmp_path / "calls.jsonl"
    cache = CallCache(path)
    cache.put_many({"a": 1})
    with open(path, "ab") as fh:  # another process crashed after its fsync
        fh.write(b'{"key":"b","value":2}\n{"key":"a","value":"dup"}\n{"key":"c","val')
    assert cache.put_many({"b": "mine", "d": 4}) == 1  # caught up under the lock first
    assert cache.get_many(["a", "b", "c", "d"]) == {"a": 1, "b": 2, "d": 4}
    assert cache.hits == 3 and cache.misses == 1 and len(cache) == 3
    cache.close()
    for damage in (_delete, _garbage, _truncate):
        damage(path.with_name("calls.index.sqlite"))
        with caplog.at_level(logging.INFO, logger="rlaif.store"), CallCache(path) as again:
            assert again.get_many(["a", "b", "d"]) == {"a": 1, "b": 2, "d": 4}
            assert again.contains_many(["a", "zz", "d"]) == {"a", "d"} and len(again) == 3
            assert again.stats == {"entries": 3, "hits": 3, "misses": 0}


def test_cache_file_replaced_by_a_shorter_one_is_reindexed(tmp_path):
    path = tmp_path / "calls.jsonl"
    with CallCache(path) as cache:
        cache.put_many({f"k{i}": i for i in range(50)})
    path.write_text('{"key":"z","value":0}\n')
    with CallCache(path) as cache:
        assert len(cache) == 1 and cache.get("k1") is None and cache.get("z") == 0


# -- memory ----------------------------------------------------------------------------------------


def _write_shards(run: Path, n: int, shard_size: int = 10_000) -> None:
    folder = stage_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, n, shard_size)):
        with open(folder / f"shard-{s:05d}.jsonl", "w") as fh:
            for i in range(start, min(n, start + shard_size)):
                fh.write(f'{{"id":"{i:x}-{i * 7919 % 1000003:x}","status":"ok","t":"{i}"}}\n')


def _traced_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_records(tmp_path):
    """Python allocations while rebuilding, reopening and querying are the same at 10k and
    100k records (a dict index would add ~15 MB between them)."""
    peaks = {}
    for n in (10_000, 100_000):
        run = tmp_path / str(n)
        _write_shards(run, n)
        ids = [f"{i:x}-{i * 7919 % 1000003:x}" for i in range(0, n, n // 1000)]

        def build(run=run):
            StageStore(run, "s").close()  # no index yet: built from the shards

        def use(run=run, ids=ids):
            with StageStore(run, "s") as store:
                assert len(store) >= 10_000 and store.done_many(ids) == set(ids)
                assert store.is_done(ids[-1]) and store.get(ids[3])["status"] == "ok"
                assert store.counts()["ok"] == len(store)

        peaks[n] = (_traced_peak(build), _traced_peak(use))
    print("traced peaks (build, use) per size:", peaks)
    (build10, use10), (build100, use100) = peaks[10_000], peaks[100_000]
    assert build100 < build10 + 512 * 1024, peaks
    assert use100 < use10 + 256 * 1024, peaks
    assert build100 < 8 * 2**20 and use100 < 2 * 2**20, peaks
