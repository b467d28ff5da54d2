"""Exports written as streams: the same rows, splits, counts and files as the in-memory path they
replaced, read back by ``datasets``, and memory that does not grow with the rows held."""

from __future__ import annotations

import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export_preferences import NO_FILTERS, PROVENANCE, random_record, rec

from rlaif.config.schema import ExportConfig
from rlaif.errors import DataError
from rlaif.export import writers
from rlaif.export.filters import (
    DUPLICATE,
    PROMPT_CAP,
    PreferenceExportConfig,
    PreferenceStream,
    Selection,
    _classify,
    select_preferences,
)
from rlaif.export.preferences import _features, export_preferences, split_rows, variant_row
from rlaif.export.sl_cai import export_sl_cai, sl_cai_rows
from rlaif.store import Manifest

SPLITS = ("train", "test")


class Source:
    """A re-iterable record source like the runner's: each ``iter`` starts over."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records, self.passes = records, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.records)


class Synthetic:
    """``n`` judged pair records made on the fly (two pairs per prompt), never held."""

    def __init__(self, n: int, tie: bool = False) -> None:
        self.n, self.tie = n, tie

    def __iter__(self):
        for i in range(self.n):
            p = 0.5 if self.tie else 0.6 + (i % 37) / 100
            yield rec(
                i,
                x=f"The capital is city {i}. " * 4,
                y=f"I do not know about {i}. " * 3,
                p=p if i % 2 else 1 - p,
                prompt=f"Question {i // 2}: the capital of country {i % 97}?",
            )


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _records(n: int, seed: int = 5) -> list[dict[str, Any]]:
    """Pairs over fewer prompts, with duplicates, ties and low-confidence ones."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randrange(max(1, n // 8))
        x = rng.choice(["Rome.", "Paris.", "Milan is nice.", f"ans {i % 50}"])
        y = rng.choice(["No.", "Maybe so.", f"other {i % 30}"])
        p = rng.choice([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9, 0.5, 0.52])
        out.append(rec(i, prompt=f"prompt {k}", x=x, y=y, p=p))
    return out


# -- the in-memory path the stream replaced, as a reference ---------------------------------------


def _old_select(records: list[dict[str, Any]], cfg: PreferenceExportConfig) -> Selection:
    """The former select_preferences: every candidate row in memory, then dedup and cap."""
    sel, candidates = Selection(), []
    for r in records:
        sel.inputs += 1
        row = _classify(r, cfg, sel)
        if row is not None:
            candidates.append(row)
    seen, unique = set(), []
    for row in candidates:
        if row["_row_key"] in seen:
            sel.drop(DUPLICATE, row["id"])
        else:
            seen.add(row["_row_key"])
            unique.append(row)
    keep = set(range(len(unique)))
    if cfg.max_pairs_per_prompt is not None:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(unique):
            groups.setdefault(row["_prompt_key"], []).append(i)
        for idx in groups.values():
            for i in sorted(idx, key=lambda i: (-unique[i]["p_chosen"], i))[
                cfg.max_pairs_per_prompt :
            ]:
                keep.discard(i)
                sel.drop(PROMPT_CAP, unique[i]["id"])
    sel.rows = [row for i, row in enumerate(unique) if i in keep]
    return sel


def _old_split(rows: list[dict[str, Any]], test_size: float, seed: int) -> list[str]:
    """The former split_rows, over the whole list at once."""
    from rlaif.store import content_hash

    keys = list(dict.fromkeys(row["_prompt_key"] for row in rows))
    u = {k: int(content_hash([seed, k])[:16], 16) / 16**16 for k in keys}
    test = {k for k in keys if u[k] < test_size}
    if len(keys) >= 2 and test_size > 0 and not test:
        test.add(min(keys, key=u.__getitem__))
    if keys and test == set(keys):
        test.discard(max(keys, key=u.__getitem__))
    return ["test" if row["_prompt_key"] in test else "train" for row in rows]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(random_record(), max_size=30),
    cap=st.one_of(st.none(), st.integers(1, 3)),
    test_size=st.sampled_from([0.0, 0.01, 0.3, 0.99]),
)
def test_stream_selects_like_the_in_memory_path(records, cap, test_size) -> None:
    cfg = PreferenceExportConfig(
        min_confidence=0.5, max_length_ratio=None, max_pairs_per_prompt=cap, test_size=test_size
    )
    old = _old_select(records, cfg)
    new = select_preferences(Source(records), cfg)
    assert [r["id"] for r in new.rows] == [r["id"] for r in old.rows]
    assert new.rows == old.rows
    assert (new.filtered, new.examples, new.inputs) == (old.filtered, old.examples, old.inputs)
    assert split_rows(new.rows, test_size, 3) == _old_split(old.rows, test_size, 3)
    stream = PreferenceStream(records, cfg)
    assert [s for s, _ in stream.rows()] == _old_split(old.rows, test_size, cfg.seed)


