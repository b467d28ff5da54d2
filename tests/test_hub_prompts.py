"""Prompts from a dataset by name (rlaif.sources.hub): local folders laid out as Hub dataset
repositories (parquet shards, a README with ``configs:`` front matter), ``data_files`` globs,
streaming, limit / offset, the resolved revision in the manifest and the card, and the one-line
error for a dataset that is neither a folder nor reachable. No test touches the network."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rlaif.sources.hub as hub
from rlaif.cli.main import main
from rlaif.errors import ConfigError, DataError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.pipeline.step_runner import _prompts_identity
from rlaif.sources import read_prompt_set, read_prompts

README = """\
---
configs:
- config_name: harmless
  default: true
  data_files:
  - split: train
    path: harmless/train-*.parquet
  - split: test
    path: harmless/test-*.parquet
- config_name: helpful
  data_files:
  - split: train
    path: helpful/train-*.parquet
---
# A dataset laid out as on the Hub
"""


def hh(i: int, kind: str = "harmless") -> str:
    """An HH-RLHF-style transcript whose last human turn is the prompt."""
    return f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: {kind} question {i}?\n\nAssistant: ok {i}"


def shard(path: Path, prompts: list[str], ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"chosen": prompts, "rejected": ["x"] * len(prompts), "id": ids})
    pq.write_table(table, path)


def make_repo(root: Path, train: int = 10, shards: int = 2) -> Path:
    """A dataset repository: two configs (harmless: train + test, helpful: train)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(README, encoding="utf-8")
    per = train // shards
    for k in range(shards):
        rows = range(k * per, (k + 1) * per)
        name = f"train-{k:05d}-of-{shards:05d}.parquet"
        shard(root / "harmless" / name, [hh(i) for i in rows], [f"h{i}" for i in rows])
    test = root / "harmless" / "test-00000-of-00001.parquet"
    shard(test, [hh(i) for i in range(100, 103)], [f"t{i}" for i in range(3)])
    helpful = root / "helpful" / "train-00000-of-00001.parquet"
    shard(helpful, [hh(i, "helpful") for i in range(4)], [f"p{i}" for i in range(4)])
    return root


