"""Pipeline config, prompt sources and the resumable critique-and-revise runner (fake backend)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlaif.backends import FakeBackend
from rlaif.cli.main import main
from rlaif.errors import ConfigError, DataError
from rlaif.pipeline import load_pipeline, read_prompts, run_pipeline
from rlaif.store import StageStore

ROOT = Path(__file__).resolve().parents[1]

PIPE = """\
name: t
seed: 3
output: {out}
batch_size: 4
constitution: helpful-harmless
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  critique_revise:
    rounds: 2
    few_shot: 1
    respond: {{max_new_tokens: 16}}
    critique: {{max_new_tokens: 16}}
    revise: {{max_new_tokens: 16}}
  export: {{formats: [jsonl, disk, parquet]}}
"""


def make_pipeline(tmp_path: Path, n: int = 10, text: str = PIPE) -> Path:
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"question number {i}: how do I do thing {i}?"}) + "\n")
    p = tmp_path / "pipe.yaml"
    p.write_text(text.format(out=tmp_path / "run"), encoding="utf-8")
    return p


# --- config ----------------------------------------------------------------------------------


def test_config_loads_and_overrides(tmp_path):
    cfg = load_pipeline(
        make_pipeline(tmp_path),
        ["batch_size=2", "stages.critique_revise.rounds=1", "model.options.delay=0"],
    )
    assert cfg.batch_size == 2 and cfg.stages.critique_revise.rounds == 1
    assert cfg.model.options == {"delay": 0}
    assert cfg.resolve_path(cfg.prompts.path) == tmp_path / "prompts.jsonl"


@pytest.mark.parametrize(
    ("edit", "line", "field", "words"),
    [
        (("batch_size: 4", "batch_size: four"), 4, "batch_size", "must be int"),
        (("batch_size: 4", "batch_sise: 4"), 4, "batch_sise", "unknown key"),
        (("rounds: 2", "rounds: 0"), 10, "stages.critique_revise.rounds", "at least 1"),
        (("backend: fake", "backend: tensorflow"), 6, "model.backend", "not one of"),
        (
            ("respond: {{max_new_tokens: 16}}", "respond: {{temperature: -1}}"),
            12,
            "stages.critique_revise.respond",
            "temperature",
        ),
        (("few_shot: 1", "few_shot: [1]"), 11, "stages.critique_revise.few_shot", "must be int"),
    ],
)
def test_config_errors(tmp_path, edit, line, field, words):
    p = make_pipeline(tmp_path, text=PIPE.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    err = info.value
    assert (err.line, err.field) == (line, field), str(err)
    assert words in str(err) and "pipe.yaml" in str(err) and "\n" not in str(err)


def test_config_override_errors(tmp_path):
    p = make_pipeline(tmp_path)
    with pytest.raises(ConfigError, match=r"^--set: field 'batch_size': must be int"):
        load_pipeline(p, ["batch_size=lots"])
    with pytest.raises(ConfigError, match=r"--set: field 'model.nope': unknown key"):
        load_pipeline(p, ["model.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_pipeline(p, ["batch_size"])


def test_builtin_pipelines_load_and_say_how_to_run():
    for path in sorted((ROOT / "pipelines").glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# Run with: rlaif run"), path
        load_pipeline(path)


# --- prompt sources --------------------------------------------------------------------------


def test_sources_all_formats(tmp_path):
    import datasets

    rows = [
        {"q": "hello?", "k": "a"},
        {"q": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: why?\n\nAssistant: because", "k": "b"},
        {"q": "hello?", "k": "c"},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "p.csv").write_text("q,k\nhello?,a\nhow are you?,b\n")
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "disk"))
    items, skipped = read_prompts(tmp_path / "p.jsonl", field="q")
    assert len(items) == 2 and skipped == [
        {"id": items[0].id, "row": 3, "reason": "duplicate prompt"}
    ]
    assert items[1].conversation == (("user", "hi"), ("assistant", "yo"), ("user", "why?"))
    assert len(read_prompts(tmp_path / "p.csv", field="q")[0]) == 2
    assert len(read_prompts(tmp_path / "p.parquet", field="q")[0]) == 2
    items, _ = read_prompts(tmp_path / "disk", field="q", id_field="k")
    assert [i.id for i in items] == ["a", "b", "c"]
    assert len(read_prompts(tmp_path / "p.jsonl", field="q", limit=1)[0]) == 1


@pytest.mark.parametrize(
    ("content", "words", "line"),
    [
        (b'{"prompt": "ok"}\n{"prompt": \n', "invalid JSON", 2),
        (b'{"prompt": "ok"}\n{"other": "x"}\n', "no column 'prompt'", 2),
        (b'{"prompt": "ok"}\n{"prompt": "\xff"}\n', "UTF-8", 2),
        (b'{"prompt": ""}\n', "empty", 1),
        (b'{"prompt": 5}\n', "text or a list of messages", 1),
        (b"\n\n", "no prompts found", None),
        (b"[1, 2]\n", "not an object", 1),
    ],
)
def test_sources_errors(tmp_path, content, words, line):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_prompts(p)
    assert words in str(info.value) and info.value.line == line and "bad.jsonl" in str(info.value)


@pytest.mark.parametrize("column", ["id", "label"])
def test_sources_refuse_a_lone_surrogate_in_the_id_or_label_column(tmp_path, column):
    # found by the fuzz test: such an id or label was read, then failed when its record was
    # written; it is refused at read time like one in the prompt
    p = tmp_path / "bad.jsonl"
    row = {"prompt": "ok", "id": "a", "label": "safe", column: "\ud800 x"}
    p.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="lone surrogate") as info:
        read_prompts(p, id_field="id", label_field="label")
    assert info.value.field == column and info.value.line == 1


# --- runner ----------------------------------------------------------------------------------


def test_run_produces_datasets_and_traces(tmp_path):
    cfg = load_pipeline(make_pipeline(tmp_path, n=10))
    res = run_pipeline(cfg)
    run = tmp_path / "run"
    assert res.stats["requests"] == 10 * 5  # respond + 2 x (critique, revise)
    traces = list(StageStore(run, "critique_revise", readonly=True).iter_records())
    assert len(traces) == 10 and all(t["status"] == "ok" for t in traces)
    t = traces[0]
    assert [r["round"] for r in t["rounds"]] == [1, 2]
    assert t["rounds"][1]["response"] == t["rounds"][0]["revision"]
    assert t["final_response"] == t["rounds"][1]["revision"]
    prov = t["provenance"]
    assert (
        prov["constitution"]["name"] == "helpful-harmless"
        and len(prov["constitution"]["hash"]) == 64
    )
    assert {"respond", "critique", "revise"} <= set(prov["templates"])
    assert prov["seed"] == 3 and prov["rlaif_version"]
    pairs = [json.loads(x) for x in (run / "export" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 10
    for row in pairs:
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == "assistant" and row["chosen"] != row["rejected"]
    sft = [json.loads(x) for x in (run / "export" / "sft.jsonl").read_text().splitlines()]
    assert sft[0]["messages"][-1]["role"] == "assistant"
    import datasets

    assert datasets.load_from_disk(str(run / "export" / "pairs")).num_rows == 10
    assert (run / "export" / "pairs.parquet").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["critique_revise"]["ok"] == 10
    assert manifest["problems"] == [] and manifest["finished_at"]
    assert manifest["info"]["export"]["pair_rows"] == 10


def test_rerun_makes_zero_model_calls_and_same_bytes(tmp_path):
    cfg = load_pipeline(make_pipeline(tmp_path, n=7))
    run_pipeline(cfg)
    first = (tmp_path / "run" / "export" / "pairs.jsonl").read_bytes()
    res = run_pipeline(cfg)
    assert res.stats["model_calls"] == 0 and res.stats["requests"] == 0
    assert (tmp_path / "run" / "export" / "pairs.jsonl").read_bytes() == first
    # another batch size: the cache key and record ids ignore it
    res = run_pipeline(load_pipeline(tmp_path / "pipe.yaml", ["batch_size=3"]))
    assert res.stats["model_calls"] == 0
    assert (tmp_path / "run" / "export" / "pairs.jsonl").read_bytes() == first


def test_batch_size_does_not_change_results(tmp_path):
    p = make_pipeline(tmp_path, n=9)
    run_pipeline(load_pipeline(p, ["batch_size=1"]), out=tmp_path / "a")
    run_pipeline(load_pipeline(p, ["batch_size=8"]), out=tmp_path / "b")
    for name in ("pairs.jsonl", "sft.jsonl"):
        assert (tmp_path / "a/export" / name).read_bytes() == (
            tmp_path / "b/export" / name
        ).read_bytes()


def test_changed_constitution_reruns(tmp_path):
    p = make_pipeline(tmp_path, n=3)
    run_pipeline(load_pipeline(p))
    res = run_pipeline(load_pipeline(p, ["constitution=harmless-for-kids"]))
    # new principles, new critiques and revisions; the initial responses are reused
    assert res.stats["requests"] == 3 * 4


def test_failure_isolated_to_one_prompt(tmp_path):
    p = make_pipeline(tmp_path, n=8)
    with open(tmp_path / "prompts.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "this one is POISON for the model"}) + "\n")
    backend = FakeBackend(fail_marker="POISON")
    res = run_pipeline(load_pipeline(p), backend=backend)
    m = res.manifest.stages["critique_revise"]
    assert (m.ok, m.error) == (8, 1)
    assert any(r.startswith("respond: BackendError") for r in m.reasons["error"])
    assert res.exports["filtered"] == {"generation failed: respond": 1}
    # errors are final unless asked: a re-run makes no calls; --retry-errors tries again
    assert (
        run_pipeline(load_pipeline(p), backend=FakeBackend(fail_marker="POISON")).stats["requests"]
        == 0
    )
    again = run_pipeline(load_pipeline(p), backend=FakeBackend(), retry_errors=True)
    assert again.manifest.stages["critique_revise"].ok == 9


def test_cli_run_and_bad_pipeline(tmp_path, capsys):
    p = make_pipeline(tmp_path, n=4)
    assert main(["run", str(p), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "pairs: 4 rows" in out and "PROMPT:" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPE.format(out="x").replace("seed: 3", "seed: [3]"))
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.yaml:2: field 'seed'" in err


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from rlaif.backends import FakeBackend
    from rlaif.pipeline import load_pipeline, run_pipeline

    class Slow(FakeBackend):
        def generate(self, conversations, params):
            time.sleep(0.02)
            return super().generate(conversations, params)

    run_pipeline(load_pipeline(sys.argv[1], ["batch_size=2"]), out=sys.argv[2], backend=Slow())
    """
)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    p = make_pipeline(tmp_path, n=24)
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(p), str(ref)], check=True, capture_output=True)
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = 0
    for delay in (0.6, 0.9, 1.2, 1.5, 1.8):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(p), str(run)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run([sys.executable, str(script), str(p), str(run)], check=True, capture_output=True)
    assert kills >= 1
    for name in ("pairs.jsonl", "sft.jsonl"):
        assert (run / "export" / name).read_bytes() == (ref / "export" / name).read_bytes()
    for stage in ("respond", "critique-1", "revise-2", "critique_revise"):
        ids = [
            json.loads(line)["id"]
            for f in sorted((run / "stages" / stage).glob("*.jsonl"))
            for line in f.read_text().splitlines()
        ]
        assert len(ids) == len(set(ids)), f"duplicate records in {stage}"
    assert json.loads((run / "manifest.json").read_text())["stages"]["critique_revise"]["ok"] == 24