@pytest.mark.parametrize(
    "cfg",
    [
        PreferenceExportConfig(min_confidence=0.5, max_length_ratio=None, test_size=0.2, seed=3),
        PreferenceExportConfig(min_confidence=0.5, max_pairs_per_prompt=2, test_size=0.2),
    ],
    ids=["uncapped", "capped"],
)
def test_files_equal_the_in_memory_datasets(cfg: PreferenceExportConfig, tmp_path: Path) -> None:
    """Over 1000 rows in train (several row groups): the same rows in every format; up to
    1000 (one row group) the Parquet bytes of ``Dataset.to_parquet`` too."""
    import datasets

    records = _records(3500)
    stats, _ = export_preferences(Source(records), tmp_path, cfg, PROVENANCE, Manifest()), None
    old = _old_select(records, cfg)
    where = _old_split(old.rows, cfg.test_size, cfg.seed)
    assert stats["kept"] == len(old.rows) and stats["inputs"] == len(records)
    assert stats["filtered"] == {k: n for k, n in old.filtered.items() if n}
    out = tmp_path / "export/preferences"
    for variant in ("conversational", "text"):
        disk = datasets.load_from_disk(str(out / variant / "disk"))
        for split in SPLITS:
            kept = [r for r, w in zip(old.rows, where, strict=True) if w == split]
            rows = [variant_row(r, variant) for r in kept]
            assert stats["splits"][split]["rows"] == len(rows)
            lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows]
            assert (out / variant / f"{split}.jsonl").read_text() == "".join(lines)
            assert disk[split].to_list() == rows
            parquet = out / variant / f"{split}.parquet"
            assert datasets.Dataset.from_parquet(str(parquet)).to_list() == rows
            ref = tmp_path / "ref.parquet"
            datasets.Dataset.from_list(rows, features=_features(variant)).to_parquet(str(ref))
            if len(rows) <= writers.BATCH_ROWS:
                assert parquet.read_bytes() == ref.read_bytes()
    if cfg.max_pairs_per_prompt is None:  # the uncapped train split has several row groups
        assert stats["splits"]["train"]["rows"] > writers.BATCH_ROWS


def test_load_dataset_parquet_reads_the_export(tmp_path: Path) -> None:
    import datasets

    cfg = PreferenceExportConfig(test_size=0.3, formats=("parquet",))
    stats = export_preferences(Source(_records(2500)), tmp_path, cfg, PROVENANCE, Manifest())
    out = tmp_path / "export/preferences/conversational"
    files = {s: str(out / f"{s}.parquet") for s in SPLITS}
    dd = datasets.load_dataset("parquet", data_files=files, cache_dir=str(tmp_path / "cache"))
    assert {s: dd[s].num_rows for s in SPLITS} == {s: stats["splits"][s]["rows"] for s in SPLITS}
    assert dd["train"].features == _features("conversational")


def test_a_source_and_a_list_give_the_same_bytes(tmp_path: Path) -> None:
    """What the runner reads back from disk after a resume equals what it held in memory."""
    records = _records(400)
    cfg = PreferenceExportConfig(test_size=0.3, max_pairs_per_prompt=3)
    source = Source(records)
    export_preferences(records, tmp_path / "a", cfg, PROVENANCE, Manifest())
    export_preferences(source, tmp_path / "b", cfg, PROVENANCE, Manifest())
    assert source.passes == 2
    assert _tree(tmp_path / "a/export") == _tree(tmp_path / "b/export")


def test_one_shot_iterators_and_changing_sources_are_refused(tmp_path: Path) -> None:
    records = [rec(i) for i in range(5)]
    with pytest.raises(TypeError, match="re-iterable"):
        export_preferences(iter(records), tmp_path, NO_FILTERS, PROVENANCE, Manifest())

    class Shrinking(Source):
        def __iter__(self):
            self.passes += 1
            return iter(self.records[: 6 - self.passes])

    with pytest.raises(DataError, match="changed between"):
        export_preferences(Shrinking(records), tmp_path, NO_FILTERS, PROVENANCE, Manifest())
    assert not (tmp_path / "export/preferences").exists()  # nothing half-written


def test_shards_and_early_row_groups(tmp_path: Path, monkeypatch) -> None:
    """A split larger than a shard is several ``data-*.arrow`` files; long rows cut row groups
    before ``BATCH_ROWS``. Both still load as one dataset, rows in order."""
    import datasets
    import pyarrow.parquet as pq

    monkeypatch.setattr(writers, "SHARD_BYTES", 20_000)
    monkeypatch.setattr(writers, "BATCH_BYTES", 10_000)
    records = [rec(i, x=f"good answer {i} " * 5, y=f"bad {i}") for i in range(300)]
    cfg = PreferenceExportConfig(test_size=0.0, variants=("text",), max_length_ratio=None)
    export_preferences(records, tmp_path, cfg, PROVENANCE, Manifest())
    out = tmp_path / "export/preferences/text"
    shards = sorted(p.name for p in (out / "disk/train").glob("*.arrow"))
    assert (
        len(shards) > 1 and shards[-1] == f"data-{len(shards) - 1:05d}-of-{len(shards):05d}.arrow"
    )
    ids = datasets.load_from_disk(str(out / "disk"))["train"]["id"]
    assert ids == [f"pair-{i}" for i in range(300)]
    assert pq.ParquetFile(out / "train.parquet").num_row_groups > 1
    state = json.loads((out / "disk/train/state.json").read_text())
    assert [f["filename"] for f in state["_data_files"]] == shards