def pipeline(tmp_path: Path, prompts: str, stages: str | None = None) -> Path:
    """A pipeline file next to the dataset, with the fake backend."""
    p = tmp_path / "pipe.yaml"
    p.write_text(
        textwrap.dedent(f"""\
        name: hub
        seed: 1
        output: {tmp_path / "run"}
        batch_size: 4
        model: {{id: fake-model, backend: fake}}
        prompts: {prompts}
        """)
        + (stages or "stages:\n  critique_revise: {rounds: 1}\n"),
        encoding="utf-8",
    )
    return p


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """The datasets cache lives in the test's folder, and no test may reach the Hub."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def texts(found) -> list[str]:
    return [i.conversation[-1][1] for i in found.items]


# -- configs, splits, fields --------------------------------------------------------------------


def test_configs_and_splits_come_from_the_readme(tmp_path):
    make_repo(tmp_path / "repo")
    base = "{dataset: repo, field: chosen, id_field: id"
    cfg = load_pipeline(pipeline(tmp_path, base + "}"))
    found = read_prompt_set(cfg)  # the default config, split train
    assert texts(found) == [f"harmless question {i}?" for i in range(10)]
    assert found.items[0].conversation == (
        ("user", "hi"), ("assistant", "hello"), ("user", "harmless question 0?")
    )  # fmt: skip
    assert [i.id for i in found.items[:2]] == ["h0", "h1"] and found.items[5].row == 6
    assert found.source["config"] == "harmless" and found.source["split"] == "train"
    cfg = load_pipeline(pipeline(tmp_path, base + ", split: test}"))
    assert texts(read_prompt_set(cfg)) == [f"harmless question {i}?" for i in (100, 101, 102)]
    cfg = load_pipeline(pipeline(tmp_path, base + ", config: helpful, streaming: true}"))
    assert texts(read_prompt_set(cfg)) == [f"helpful question {i}?" for i in range(4)]


def test_a_path_folder_that_is_a_dataset_repo_reads_the_same(tmp_path):
    make_repo(tmp_path / "repo")
    by_path = read_prompt_set(load_pipeline(pipeline(tmp_path, "{path: repo, field: chosen}")))
    by_name = read_prompt_set(load_pipeline(pipeline(tmp_path, "{dataset: repo, field: chosen}")))
    assert by_path.items == by_name.items
    items, _ = read_prompts(tmp_path / "repo", field="chosen", split="test")
    assert len(items) == 3


def test_a_folder_without_data_is_not_searched_for_data_files(tmp_path):
    (tmp_path / "empty" / "deep").mkdir(parents=True)
    with pytest.raises(DataError, match="cannot read disk data"):
        read_prompts(tmp_path / "empty")  # read as a save_to_disk folder, as before
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "part.jsonl").write_text('{"prompt": "hi"}\n')
    assert len(read_prompts(tmp_path / "flat")[0]) == 1  # data files at its top: a dataset


@pytest.mark.parametrize(
    ("extra", "offset", "limit"),
    [("", 0, None), (", config: helpful", 1, 2), ("", 3, 4), (", split: test", 2, 10)],
)
def test_streaming_reads_the_same_prompts(tmp_path, extra, offset, limit):
    make_repo(tmp_path / "repo", train=12, shards=3)
    rows = f", offset: {offset}" + (f", limit: {limit}" if limit else "")
    found = {}
    for streaming in ("false", "true"):
        spec = f"{{dataset: repo, field: chosen{extra}{rows}, streaming: {streaming}}}"
        found[streaming] = read_prompt_set(load_pipeline(pipeline(tmp_path, spec)))
    assert found["true"].items == found["false"].items
    assert found["true"].source["revision"] == found["false"].source["revision"]


def test_limit_and_offset_cross_shards_and_count_rows(tmp_path):
    make_repo(tmp_path / "repo", train=12, shards=3)  # 4 rows per shard
    for streaming in (False, True):
        spec = f"{{dataset: repo, field: chosen, offset: 3, limit: 4, streaming: {streaming}}}"
        found = read_prompt_set(load_pipeline(pipeline(tmp_path, spec)))
        assert texts(found) == [f"harmless question {i}?" for i in range(3, 7)]
        assert [i.row for i in found.items] == [4, 5, 6, 7]  # 1-based rows of the split
        assert found.source["offset"] == 3 and found.source["limit"] == 4
        spec = f"{{dataset: repo, field: chosen, offset: 12, streaming: {streaming}}}"
        with pytest.raises(DataError, match="no prompts found"):
            read_prompt_set(load_pipeline(pipeline(tmp_path, spec)))


def test_streaming_reads_only_the_rows_it_needs(tmp_path, monkeypatch):
    """With a limit, streaming stops after the first shard; nothing is prepared."""
    make_repo(tmp_path / "repo", train=12, shards=3)
    batches = []
    monkeypatch.setattr(hub, "BATCH", 2)
    real = hub.ResolvedDataset.rows

    def counting(self, offset, columns):
        for n, row in real(self, offset, columns):
            batches.append(n)
            yield n, row

    monkeypatch.setattr(hub.ResolvedDataset, "rows", counting)
    spec = "{dataset: repo, field: chosen, limit: 3, streaming: true}"
    found = read_prompt_set(load_pipeline(pipeline(tmp_path, spec)))
    assert len(found.items) == 3 and max(batches) <= 4
    assert not list((tmp_path / "hf-cache").rglob("*.arrow"))  # no copy of the set was written


# -- data_files ---------------------------------------------------------------------------------


def test_data_files_globs_inside_a_dataset_and_alone(tmp_path):
    make_repo(tmp_path / "repo", train=12, shards=3)
    globs = "{train: 'harmless/train-0000[12]-*.parquet'}"
    spec = f"{{dataset: repo, field: chosen, data_files: {globs}}}"
    found = read_prompt_set(load_pipeline(pipeline(tmp_path, spec)))
    assert texts(found) == [f"harmless question {i}?" for i in range(4, 12)]
    assert found.source["data_files"] == {"train": ["harmless/train-0000[12]-*.parquet"]}
    (tmp_path / "extra").mkdir()
    for k in range(2):
        lines = [json.dumps({"q": f"extra {k}-{i}"}) for i in range(3)]
        (tmp_path / "extra" / f"part-{k}.jsonl").write_text("\n".join(lines) + "\n")
    for streaming in ("false", "true"):
        spec = f"{{data_files: ['extra/*.jsonl'], field: q, streaming: {streaming}}}"
        found = read_prompt_set(load_pipeline(pipeline(tmp_path, spec)))
        assert texts(found) == [f"extra {k}-{i}" for k in range(2) for i in range(3)]
        assert found.source["revision"].startswith("sha256:")
    spec = "{data_files: {test: 'extra/part-1.jsonl'}, split: test, field: q}"
    assert len(read_prompt_set(load_pipeline(pipeline(tmp_path, spec))).items) == 3


# -- errors, at load time -----------------------------------------------------------------------


def test_an_unknown_dataset_is_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import rlaif.calls.factory
    import rlaif.pipeline.runner

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(rlaif.pipeline.runner, "make_caller", no_model)
    monkeypatch.setattr(rlaif.calls.factory, "make_caller", no_model)
    p = pipeline(tmp_path, "{dataset: no-such-org/no-such-set, field: chosen}")
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    msg = str(info.value)
    assert "\n" not in msg and "'no-such-org/no-such-set'" in msg
    assert info.value.field == "prompts.dataset" and info.value.line == 6
    assert "prompts.dataset: DIR" in msg and "HF_HUB_OFFLINE is set" in msg
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-org/no-such-set" in err
    # read at run time too (the dataset went away after the check): still before any model
    cfg = load_pipeline(pipeline(tmp_path, "{path: p.jsonl}"))
    cfg.prompts.path, cfg.prompts.dataset = "", "no-such-org/no-such-set"
    with pytest.raises(DataError, match="no-such-org/no-such-set"):
        run_pipeline(cfg)


def test_an_unreachable_hub_is_asked_once_then_the_cache(tmp_path, monkeypatch):
    """Without HF_HUB_OFFLINE, one short request decides; no retries follow it."""
    import huggingface_hub

    calls = []

    def unreachable(self, repo_id, **kw):
        calls.append((repo_id, kw.get("timeout")))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(ConfigError) as info:
        load_pipeline(pipeline(tmp_path, "{dataset: someone/hh-copy}"))
    assert calls == [("someone/hh-copy", hub.PROBE_TIMEOUT)]
    assert "cannot be reached" in str(info.value) and "not in the local datasets cache" in str(
        info.value
    )


def test_a_name_the_hub_does_not_know(tmp_path, monkeypatch):
    import httpx2  # the HTTP client huggingface_hub raises with
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def missing(self, repo_id, **kw):
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://hub.test"))
        raise RepositoryNotFoundError("404", response=response)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", missing)
    with pytest.raises(ConfigError, match="'someone/typo' is not on the Hugging Face Hub"):
        load_pipeline(pipeline(tmp_path, "{dataset: someone/typo}"))


@pytest.mark.parametrize(
    ("prompts", "field", "words"),
    [
        ("{dataset: repo, config: nope}", "prompts.config", "BuilderConfig 'nope' not found"),
        ("{dataset: repo, split: validation}", "prompts.split", "has: train, test"),
        ("{dataset: repo, revision: main}", "prompts.revision", "local folder"),
        ("{dataset: repo, path: p.jsonl}", "prompts.dataset", "not both"),
        ("{path: p.jsonl, config: x}", "prompts.config", "not to a file"),
        ("{path: p.jsonl, streaming: true}", "prompts.streaming", "not to a file"),
        ("{dataset: repo, data_files: [1]}", "prompts.data_files", "glob"),
        ("{dataset: repo, data_files: [none/*.parquet]}", "prompts.data_files", "data files"),
        ("{dataset: ./missing}", "prompts.dataset", "no dataset folder"),
    ],
)
def test_options_that_do_not_fit_name_their_field(tmp_path, prompts, field, words):
    make_repo(tmp_path / "repo")
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError) as info:
        load_pipeline(pipeline(tmp_path, prompts))
    assert info.value.field == field and words in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_column_lists_the_columns(tmp_path):
    make_repo(tmp_path / "repo")
    for streaming in ("false", "true"):
        cfg = load_pipeline(pipeline(tmp_path, f"{{dataset: repo, streaming: {streaming}}}"))
        with pytest.raises(DataError, match=r"no column 'prompt' \(columns: chosen, rejected, id"):
            read_prompt_set(cfg)


# -- revision: provenance, manifest, card --------------------------------------------------------


def test_a_hub_dataset_is_pinned_to_the_commit_it_resolved(tmp_path, monkeypatch):
    """The Hub's answer (mocked at the HTTP boundary) pins the builder and is recorded."""
    import datasets
    import huggingface_hub

    repo = make_repo(tmp_path / "repo")
    sha = "0123456789abcdef0123456789abcdef01234567"
    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info",
                        lambda self, repo_id, **kw: type("Info", (), {"sha": sha})())  # fmt: skip

    def builder(spec, revision):  # the repository's files, as the Hub would serve them
        asked.append(revision)
        return datasets.load_dataset_builder(str(repo), spec.config, data_files=spec.data_files)

    monkeypatch.setattr(hub, "_builder", builder)
    cfg = load_pipeline(pipeline(tmp_path, "{dataset: acme/hh-like, revision: v1, field: chosen}"))
    found = read_prompt_set(cfg)
    assert asked == [sha]  # resolved once per process: the check and the read agree
    assert found.source["revision"] == sha and found.source["requested_revision"] == "v1"
    assert found.source["hub"] is True and len(found.items) == 10
    assert _prompts_identity(cfg)["revision"] == sha