RL_PIPE = """\
name: rl
seed: 1
output: {out}
batch_size: 8
constitution: helpful-harmless
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  critique_revise: {{rounds: 1}}
  sample: {{n: 3, temperature: 0.8}}
  judge: {{principles_k: 2, pairs: {pairs}}}
  export:
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.25}}
"""


@pytest.mark.parametrize("pairs", ["all", "best_vs_worst"])
def test_rl_cai_chain_accounts_for_everything(tmp_path, pairs):
    p = make_pipeline(tmp_path, n=8, text=RL_PIPE.replace("{pairs}", pairs))
    res = run_pipeline(load_pipeline(p))
    stats = res.exports["preferences"]
    run = tmp_path / "run"
    judged = list(StageStore(run, "judge", readonly=True).iter_records())
    # 8 CAI-SL pairs + 3 sampled pairs per prompt, each judged in both orders under 2 principles
    assert len(judged) == 8 + 8 * 3
    assert all(len(r["verdict"]["members"]) == 2 for r in judged)
    # a principle drawn twice for a pair is judged once
    assert res.stats["requests"] + res.stats["duplicates"] == 8 * 3 + 8 + len(judged) * 2 * 2
    expected_inputs = 8 + (8 * 3 if pairs == "all" else 8)
    assert stats["inputs"] == expected_inputs
    assert stats["kept"] + sum(stats["filtered"].values()) == expected_inputs
    rows = [
        json.loads(x)
        for f in ("train", "test")
        for x in (run / "export/preferences/conversational" / f"{f}.jsonl").read_text().splitlines()
    ]
    assert len(rows) == stats["kept"]
    assert all(r["chosen"] != r["rejected"] and r["margin"] > 0 for r in rows)
    card = (run / "export/preferences/README.md").read_text()
    assert "helpful-harmless" in card and "fake-model" in card
    before = (run / "export/preferences/conversational/train.jsonl").read_bytes()
    again = run_pipeline(load_pipeline(p))
    assert again.stats["requests"] == 0
    assert (run / "export/preferences/conversational/train.jsonl").read_bytes() == before