# -- SL-CAI -------------------------------------------------------------------------------------


def _traces(n: int) -> list[dict[str, Any] | None]:
    out: list[dict[str, Any] | None] = []
    for i in range(n):
        t = {
            "prompt_id": f"p{i}",
            "prompt": [{"role": "user", "content": f"q {i}"}],
            "status": "ok" if i % 11 else "error",
            "reason": "respond: boom",
            "initial_response": f"init {i % 3}" if i % 5 else "",
            "final_response": f"final {i % 4}" if i % 13 else "  ",
            "principle_ids": [f"c{i % 3}"],
        }
        out.append(None if i % 17 == 0 else t)
    return out


def test_sl_cai_stream_equals_the_rows(tmp_path: Path) -> None:
    import datasets

    traces = _traces(1300)
    cfg = ExportConfig(formats=["jsonl", "disk", "parquet"], show=2)
    manifest = Manifest()
    res = export_sl_cai(tmp_path, (t for t in traces), cfg, manifest)  # a generator will do
    sft, pairs, filtered = sl_cai_rows(traces)
    assert res["filtered"] == dict(filtered) == manifest.info["export"]["filtered"]
    assert res["sft"] == sft[:2] and res["pairs"] == pairs[:2]  # a preview, not every row
    for name, rows in (("sft", sft), ("pairs", pairs)):
        assert res["files"][name]["rows"] == len(rows) > writers.BATCH_ROWS or name == "pairs"
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows]
        assert (tmp_path / f"export/{name}.jsonl").read_text() == "".join(lines)
        assert datasets.load_from_disk(str(tmp_path / f"export/{name}")).to_list() == rows
        assert (
            datasets.Dataset.from_parquet(str(tmp_path / f"export/{name}.parquet")).to_list()
            == rows
        )
    again = tmp_path / "again"
    export_sl_cai(again, traces, cfg, Manifest())
    assert _tree(tmp_path / "export") == _tree(again / "export")
    assert not [p for p in (tmp_path / "export").iterdir() if p.name.startswith(".")]


def test_sl_cai_empty_export_loads_with_types(tmp_path: Path) -> None:
    import datasets

    res = export_sl_cai(tmp_path, [None], ExportConfig(formats=["disk", "parquet"]), Manifest())
    assert res["files"]["sft"]["rows"] == 0
    ds = datasets.load_from_disk(str(tmp_path / "export/pairs"))
    assert ds.num_rows == 0 and ds.features["principle_ids"] == datasets.List(
        datasets.Value("string")
    )


# -- memory -------------------------------------------------------------------------------------


def _peak(source: Any, tmp: Path, cfg: PreferenceExportConfig) -> tuple[int, dict]:
    """Python's peak allocation (tracemalloc) while exporting ``source``, and the stats."""
    tracemalloc.start()
    try:
        stats = export_preferences(source, tmp, cfg, PROVENANCE, Manifest())
        return tracemalloc.get_traced_memory()[1], stats
    finally:
        tracemalloc.stop()


STREAM_CFG = PreferenceExportConfig(min_confidence=0.5, variants=("conversational",), test_size=0.1)


def test_memory_does_not_hold_the_rows(tmp_path: Path) -> None:
    """Per kept row the export keeps two 128-bit digests with their set slots (the duplicate
    filter and, one per prompt, the split) and two floats: about 300 bytes at most, where a
    held row (its dict, messages and texts) costs well over 1 KB. Batches are bounded."""
    export_preferences(Synthetic(200), tmp_path / "warm", STREAM_CFG, PROVENANCE, Manifest())
    small, large = 1_000, 5_000
    a, _ = _peak(Synthetic(small), tmp_path / "a", STREAM_CFG)
    b, stats = _peak(Synthetic(large), tmp_path / "b", STREAM_CFG)
    assert stats["kept"] == large
    per_row = (b - a) / (large - small)
    tracemalloc.start()
    held = list(select_preferences(Synthetic(1000), STREAM_CFG).rows)
    row_cost = tracemalloc.get_traced_memory()[0] / len(held)
    tracemalloc.stop()
    assert per_row < 400, (a, b, per_row)
    assert row_cost > 3 * per_row, (row_cost, per_row)


def test_memory_is_flat_when_records_leave_no_row(tmp_path: Path) -> None:
    """Records a filter drops (here: ties) leave nothing behind: the peak does not move."""
    export_preferences(Synthetic(200, tie=True), tmp_path / "w", STREAM_CFG, PROVENANCE, Manifest())
    a, _ = _peak(Synthetic(1_000, tie=True), tmp_path / "a", STREAM_CFG)
    b, stats = _peak(Synthetic(10_000, tie=True), tmp_path / "b", STREAM_CFG)
    assert (stats["kept"], stats["filtered"]) == (0, {"tie": 10_000})
    assert b - a < 256 * 1024, (a, b)
