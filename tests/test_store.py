"""Tests for rlaif.store: hashing, stage shards, call cache, manifest and run lock."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlaif.backends.base import SamplingParams
from rlaif.errors import StoreError
from rlaif.store import (
    CallCache,
    CanonicalJSONError,
    Manifest,
    RunLock,
    StageStore,
    cache_key,
    canonical_json,
    content_hash,
    record_id,
)
from rlaif.store import jsonl as jsonl_mod
from rlaif.store import shards as shards_mod
from rlaif.store.manifest import StageSummary

REPO = Path(__file__).resolve().parents[1]


def ok(rid: str, **extra: object) -> dict:
    return {"id": rid, "status": "ok", **extra}


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# -- hashing --------------------------------------------------------------------------------


def test_canonical_json_is_sorted_compact_and_unescaped():
    obj = {"b": 1, "a": [1, 2.5, {"d": "é✓", "c": None}], "t": (True, False)}
    text = '{"a":[1,2.5,{"c":null,"d":"é✓"}],"b":1,"t":[true,false]}'
    assert canonical_json(obj) == text
    # Golden value: a change here silently invalidates every cache and record id out there.
    assert content_hash(obj) == hashlib.sha256(text.encode()).hexdigest()
    assert content_hash(obj) == "70191c9f9e1d2beeb6a5caefbee70368888928e8c18efb635a40a37fef6e3ba1"


def test_hash_ignores_key_order_at_every_depth():
    a = {"x": {"p": 1, "q": [{"m": 1, "n": 2}]}, "y": "ü"}
    b = {"y": "ü", "x": {"q": [{"n": 2, "m": 1}], "p": 1}}
    assert content_hash(a) == content_hash(b)
    assert content_hash({"x": [1, 2]}) != content_hash({"x": [2, 1]})  # list order matters
    assert content_hash({"s": "e\u0301"}) != content_hash({"s": "é"})  # no Unicode folding


def test_numbers_that_compare_equal_hash_equal():
    assert canonical_json({"t": 1.0, "z": -0.0}) == '{"t":1,"z":0}'
    assert canonical_json([0.1, 1e300, 2.0**60]) == "[0.1,1e+300,1.152921504606847e+18]"
    assert content_hash({"v": True}) != content_hash({"v": 1})  # bools stay bools
    assert canonical_json((1, (2,))) == canonical_json([1, [2]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_rejected_with_their_path(bad):
    with pytest.raises(CanonicalJSONError, match=r"\$\.params\.temps\[1\]") as info:
        canonical_json({"params": {"temps": [0.5, bad]}})
    assert isinstance(info.value, ValueError) and isinstance(info.value, StoreError)


def test_non_json_types_and_keys_are_rejected():
    with pytest.raises(CanonicalJSONError, match="key 1"):
        canonical_json({1: "a"})
    with pytest.raises(CanonicalJSONError, match="set"):
        canonical_json({"a": {1, 2}})


def test_record_id_is_short_stable_and_stage_specific():
    rid = record_id("judge", {"prompt": "hi", "k": 2})
    assert len(rid) == 24 and rid == record_id("judge", {"k": 2, "prompt": "hi"})
    assert rid != record_id("critique", {"prompt": "hi", "k": 2})
    assert rid == content_hash({"stage": "judge", "inputs": {"prompt": "hi", "k": 2}})[:24]


CALL = {
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "revision": "abc123",
    "messages": [{"role": "user", "content": "Is water wet?"}],
    "params": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64, "seed": 1},
    "template_hash": "t1",
}


def test_cache_key_changes_with_every_covered_field():
    base = cache_key(**CALL)
    assert len(base) == 64
    changes = {
        "model": "other/model",
        "revision": None,
        "messages": [{"role": "user", "content": "Is water dry?"}],
        "template_hash": "t2",
    }
    seen = {base}
    for field, value in changes.items():
        seen.add(cache_key(**{**CALL, field: value}))
    for param, value in {"seed": 2, "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 65}.items():
        seen.add(cache_key(**{**CALL, "params": {**CALL["params"], param: value}}))
    seen.add(cache_key(**CALL, kind="score_choices"))
    assert len(seen) == 1 + len(changes) + 4 + 1


def test_cache_key_ignores_execution_details():
    base = cache_key(**CALL)
    noisy = {**CALL["params"], "batch_size": 32, "device": "cuda:0", "num_workers": 8}
    assert cache_key(**{**CALL, "params": noisy}) == base
    reordered = dict(reversed(list(CALL["params"].items())))
    assert cache_key(**{**CALL, "params": reordered}) == base


def test_cache_key_accepts_sampling_params():
    sp = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=1, stop=("\n",))
    args = {k: v for k, v in CALL.items() if k != "params"}
    assert cache_key(**args, params=sp) == cache_key(**args, params=sp.to_dict())
    assert cache_key(**args, params=sp) != cache_key(
        **args, params=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=64, seed=2)
    )


# -- stage shards ---------------------------------------------------------------------------


def test_append_reload_and_read(tmp_path):
    with StageStore(tmp_path, "respond") as store:
        assert (
            store.append(
                [ok("a", text="α"), ok("b"), {"id": "c", "status": "skipped", "reason": "too long"}]
            )
            == 3
        )
        assert len(store) == 3 and "a" in store and "zz" not in store
        assert store.get("a") == {"id": "a", "status": "ok", "text": "α"}
        assert store.get("zz") is None
    with StageStore(tmp_path, "respond") as store:
        assert [r["id"] for r in store.iter_records()] == ["a", "b", "c"]
        assert store.done_ids() == {"a", "b", "c"}
        assert store.counts() == {"ok": 2, "error": 0, "skipped": 1}
        assert store.status_of("c") == "skipped"
        assert store.pending(["a", "d", "e", "d"]) == ["d", "e"]
    shard = tmp_path / "stages" / "respond" / "shard-00000.jsonl"
    assert json.loads(lines_of(shard)[0]) == {"id": "a", "status": "ok", "text": "α"}


def test_reappend_never_duplicates(tmp_path):
    with StageStore(tmp_path, "s") as store:
        store.append([ok("a"), ok("b")])
        assert store.append([ok("a", text="again"), ok("b"), ok("c"), ok("c")]) == 1
    with StageStore(tmp_path, "s") as store:
        assert store.append([ok("a"), ok("c")]) == 0
        assert store.get("a") == ok("a")  # the first ok record stays
    assert len(lines_of(tmp_path / "stages/s/shard-00000.jsonl")) == 3


def test_torn_last_line_is_truncated_once_and_logged(tmp_path, caplog):
    with StageStore(tmp_path, "s") as store:
        store.append([ok("a"), ok("b")])
    shard = tmp_path / "stages/s/shard-00000.jsonl"
    good = shard.read_bytes()
    with open(shard, "ab") as fh:
        fh.write(b'{"id":"c","status":"o')  # a write cut off by a crash
    with caplog.at_level(logging.WARNING, logger="rlaif.store"):
        store = StageStore(tmp_path, "s")
    assert shard.read_bytes() == good
    assert len(store) == 2 and "c" not in store
    assert sum("unfinished write" in r.message for r in caplog.records) == 1
    store.append([ok("c")])  # appending after the repair yields valid lines
    store.close()
    assert [json.loads(line)["id"] for line in lines_of(shard)] == ["a", "b", "c"]


@pytest.mark.parametrize(
    "tail",
    [b"\x00" * 300, b'{"id":"c"}\n', b"not json\n", b'{"id":"c","status":"ok"}', b"\n\x00\x00\n"],
    ids=["zero-blocks", "not-a-record", "garbage-line", "no-newline", "blank-lines"],
)
def test_invalid_tail_of_any_kind_is_repaired(tmp_path, tail):
    with StageStore(tmp_path, "s") as store:
        store.append([ok("a")])
    shard = tmp_path / "stages/s/shard-00000.jsonl"
    good = shard.read_bytes()
    shard.write_bytes(good + tail)
    with StageStore(tmp_path, "s") as store:
        assert list(store.done_ids()) == ["a"]
    assert shard.read_bytes() == good


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    with StageStore(tmp_path, "s") as store:
        store.append([ok("a"), ok("b"), ok("c")])
    shard = tmp_path / "stages/s/shard-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(lines[0] + b'{"id": broken\n' + lines[2])
    with pytest.raises(StoreError, match=r"shard-00000\.jsonl:2: corrupt record store line"):
        StageStore(tmp_path, "s")
    assert shard.read_bytes() == lines[0] + b'{"id": broken\n' + lines[2]  # left untouched
    # The lock is released after the failed open, so a fixed file opens again.
    shard.write_bytes(lines[0] + lines[2])
    with StageStore(tmp_path, "s") as store:
        assert store.done_ids() == {"a", "c"}


def test_torn_line_in_an_earlier_shard_is_corruption(tmp_path):
    with StageStore(tmp_path, "s", shard_size=2) as store:
        store.append([ok(str(i)) for i in range(3)])
    first = tmp_path / "stages/s/shard-00000.jsonl"
    first.write_bytes(first.read_bytes() + b'{"id":"x"')
    with pytest.raises(StoreError, match=r"shard-00000\.jsonl:3"):
        StageStore(tmp_path, "s", shard_size=2)


def test_shards_roll_and_resume_fills_the_last_one(tmp_path):
    with StageStore(tmp_path, "s", shard_size=3) as store:
        assert store.append([ok(f"r{i}") for i in range(8)]) == 8
        assert [p.name for p in store.shard_paths()] == [
            "shard-00000.jsonl",
            "shard-00001.jsonl",
            "shard-00002.jsonl",
        ]
    with StageStore(tmp_path, "s", shard_size=3) as store:
        store.append([ok("r8"), ok("r9")])
        sizes = [len(lines_of(p)) for p in store.shard_paths()]
        assert sizes == [3, 3, 3, 1]
        assert [r["id"] for r in store.iter_records()] == [f"r{i}" for i in range(10)]
        assert store.get("r4") == ok("r4") and store.get("r9") == ok("r9")


def test_errors_are_retried_and_superseded_by_default(tmp_path):
    err = {"id": "a", "status": "error", "reason": "judge output unparseable"}
    with StageStore(tmp_path, "s") as store:
        store.append([err, ok("b")])
        assert store.done_ids() == {"b"} and "a" in store and not store.is_done("a")
        assert store.append([{**err, "reason": "timeout"}]) == 1  # retried, failed again
        assert store.append([ok("a", verdict=0.8)]) == 1  # retried, succeeded
        assert store.append([{**err, "reason": "late"}]) == 0  # ok is final
    with StageStore(tmp_path, "s") as store:
        assert store.get("a") == ok("a", verdict=0.8)
        assert store.counts() == {"ok": 2, "error": 0, "skipped": 0}
        assert [r["id"] for r in store.iter_records()] == ["b", "a"]
        history = [r["status"] for r in store.iter_records(all_versions=True) if r["id"] == "a"]
        assert history == ["error", "error", "ok"]
        assert list(store.iter_records(status="error")) == []


def test_errors_are_final_without_retry(tmp_path):
    err = {"id": "a", "status": "error", "reason": "boom"}
    with StageStore(tmp_path, "s", retry_errors=False) as store:
        store.append([err])
        assert store.done_ids() == {"a"}
        assert store.append([ok("a")]) == 0
        assert store.get("a") == err


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"status": "ok"}, "field 'id'"),
        ({"id": "", "status": "ok"}, "field 'id'"),
        ({"id": "a", "status": "done"}, "field 'status'"),
        ({"id": "a", "status": "error"}, "field 'reason'"),
        ({"id": "a", "status": "skipped", "reason": " "}, "field 'reason'"),
        ({"id": "a", "status": "ok", "lp": float("-inf")}, r"\$\.lp"),
        ({"id": "a", "status": "ok", "p": Path("x")}, "PosixPath"),
        ({"id": "a", "status": "ok", "t": "\ud800"}, "cannot be written as JSON"),
    ],
)
def test_invalid_records_are_rejected_before_anything_is_written(tmp_path, record, match):
    with StageStore(tmp_path, "s") as store:
        with pytest.raises(StoreError, match=match):
            store.append([ok("first"), record])
        assert len(store) == 0
    assert not (tmp_path / "stages/s/shard-00000.jsonl").exists()


def test_readonly_reads_without_repairing_or_locking(tmp_path):
    writer = StageStore(tmp_path, "s")
    writer.append([ok("a")])
    shard = tmp_path / "stages/s/shard-00000.jsonl"
    with open(shard, "ab") as fh:
        fh.write(b'{"id":"b","st')  # as if the writer were mid-batch right now
    torn = shard.read_bytes()
    with StageStore(tmp_path, "s", readonly=True) as reader:
        assert [r["id"] for r in reader.iter_records()] == ["a"]
        with pytest.raises(StoreError, match="read-only"):
            reader.append([ok("c")])
    assert shard.read_bytes() == torn
    assert not StageStore(tmp_path / "nothing", "s", readonly=True).done_ids()
    writer.close()


def test_one_writer_per_stage(tmp_path):
    with StageStore(tmp_path, "s"):
        with pytest.raises(
            StoreError, match=rf"stage 's' of run dir .* in use by pid {os.getpid()}"
        ):
            StageStore(tmp_path, "s")
        with StageStore(tmp_path, "other"):
            pass
    StageStore(tmp_path, "s").close()


def test_bad_stage_name(tmp_path):
    with pytest.raises(StoreError, match="field 'stage'"):
        StageStore(tmp_path, "../escape")


def _failing_write(after_bytes: int):
    """An os.write that writes ``after_bytes`` bytes, then reports a full disk."""
    state = {"left": after_bytes}

    def write(fd: int, data) -> int:
        if state["left"] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[: state["left"]])
        state["left"] -= n
        return n

    return write


def test_disk_full_keeps_earlier_batches_and_only_complete_lines(tmp_path, monkeypatch):
    store = StageStore(tmp_path, "s")
    store.append([ok("a"), ok("b")])
    shard = tmp_path / "stages/s/shard-00000.jsonl"
    before = shard.read_bytes()
    monkeypatch.setattr(jsonl_mod, "_os_write", _failing_write(30))  # dies mid-line
    with pytest.raises(StoreError) as info:
        store.append([ok("c", text="x" * 50), ok("d")])
    msg = str(info.value)
    assert msg == (
        f"cannot write {shard}: No space left on device; records up to the previous batch are "
        "safe; free space and re-run to resume"
    )
    assert "\n" not in msg
    assert shard.read_bytes() == before  # partial batch cut back
    assert store.done_ids() == {"a", "b"} and store.get("b") == ok("b")
    monkeypatch.setattr(jsonl_mod, "_os_write", os.write)  # space freed
    assert store.append([ok("c"), ok("d")]) == 2
    store.close()
    with StageStore(tmp_path, "s") as again:
        assert [r["id"] for r in again.iter_records()] == ["a", "b", "c", "d"]


def test_fsync_failure_is_a_store_error(tmp_path, monkeypatch):
    def bad_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with StageStore(tmp_path, "s") as store:
        monkeypatch.setattr(jsonl_mod, "_os_fsync", bad_fsync)
        with pytest.raises(StoreError, match="Input/output error; records up to the previous"):
            store.append([ok("a")])
        assert len(store) == 0


def test_one_fsync_per_batch(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(jsonl_mod, "_os_fsync", lambda fd: calls.append(fd) or os.fsync(fd))
    with StageStore(tmp_path, "s", shard_size=100) as store:
        store.append([ok(f"r{i}") for i in range(50)])
        assert len(calls) == 1
        store.append([ok(f"q{i}") for i in range(80)])  # crosses into a second shard
        assert len(calls) == 3


def test_sigkill_at_random_moments_loses_no_committed_batch(tmp_path):
    """Kill a writer 10 times mid-run; every batch it reported as committed must survive."""
    rng = random.Random(1234)
    batch_size, shard_size = 8, 50
    worker = Path(__file__).with_name("store_worker.py")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    committed: set[int] = set()
    repaired = 0
    for _trial in range(10):
        with subprocess.Popen(
            [sys.executable, str(worker), str(tmp_path), str(batch_size), str(shard_size), "16"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                first = proc.stdout.readline()
                assert first == "ready\n", f"worker failed: {first}{proc.stderr.read()}"
                for _ in range(rng.randint(1, 15)):
                    line = proc.stdout.readline()
                    assert line, f"worker died: {proc.stderr.read()}"
                    committed.add(int(line))
                time.sleep(rng.uniform(0, 0.005))
            finally:
                proc.send_signal(signal.SIGKILL)  # also stops a runaway writer if we failed
            rest, _ = proc.communicate(timeout=10)
        committed.update(int(x) for x in rest.split())  # printed before the kill: committed
        assert proc.returncode == -signal.SIGKILL

        shards = sorted((tmp_path / "stages" / "kill").glob("shard-*.jsonl"))
        repaired += any(not p.read_bytes().endswith(b"\n") for p in shards if p.stat().st_size)
        with StageStore(tmp_path, "kill", shard_size=shard_size) as store:
            ids = [r["id"] for r in store.iter_records(all_versions=True)]
            assert len(ids) == len(set(ids)), "a resume duplicated records"
            for b in committed:
                assert all(f"b{b}-{i}" in store for i in range(batch_size)), f"batch {b} lost"
        for p in shards:  # after the reopen, no torn line is left anywhere
            data = p.read_bytes()
            assert not data or data.endswith(b"\n")
            for line in data.splitlines():
                json.loads(line)
    assert len(committed) >= 10
    print(f"committed batches: {len(committed)}, kills that left a torn tail: {repaired}/10")


# -- call cache -----------------------------------------------------------------------------


def test_cache_put_get_counts_and_persists(tmp_path):
    path = tmp_path / "cache" / "calls.jsonl"
    cache = CallCache(path)
    assert cache.get("k1") is None and cache.misses == 1
    assert cache.put_many({"k1": {"text": "ja"}, "k2": ["é", 1]}) == 2
    assert cache.put_many({"k1": {"text": "other"}}) == 0  # first value is kept
    assert "k1" in cache and cache.get("k1") == {"text": "ja"} and cache.hits == 1
    cache.close()
    again = CallCache(path)
    assert len(again) == 2 and again.get("k2") == ["é", 1]
    assert again.get("nope", default="d") == "d"
    assert again.stats == {"entries": 2, "hits": 1, "misses": 1}
    assert len(lines_of(path)) == 2


def test_cache_repairs_torn_tail_and_rejects_nan(tmp_path):
    path = tmp_path / "calls.jsonl"
    with CallCache(path) as cache:
        cache.put_many({"a": 1})
    with open(path, "ab") as fh:
        fh.write(b'{"key":"b","val')
    with CallCache(path) as cache:
        assert len(cache) == 1 and cache.get("a") == 1
        with pytest.raises(StoreError, match=r"cache value for b: nan at \$\.lp"):
            cache.put_many({"b": {"lp": float("nan")}})
        cache.put_many({"b": 2})
    assert [json.loads(line)["key"] for line in lines_of(path)] == ["a", "b"]


def test_cache_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "calls.jsonl"
    cache = CallCache(path)
    cache.put_many({"a": "x"})
    monkeypatch.setattr(jsonl_mod, "_os_write", _failing_write(5))
    with pytest.raises(StoreError, match="No space left on device"):
        cache.put_many({"b": "y" * 100})
    assert "b" not in cache and cache.get("a") == "x"
    assert lines_of(path) == ['{"key":"a","value":"x"}']


def test_rerunning_with_the_cache_makes_zero_model_calls(tmp_path):
    calls = []

    def model(prompts: list[str]) -> list[str]:
        calls.extend(prompts)
        return [p.upper() for p in prompts]

    def run(prompts: list[str]) -> list[str]:
        with CallCache(tmp_path / "calls.jsonl") as cache:
            keys = {
                p: cache_key(
                    model="m",
                    revision="r",
                    messages=[{"role": "user", "content": p}],
                    params={"seed": 0},
                    template_hash=None,
                )
                for p in prompts
            }
            todo = [p for p in prompts if keys[p] not in cache]
            if todo:
                cache.put_many({keys[p]: out for p, out in zip(todo, model(todo), strict=True)})
            return [cache.get(keys[p]) for p in prompts]

    prompts = ["a", "b", "c"]
    assert run(prompts) == ["A", "B", "C"] and len(calls) == 3
    assert run(prompts) == ["A", "B", "C"] and len(calls) == 3


# -- manifest -------------------------------------------------------------------------------


def _fill_run(run: Path) -> None:
    with StageStore(run, "pairs") as store:
        store.append(
            [
                ok("p1"),
                {"id": "p2", "status": "skipped", "reason": "tie"},
                {"id": "p3", "status": "skipped", "reason": "tie"},
                {"id": "p4", "status": "error", "reason": "judge parse failure"},
                {"id": "p5", "status": "error", "reason": "timeout"},
            ]
        )
        store.append([ok("p5")])  # retried and succeeded: counted once, as ok


def test_manifest_counts_reasons_and_examples(tmp_path):
    _fill_run(tmp_path)
    m = Manifest.from_store(tmp_path)
    s = m.stages["pairs"]
    assert (s.ok, s.error, s.skipped, s.total) == (2, 1, 2, 5)
    assert s.reasons == {
        "skipped": {"tie": {"count": 2, "examples": ["p2", "p3"]}},
        "error": {"judge parse failure": {"count": 1, "examples": ["p4"]}},
    }


def test_manifest_accounts_for_every_input(tmp_path):
    _fill_run(tmp_path)
    base = Manifest(info={"constitution": {"name": "hh", "version": "1.0"}})
    base.start()
    base.set_expected("pairs", 6)
    base.set_expected("judge", 4)  # has not written anything yet
    m = Manifest.from_store(tmp_path, base=base)
    assert m.problems() == [
        "stage 'pairs': 1 of 6 inputs have no record",
        "stage 'judge': 4 of 4 inputs have no record",
    ]
    assert m.info == base.info and m.started_at == base.started_at
    with StageStore(tmp_path, "pairs") as store:
        store.append([{"id": "p6", "status": "skipped", "reason": "too long"}])
    assert (
        Manifest.from_store(tmp_path, stages=["pairs"], base=base).stages["pairs"].unaccounted == 0
    )


def test_manifest_atomic_write_and_reload(tmp_path, monkeypatch):
    _fill_run(tmp_path)
    m = Manifest.from_store(tmp_path)
    m.info["seed"] = 7
    m.start()
    path = m.write(tmp_path)
    data = json.loads(path.read_text())
    assert data["stages"]["pairs"]["ok"] == 2 and data["info"] == {"seed": 7}
    assert data["finished_at"] is None and data["started_at"]
    loaded = Manifest.load(tmp_path)
    assert loaded is not None and loaded.stages["pairs"] == m.stages["pairs"]

    def crash(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    m.finish()
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match=r"cannot write .*manifest\.json: No space left"):
        m.write(tmp_path)
    assert json.loads(path.read_text()) == data  # old manifest intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".manifest")] == []


def test_manifest_recount_survives_loss_and_bad_files(tmp_path):
    _fill_run(tmp_path)
    assert Manifest.load(tmp_path) is None
    Manifest.from_store(tmp_path).write(tmp_path)
    (tmp_path / "manifest.json").write_text("{\n  broken")
    with pytest.raises(StoreError, match=r"manifest.json:2: invalid manifest JSON"):
        Manifest.load(tmp_path)
    assert Manifest.from_store(tmp_path).stages["pairs"].total == 5


def test_manifest_reads_only_what_is_not_ok_and_counts_as_a_full_pass(tmp_path, monkeypatch):
    rng = random.Random(5)
    with StageStore(tmp_path, "s", shard_size=7, retry_errors=True) as store:
        for _ in range(12):  # errors retried, skips kept, shards rolled over
            batch = []
            for i in rng.sample(range(40), 9):
                status = rng.choice(["ok", "error", "skipped"])
                rec = {"id": f"r{i}", "status": status}
                if status != "ok":
                    rec["reason"] = rng.choice(["tie", "timeout", "too long", "parse"])
                batch.append(rec)
            store.append(batch)
    want = StageSummary()
    with StageStore(tmp_path, "s", readonly=True) as store:
        for rec in store.iter_records():  # the full pass the manifest used to make
            want.add(rec)
    decoded = []

    def counted(raw):
        decoded.append(raw)
        return json.loads(raw)

    monkeypatch.setattr(shards_mod, "decode_line", counted)
    got = Manifest.from_store(tmp_path).stages["s"]
    assert got == want and got.error + got.skipped > 0
    assert len(decoded) == got.error + got.skipped  # the ok records were not read


def test_manifest_caps_distinct_reasons(tmp_path):
    with StageStore(tmp_path, "s") as store:
        store.append([{"id": f"r{i}", "status": "error", "reason": f"e{i}"} for i in range(150)])
    reasons = Manifest.from_store(tmp_path).stages["s"].reasons["error"]
    assert len(reasons) == 101 and reasons["(other reasons)"]["count"] == 50


# -- run lock -------------------------------------------------------------------------------


def test_run_lock_excludes_a_second_holder(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.locked
        with pytest.raises(StoreError, match=rf"run dir {tmp_path} is in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass


def test_run_lock_held_by_another_process(tmp_path):
    code = (
        "import sys, time; from rlaif.store import RunLock; "
        f"l = RunLock({str(tmp_path)!r}); l.acquire(); print('locked', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
            with pytest.raises(StoreError, match=f"in use by pid {proc.pid}"):
                RunLock(tmp_path).acquire()
        finally:
            proc.kill()
    with RunLock(tmp_path):  # the kernel freed the dead holder's lock
        pass


# -- atomic whole-file writes -------------------------------------------------------------------


def test_write_atomic_replaces_whole_and_keeps_the_old_file_on_failure(tmp_path):
    from rlaif.store.atomic import write_atomic, write_json_atomic

    path = tmp_path / "sub" / "a.json"
    write_json_atomic(path, {"b": 1, "a": [1.5]}, sort_keys=True)
    assert path.read_text() == '{"a": [1.5], "b": 1}\n'

    def refuse(tmp):
        assert tmp.read_text() == "new" and tmp.name.startswith(".a.json.tmp-")
        raise ValueError("invalid")

    with pytest.raises(ValueError, match="invalid"):
        write_atomic(path, "new", check=refuse)
    assert path.read_text() == '{"a": [1.5], "b": 1}\n'
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary left
    write_atomic(path, (f"{i}\n" for i in range(3)))  # text in pieces, never joined whole
    assert path.read_text() == "0\n1\n2\n"


def test_remove_stale_keeps_live_writers_files(tmp_path):
    from rlaif.store.atomic import remove_stale, temp_sibling, write_atomic

    path = tmp_path / "export"
    dead = tmp_path / ".export.tmp-999999999-deadbeef"  # a pid that cannot be running
    dead.mkdir()
    (dead / "x").write_text("half")
    old_file = tmp_path / ".export.old-999999999-cafe0000"
    old_file.write_text("old")
    mine = temp_sibling(path)
    mine.write_text("in flight")
    other = tmp_path / ".export.tmp-notapid-1"
    other.write_text("not ours")
    remove_stale(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])
    write_atomic(tmp_path / "b.txt", "x")  # a write clears its own stale siblings too
    (tmp_path / ".b.txt.tmp-999999999-0badf00d").write_text("stale")
    write_atomic(tmp_path / "b.txt", "y")
    assert not (tmp_path / ".b.txt.tmp-999999999-0badf00d").exists()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_swap_in_replaces_a_file_or_folder_and_leaves_nothing(tmp_path, kind):
    from rlaif.store.atomic import swap_in, temp_sibling

    final = tmp_path / "out"

    def build(text: str):
        staging = temp_sibling(final)
        if kind == "file":
            staging.write_text(text)
        else:
            staging.mkdir()
            (staging / "data").write_text(text)
        return staging

    def read() -> str:
        return final.read_text() if kind == "file" else (final / "data").read_text()

    swap_in(build("one"), final)
    swap_in(build("two"), final)
    assert read() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