def test_rl_cai_config_errors(tmp_path):
    p = make_pipeline(tmp_path, text=RL_PIPE.replace("{pairs}", "some"))
    with pytest.raises(ConfigError, match="not one of all, best_vs_worst"):
        load_pipeline(p)
    p = make_pipeline(
        tmp_path,
        text=RL_PIPE.replace("{pairs}", "all").replace("min_confidence: 0.5", "min_confidence: 2"),
    )
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    assert info.value.field == "stages.export.preferences.min_confidence"
    assert info.value.line == 13


def test_judge_ensemble_across_models(tmp_path):
    """Two judge models: each judges every pair; the exported verdicts are their average."""
    text = RL_PIPE.replace("{pairs}", "all").replace(
        "judge: {{principles_k: 2, pairs: all}}",
        "judge: {{principles_k: 1, pairs: all,"
        " extra_models: [{{id: other-judge, backend: fake}}]}}",
    )
    p = make_pipeline(tmp_path, n=4, text=text)
    res = run_pipeline(load_pipeline(p))
    run = tmp_path / "run"
    one = {r["id"]: r for r in StageStore(run, "judge", readonly=True).iter_records()}
    two = list(StageStore(run, "judge-2", readonly=True).iter_records())
    assert len(one) == len(two) == 4 + 4 * 3
    assert res.manifest.info["provenance"]["judge_models"][1]["model"] == "other-judge"
    rows = [
        json.loads(x)
        for f in ("train", "test")
        for x in (run / "export/preferences/conversational" / f"{f}.jsonl").read_text().splitlines()
    ]
    assert rows and all(r["chosen"] != r["rejected"] for r in rows)
    assert res.exports["preferences"]["inputs"] == 4 + 4 * 3