RL_STAGES = """\
stages:
  critique_revise: {rounds: 1}
  sample: {n: 2, temperature: 0.8}
  judge: {}
  export:
    preferences: {min_confidence: 0.5, max_length_ratio: null, test_size: 0.25}
"""


def test_a_pipeline_runs_on_a_local_dataset_repo(tmp_path):
    """End to end with the fake backend: the revision reaches the manifest and the card."""
    make_repo(tmp_path / "repo", train=8)
    spec = "{dataset: repo, field: chosen, id_field: id, limit: 6, streaming: true}"
    res = run_pipeline(load_pipeline(pipeline(tmp_path, spec, RL_STAGES)))
    manifest = json.loads((res.run_dir / "manifest.json").read_text())
    source = manifest["info"]["prompts"]["source"]
    assert manifest["info"]["prompts"]["kept"] == 6
    assert source["dataset"] == "repo" and source["config"] == "harmless"
    assert source["revision"].startswith("sha256:") and source["streaming"] is True
    assert manifest["info"]["provenance"]["prompts"] == source
    card = (res.run_dir / "export/preferences/README.md").read_text()
    line = (
        f"- **Prompts**: `repo`, config `harmless`, split `train`, revision `{source['revision']}`"
    )
    assert line + ", offset 0, limit 6" in card
    sft = [json.loads(x) for x in (res.run_dir / "export/sft.jsonl").read_text().splitlines()]
    assert len(sft) == 6 and sft[0]["messages"][2]["content"] == "harmless question 0?"
    # another byte in a data file is another revision
    (tmp_path / "repo" / "README.md").write_text(README + "\nmore\n")
    again = read_prompt_set(load_pipeline(pipeline(tmp_path, spec, RL_STAGES)))
    assert again.source["revision"] != source["revision"]


def test_a_prompt_file_records_its_hash(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "there"}\n')
    found = read_prompt_set(load_pipeline(pipeline(tmp_path, "{path: p.jsonl}")))
    assert found.source["path"] == "p.jsonl" and found.source["revision"].startswith("sha256:")


# -- the bench's pure parts ---------------------------------------------------------------------


def test_bench_builds_a_readable_repo_and_prints_ratios(tmp_path):
    from bench import hub_prompts

    hub_prompts.build(tmp_path / "repo", rows=50, shards=3)
    found = read_prompts(tmp_path / "repo", id_field="id")[0]
    assert len(found) == 50 and found[-1].id == "p49"
    common = {"count": 10, "base_rss": 100, "cache_bytes": 0}
    results = [
        {"mode": m, "streaming": s, "seconds": 2.0 if s else 4.0, "peak_rss": 150 if s else 300}
        | common
        for m in hub_prompts.MODES
        for s in (True, False)
    ]
    text, ratios = hub_prompts.table(results, first=10)
    assert ratios["first"] == {"peak_rss": 2.0, "growth": 4.0, "seconds": 2.0}
    assert "| first 10 prompts | yes | 10 |" in text
