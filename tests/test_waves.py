"""Runs in waves: prompts streamed from their source, the wave ledger, cheap re-runs (fake
backend). A run of more than one wave gives what one pass over all prompts gave; a finished
run answers a re-run without rendering a request or reading a record; changing only the
export re-exports without judging; the ledger never vouches for records that are gone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.pipeline.waves import WAVE, Ledger
from rlaif.prompts import PromptBook
from rlaif.sources import read_prompts
from rlaif.sources.stream import open_prompt_stream
from rlaif.store import StageStore

QUIET = io.StringIO()

PIPE = """\
name: waves
seed: 1
output: {out}
batch_size: 64
constitution: helpful-harmless
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt, id_field: id}}
stages:
  sample: {{n: 3, temperature: 0.8, max_new_tokens: 8}}
  judge: {{principles_k: 1, pairs: {pairs}}}
  export:
    formats: [jsonl]
    preferences: {{min_confidence: {conf}, max_length_ratio: null, test_size: 0.1}}
"""


def make(tmp_path: Path, n: int, *, pairs: str = "all", conf: float = 0.5, dup: int = 0) -> Path:
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"p{i}", "prompt": f"How do I do task {i}?"}) + "\n")
        for i in range(dup):  # duplicate ids: left out, and counted
            fh.write(json.dumps({"id": f"p{i}", "prompt": "again"}) + "\n")
    p = tmp_path / "pipe.yaml"
    p.write_text(PIPE.format(out=tmp_path / "run", pairs=pairs, conf=conf), encoding="utf-8")
    return p


def export_bytes(run: Path) -> dict[str, bytes]:
    folder = run / "export" / "preferences"
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*.jsonl"))}


def test_prompt_stream_reads_what_read_prompts_reads_a_wave_at_a_time(tmp_path):
    pipe = make(tmp_path, WAVE + 10, dup=3)
    cfg = load_pipeline(pipe)
    stream = open_prompt_stream(cfg).scan()
    items, skipped = read_prompts(tmp_path / "prompts.jsonl", field="prompt", id_field="id")
    assert stream.count == len(items) == WAVE + 10
    assert stream.skipped == skipped and len(skipped) == 3
    waves = list(stream.waves(WAVE))
    assert [len(w) for w in waves] == [WAVE, 10]
    assert [i for w in waves for i in w] == items
    assert stream.source["revision"].startswith("sha256:")


@pytest.mark.parametrize("pairs", ["all", "best_vs_worst"])
def test_a_run_of_several_waves_equals_one_pass_and_reruns_render_nothing(
    tmp_path, monkeypatch, pairs
):
    n = 2 * WAVE + 37  # three waves, the last one short
    pipe = make(tmp_path, n, pairs=pairs, dup=2)
    run = tmp_path / "run"
    res = run_pipeline(load_pipeline(pipe), stream=QUIET)
    m = res.manifest
    assert m.info["prompts"]["kept"] == n and m.info["prompts"]["dropped"] == {
        "duplicate prompt": 2
    }
    assert m.stages["sample"].ok == n
    judged = m.stages["judge"].ok + m.stages["judge"].error
    assert judged == m.stages["judge"].expected == 3 * n  # 3 pairs of 3 samples per prompt
    stats = res.exports["preferences"]
    assert stats["kept"] + sum(stats["filtered"].values()) == stats["inputs"]
    rows = [
        json.loads(line)
        for f in sorted((run / "export" / "preferences" / "conversational").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    waves = {int(r["prompt_id"][1:]) // WAVE for r in rows}
    assert waves == {0, 1, 2}  # rows from every wave
    first = export_bytes(run)
    mtime = (run / "export" / "preferences" / "README.md").stat().st_mtime_ns

    # A finished run: no request rendered, no model call, the export left as it is.
    def no_render(*args, **kwargs):
        raise AssertionError("a finished run rendered a request")

    monkeypatch.setattr(PromptBook, "render", no_render)
    again = run_pipeline(load_pipeline(pipe), stream=QUIET)
    assert again.stats["model_calls"] == 0
    assert export_bytes(run) == first
    assert (run / "export" / "preferences" / "README.md").stat().st_mtime_ns == mtime
    assert again.manifest.stages["judge"].ok == m.stages["judge"].ok
    assert again.exports["preferences"]["kept"] == stats["kept"]

    # The same run from scratch in another folder gives the same bytes.
    monkeypatch.undo()
    other = run_pipeline(load_pipeline(pipe), out=tmp_path / "other", stream=QUIET)
    assert export_bytes(other.run_dir) == first


def test_export_settings_alone_re_export_without_judging(tmp_path, monkeypatch):
    pipe = make(tmp_path, WAVE + 5)
    run = tmp_path / "run"
    res = run_pipeline(load_pipeline(pipe), stream=QUIET)
    monkeypatch.setattr(
        PromptBook, "render", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rendered"))
    )
    stricter = run_pipeline(
        load_pipeline(pipe, ["stages.export.preferences.min_confidence=0.9"]), stream=QUIET
    )
    assert stricter.stats["model_calls"] == 0
    assert stricter.exports["preferences"]["kept"] < res.exports["preferences"]["kept"]
    assert stricter.exports["preferences"]["inputs"] == res.exports["preferences"]["inputs"]
    assert (run / "export" / "preferences" / "README.md").is_file()


def test_judge_settings_judge_again_and_the_ledger_never_vouches_for_lost_records(tmp_path):
    pipe = make(tmp_path, 40)
    run = tmp_path / "run"
    first = run_pipeline(load_pipeline(pipe), stream=QUIET)
    first_bytes = export_bytes(run)
    two = run_pipeline(load_pipeline(pipe, ["stages.judge.principles_k=2"]), stream=QUIET)
    assert two.stats["model_calls"] > 0  # new judge requests; the samples come from the store
    assert two.manifest.stages["sample"].ok == 40
    assert export_bytes(run) != first_bytes
    # back to the first settings: answered from the ledger and the call cache
    back = run_pipeline(load_pipeline(pipe), stream=QUIET)
    assert back.stats["model_calls"] == 0
    assert back.exports["preferences"]["kept"] == first.exports["preferences"]["kept"]
    assert export_bytes(run) == first_bytes
    # the judge's records deleted: the ledger's waves are checked again and the records remade
    for f in (run / "stages" / "judge").glob("shard-*.jsonl"):
        f.unlink()
    for f in (run / "stages" / "judge").glob("*index*"):
        f.unlink()
    again = run_pipeline(load_pipeline(pipe), stream=QUIET)
    assert again.stats["model_calls"] == 0  # the call cache answers
    assert len(StageStore(run, "judge", readonly=True)) == 40 * 3


def test_ledger_entries_with_errors_are_redone_when_retrying(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.finish("sample", "fp", 0, errors=2, prompts=10)
    assert ledger.finished("sample", "fp", 0)["errors"] == 2
    assert ledger.finished("sample", "fp", 0, retry_errors=True) is None
    ledger.finish("sample", "fp", 0, errors=0, prompts=10)
    assert ledger.finished("sample", "fp", 0, retry_errors=True)["errors"] == 0
    ledger.finish("sample", "fp", 0, errors=5, prompts=10)  # a finished wave stays finished
    assert ledger.finished("sample", "fp", 0)["errors"] == 0
    assert ledger.finished("sample", "other", 0) is None
    ledger.close()


def _traced_peak(tmp_path: Path, n: int, trace: bool = True) -> int:
    import tracemalloc

    tmp_path.mkdir()
    pipe = make(tmp_path, n)
    pipe.write_text(pipe.read_text().replace("n: 3,", "n: 2,"))  # one pair a prompt
    cfg = load_pipeline(pipe)
    if not trace:  # warm-up: the imports an export makes are not a run's state
        run_pipeline(cfg, stream=QUIET)
        return 0
    tracemalloc.start()
    try:
        run_pipeline(cfg, stream=QUIET)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_prompts(tmp_path, monkeypatch):
    """Python's allocations peak at about the same height for 4x the prompts. The runner
    that held every prompt, sample and judged pair grew by ~80 KB a prompt (RSS); what may
    still grow here is small: the export's 16-byte digests per row and prompt, 8 bytes a
    prompt while the prompts are scanned."""
    import rlaif.store.index

    # the stores' index buffers are bounded (FLUSH ids, ~6 MB); make them small so that what
    # this test measures is the rest
    monkeypatch.setattr(rlaif.store.index, "FLUSH", 256)
    _traced_peak(tmp_path / "warm", 8, trace=False)
    small = _traced_peak(tmp_path / "small", WAVE)
    large = _traced_peak(tmp_path / "large", 4 * WAVE)
    per_prompt = (large - small) / (3 * WAVE)
    assert per_prompt < 1500, (small, large, per_prompt)  # measured: ~1,060 bytes