def test_demo_runs_the_quickstart_through_the_run_command(tmp_path, capsys):
    """`rlaif demo` (what `make demo` runs) with every `rlaif run` option at its default."""
    out = tmp_path / "demo"
    sets = ["--set", "model.backend=fake", "--set", "prompts.limit=2"]
    assert main(["demo", *sets, "--out", str(out)]) == 0
    assert "sft: 2 rows" in capsys.readouterr().out
    assert (out / "export" / "sft.jsonl").is_file()


# --- identical requests ------------------------------------------------------------------------


def test_identical_requests_in_one_call_are_computed_once(tmp_path):
    from rlaif.backends.base import SamplingParams
    from rlaif.calls.caller import GenRequest, ModelCaller, ScoreRequest
    from rlaif.store import CallCache

    backend = FakeBackend(fail_marker="POISON")
    caller = ModelCaller(
        lambda: backend,
        model="fake",
        revision="0",
        cache=CallCache(tmp_path / "calls.jsonl"),
        batch_size=2,
    )
    conv = [[{"role": "user", "content": t}] for t in ("a?", "b?", "POISON?")]
    params = SamplingParams(temperature=1.0, seed=5, max_new_tokens=8, n=2)
    order = [0, 1, 0, 2, 0, 2]
    seen: list[int] = []
    out = caller.generate(
        [GenRequest(conv[k], params) for k in order],
        on_batch=lambda idx, res: seen.extend(idx),
    )
    # each distinct request answered once (calls holding POISON fail and are split up)
    sent = [
        c[0]["content"]
        for _, convs in backend.history
        if not any("POISON" in c[0]["content"] for c in convs)
        for c in convs
    ]
    assert sent.count("a?") == sent.count("b?") == 1 and caller.stats.duplicates == 3
    assert sorted(seen) == list(range(len(order)))  # every request saved once
    assert out[0].completions == out[2].completions == out[4].completions
    assert out[2] is not out[0] and out[2].completions[0] is not out[0].completions[0]
    assert not out[3].ok and out[5].error == out[3].error  # a failure is every copy's
    assert out[0].completions != out[1].completions
    # Scoring: the same, and the cache keeps one entry per distinct request.
    scores = caller.score([ScoreRequest(conv[k], ["A", "B"]) for k in (1, 1, 0)])
    assert backend.scored_requests == 2 and caller.stats.duplicates == 4
    assert scores[0].scores == scores[1].scores != scores[2].scores
    assert len(caller.cache) == 4


def test_a_principle_drawn_twice_is_judged_once(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("kr", ROOT / "bench" / "kill_resume.py")
    assert spec is not None and spec.loader is not None
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    pipe = kr.setup(tmp_path, "fake", prompts=4, tokens=16)
    # 8 draws with replacement from the constitution's judge principles: repeats are certain
    cfg = load_pipeline(pipe, ["stages.judge.principles_k=8", "constitution=harmless-for-kids"])
    backend = FakeBackend()
    res = run_pipeline(cfg, out=tmp_path / "run", backend=backend, stream=io.StringIO())
    judged = [r for r in StageStore(tmp_path / "run", "judge", readonly=True).iter_records()]
    members = sum(len(r["verdict"]["members"]) for r in judged)
    assert res.stats["duplicates"] > 0
    assert backend.scored_requests == 2 * members - res.stats["duplicates"]
