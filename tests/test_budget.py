"""Budget caps (stop cleanly, resume without duplicates) and the ``rlaif run --dry-run`` estimate,
checked against what real runs do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlaif.backends import Completion, FakeBackend
from rlaif.calls.budget import (
    EXIT_BUDGET,
    Budget,
    BudgetExceeded,
    Usage,
    spent_in_run,
    usage_in_cache,
    usage_of_completions,
)
from rlaif.cli.main import main
from rlaif.config.schema import BudgetConfig
from rlaif.errors import ConfigError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.pipeline.estimate import estimate_pipeline
from rlaif.store import StageStore

ROOT = Path(__file__).resolve().parents[1]

# SL-CAI (2 rounds) + RL-CAI (3 samples) judged under 2 principles by two judge models.
PIPE = """\
name: budgeted
seed: 5
output: {out}
batch_size: 4
constitution: helpful-harmless
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  critique_revise:
    rounds: 2
    respond: {{max_new_tokens: 12}}
    critique: {{max_new_tokens: 10}}
    revise: {{max_new_tokens: 14}}
  sample: {{n: 3, temperature: 0.8, max_new_tokens: 9}}
  judge:
    principles_k: 2
    extra_models: [{{id: other-judge, backend: fake}}]
  export:
    formats: [jsonl]
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.25}}
"""

GEN_STEPS = ("respond", "critique-1", "revise-1", "critique-2", "revise-2", "sample")


def make_pipeline(tmp_path: Path, n: int = 6, text: str = PIPE) -> Path:
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"question {i}: how would I go about task {i}?"}) + "\n")
    p = tmp_path / "pipe.yaml"
    p.write_text(text.format(out=tmp_path / "run"), encoding="utf-8")
    return p


def records(run: Path, stage: str) -> list[dict]:
    return list(StageStore(run, stage, readonly=True).iter_records())


def stage_lines(run: Path) -> dict[str, list[str]]:
    """Every line of every stage shard, per stage (to find duplicates)."""
    out = {}
    for folder in sorted((run / "stages").iterdir()):
        out[folder.name] = [
            json.loads(line)["id"]
            for f in sorted(folder.glob("*.jsonl"))
            for line in f.read_text().splitlines()
        ]
    return out


def exports(run: Path) -> dict[str, bytes]:
    names = ["sft.jsonl", "pairs.jsonl"] + [
        f"preferences/conversational/{s}.jsonl" for s in ("train", "test")
    ]
    return {n: (run / "export" / n).read_bytes() for n in names}


def tree(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("max_calls", "-1", "0 or more"),
        ("max_tokens", "lots", "must be int"),
        ("max_cost_usd", "2", "needs a price"),
        ("price_per_1k_prompt_tokens", "-0.1", "0 or more"),
        ("max_dollars", "3", "unknown key"),
    ],
)
def test_budget_config_errors_name_the_field(tmp_path, key, value, words):
    p = make_pipeline(tmp_path, text=PIPE + f"budget:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(p)
    err = info.value
    assert err.field == f"budget.{key}" and err.line == 22, str(err)
    assert words in str(err) and "pipe.yaml" in str(err) and "\n" not in str(err)
    with pytest.raises(ConfigError, match=f"^--set: field 'budget.{key}'"):
        load_pipeline(make_pipeline(tmp_path), [f"budget.{key}={value}"])


def test_budget_config_loads():
    cfg = BudgetConfig(max_cost_usd=1.5, price_per_1k_prompt_tokens=0.5)
    assert cfg.active and cfg.priced and not cfg.problems()
    assert not BudgetConfig().active


# --- accounting ------------------------------------------------------------------------------


def test_usage_of_one_request_with_three_completions():
    comps = [Completion("a b", 10, 2), Completion("c", 10, 1), Completion("d e f", 10, 3)]
    assert usage_of_completions(comps) == Usage(1, 30, 6)  # the prompt, as reported 3 times
    cfg = BudgetConfig(price_per_1k_prompt_tokens=1.0, price_per_1k_completion_tokens=2.0)
    assert Usage(2, 1000, 500).cost(cfg) == pytest.approx(2.0)  # 1000 x $1/1k + 500 x $2/1k


def test_admit_takes_the_longest_prefix_that_fits():
    b = Budget(BudgetConfig(max_tokens=100), Usage(3, 40, 10))
    assert b.admit([(20, 10), (10, 10), (1, 0)]) == 2  # 50 + 30 + 20 = 100; 101 would not fit
    err = b.exceeded()
    assert err.cap == "max_tokens" and "budget.max_tokens = 100" in str(err)
    assert Budget(BudgetConfig(max_calls=4), Usage(3)).admit([(0, 0)] * 3) == 1
    # $0.1 + $0.2 is not exactly $0.3 in floats; the cap must still admit it
    money = BudgetConfig(max_cost_usd=0.3, price_per_1k_prompt_tokens=1.0)
    assert Budget(money, Usage(1, 100)).admit([(200, 0)]) == 1


def test_usage_in_cache_reads_a_torn_cache(tmp_path):
    path = tmp_path / "calls.jsonl"
    gen = [{"text": "x", "prompt_tokens": 7, "completion_tokens": 3, "finish_reason": "stop"}] * 2
    lines = [
        {"key": "a", "value": gen},
        {"key": "b", "value": {"logprobs": {"A": -0.1, "B": None}, "prompt_tokens": 11}},
        {"key": "a", "value": gen},  # written again by another process: answered twice
        {"key": "d", "value": "not an answer"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"key": "c", "val')
    before = path.read_bytes()
    assert usage_in_cache(path) == Usage(3, 14 + 11 + 14, 12)
    assert path.read_bytes() == before  # read-only: the torn tail is left for the run
    assert usage_in_cache(tmp_path / "missing.jsonl") == Usage()


def test_ledger_adds_what_was_cached_after_it(tmp_path):
    cache = tmp_path / "cache" / "calls.jsonl"
    cache.parent.mkdir()
    gen = [{"text": "x", "prompt_tokens": 5, "completion_tokens": 2, "finish_reason": "stop"}]
    cache.write_text(json.dumps({"key": "a", "value": gen}) + "\n")
    budget = Budget(BudgetConfig(max_calls=10), Usage(1, 5, 2), cache)
    budget.charge(Usage(2, 10, 4))  # two answers, one of them a repeat of "a"
    assert spent_in_run(cache) == Usage(3, 15, 6)
    # a run with no budget (or a kill before the ledger write) adds an answer to the cache
    with open(cache, "a") as fh:
        fh.write(json.dumps({"key": "b", "value": gen}) + "\n")
    assert spent_in_run(cache) == Usage(4, 20, 8)
    (tmp_path / "cache" / "usage.json").write_text("{not json")
    assert spent_in_run(cache) == usage_in_cache(cache) == Usage(2, 10, 4)


# --- the dry run against real runs -----------------------------------------------------------


def test_dry_run_matches_a_real_run(tmp_path):
    cfg = load_pipeline(make_pipeline(tmp_path, n=6))
    est = estimate_pipeline(cfg)
    assert not (tmp_path / "run").exists()  # nothing written, not even the run dir
    by = {s.name: s for s in est.stages}
    assert list(by) == [*GEN_STEPS[:5], "sample", "judge", "judge-2"]
    policy, judge = FakeBackend(), FakeBackend()
    for fake in (policy, judge):  # the identity of the config's fake model (ids, cache keys)
        fake.model_revision = None
    res = run_pipeline(cfg, backend=policy, judge_backend=judge)
    run = tmp_path / "run"
    # calls: exactly the requests each model received
    assert policy.generated_requests == sum(by[s].calls for s in GEN_STEPS)
    # 6 prompts x (1 + 3) pairs x 2 principles x 2 orders, less a principle drawn twice for a
    # pair (its identical requests are sent once)
    dup = res.manifest.info["calls"]["judge-1"]["duplicates"]
    assert dup > 0
    assert judge.scored_requests == by["judge"].calls == 6 * (1 + 3) * 2 * 2 - dup
    assert res.manifest.info["calls"]["judge-2"]["requests"] == by["judge-2"].calls
    assert res.stats["requests"] == est.total.calls
    for step in GEN_STEPS:
        recs = records(run, step)
        assert len(recs) == by[step].calls == 6, step
        n = 3 if step == "sample" else 1  # a record holds its first completion's count
        actual = sum(r["prompt_tokens"] for r in recs) * n
        if step in ("respond", "sample"):  # the first step of a chain: counted exactly
            assert not by[step].bounded and actual == by[step].prompt_tokens, step
        else:  # later steps hold model outputs: an upper bound
            assert by[step].bounded and actual <= by[step].prompt_tokens, step
        assert sum(r["completion_tokens"] for r in recs) <= by[step].completion_tokens
    assert by["sample"].completion_tokens == 6 * 3 * 9 and by["respond"].completion_tokens == 72
    assert by["judge"].completion_tokens == 0  # logprob judging generates nothing
    # finished: everything is done, nothing is left to call
    again = estimate_pipeline(cfg)
    assert again.total == Usage() and again.done == est.total.calls
    assert again.spent == usage_in_cache(run / "cache" / "calls.jsonl")


def test_dry_run_counts_only_what_is_left_after_a_change(tmp_path):
    p = make_pipeline(tmp_path, n=4)
    run_pipeline(load_pipeline(p))
    old = {step: {r["id"] for r in records(tmp_path / "run", step)} for step in GEN_STEPS}
    # another constitution: the responses and samples stand, the critiques are new
    cfg = load_pipeline(p, ["constitution=harmless-for-kids"])
    est = estimate_pipeline(cfg)
    by = {s.name: s for s in est.stages}
    assert [(by[s].calls, by[s].done) for s in ("respond", "sample")] == [(0, 4), (0, 4)]
    assert all(0 < by[s].calls <= 4 for s in GEN_STEPS[1:5])  # a shared principle: reused
    # critique-1 shows the stored responses: counted exactly; revise-1 shows new critiques
    assert not by["critique-1"].bounded and by["revise-1"].bounded
    assert by["judge"].bounded and by["judge"].calls > 0  # revisions not made yet: bounded
    res = run_pipeline(cfg)
    assert res.stats["requests"] == est.total.calls
    for step in GEN_STEPS:
        new = [r for r in records(tmp_path / "run", step) if r["id"] not in old[step]]
        assert len(new) == by[step].calls, step
        if step == "critique-1":
            assert sum(r["prompt_tokens"] for r in new) == by[step].prompt_tokens


@pytest.mark.parametrize("cap", [3, 17, 40, 95])
def test_budget_stop_then_resume_equals_an_uncapped_run(tmp_path, cap):
    p = make_pipeline(tmp_path, n=6)
    ref = tmp_path / "ref"
    run_pipeline(load_pipeline(p), out=ref)
    run = tmp_path / "run"
    with pytest.raises(BudgetExceeded) as info:
        run_pipeline(load_pipeline(p, [f"budget.max_calls={cap}"]))
    assert info.value.cap == "max_calls" and info.value.spent.calls == cap  # used up exactly
    cache = run / "cache" / "calls.jsonl"
    assert spent_in_run(cache) == info.value.spent  # the ledger kept the running total
    # a call sent twice in one batch (one judge principle drawn twice) is in the cache once
    assert usage_in_cache(cache).calls <= info.value.spent.calls
    # the same cap again: stopped at once, no model call
    fake = FakeBackend()
    fake.model_revision = None  # the config's fake model, so the same ids and cache keys
    with pytest.raises(BudgetExceeded):
        run_pipeline(load_pipeline(p, [f"budget.max_calls={cap}"]), backend=fake)
    assert fake.calls == 0
    # the estimate of what is left is what the resumed run then does
    est = estimate_pipeline(load_pipeline(p))
    assert est.done >= info.value.spent.calls
    res = run_pipeline(load_pipeline(p, ["budget.max_calls=1000"]))
    assert res.stats["requests"] == est.total.calls
    assert exports(run) == exports(ref)
    for stage, ids in stage_lines(run).items():
        assert len(ids) == len(set(ids)), f"duplicate records in {stage}"
        assert sorted(ids) == sorted(stage_lines(ref)[stage]), stage


def test_token_and_cost_caps_are_never_exceeded(tmp_path):
    p = make_pipeline(tmp_path, n=6)
    for n, (setting, cap) in enumerate(
        [("max_tokens=2000", "max_tokens"), ("max_cost_usd=2", "max_cost_usd")]
    ):
        out = tmp_path / f"run{n}"
        prices = ["budget.price_per_1k_prompt_tokens=1", "budget.price_per_1k_completion_tokens=2"]
        cfg = load_pipeline(p, [f"budget.{setting}", *prices])
        with pytest.raises(BudgetExceeded) as info:
            run_pipeline(cfg, out=out)
        for spent in (info.value.spent, usage_in_cache(out / "cache" / "calls.jsonl")):
            assert spent.calls > 0 and info.value.cap == cap
            assert spent.tokens <= 2000 if n == 0 else spent.cost(cfg.budget) <= 2.0


def test_uncapped_runs_make_no_budget(tmp_path):
    cfg = load_pipeline(make_pipeline(tmp_path, n=2))
    assert run_pipeline(cfg).manifest.info["config"]["budget"]["max_calls"] is None


# --- CLI -------------------------------------------------------------------------------------


def test_cli_dry_run_prints_the_table_and_writes_nothing(tmp_path, capsys):
    p = make_pipeline(tmp_path, n=5)
    prices = ["budget.price_per_1k_prompt_tokens=0.5", "budget.price_per_1k_completion_tokens=1"]
    sets = [x for s in ["budget.max_calls=50", *prices] for x in ("--set", s)]
    assert main(["run", str(p), "--dry-run", *sets]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    lines = out.splitlines()
    assert "5 prompts" in lines[0] and "not started" in lines[0]
    head = next(line for line in lines if line.startswith("step"))
    assert "calls" in head and "prompt tokens" in head and "max cost (USD)" in head
    respond = next(line for line in lines if line.startswith("respond "))
    est = estimate_pipeline(load_pipeline(p, [s for s in sets if s != "--set"]))
    first = est.stages[0]
    # step, model, calls, done, prompt tokens (exact here), max completion, cost (a bound)
    cells = respond.split()
    assert cells[2:5] == [f"{first.calls:,}", "0", f"{first.prompt_tokens:,}"]
    assert cells[6:] == ["≤", f"${first.usage.cost(est.budget):.4f}"]
    critique = next(x for x in lines if x.startswith("critique-1")).split()
    assert critique[4] == "≤"  # holds the responses: an upper bound
    total = next(line for line in lines if line.startswith("total"))
    assert f"{est.total.calls:,}" in total
    assert "whitespace words" in out and "upper bound" in out
    assert "may stop early" in out and "budget.max_calls" in out


def test_cli_budget_stop_exit_code_and_resume(tmp_path, capsys):
    p = make_pipeline(tmp_path, n=4)
    assert main(["run", str(p), "--set", "budget.max_calls=10", "--quiet"]) == EXIT_BUDGET == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rlaif: stopped: budget cap budget.max_calls = 10 reached")
    assert "10 calls" in err and "raise budget.max_calls" in err
    before = tree(tmp_path / "run")
    assert main(["run", str(p), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "has earlier work" in out and "spent so far in this run dir: 10 calls" in out
    assert tree(tmp_path / "run") == before  # the dry run wrote nothing into the run dir
    respond = next(line for line in out.splitlines() if line.startswith("respond "))
    assert respond.split()[2:4] == ["0", "4"]  # 0 calls left, 4 done
    assert main(["run", str(p), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(p), "--dry-run", "--set", "budget.max_calls=10"]) == 0
    assert "nothing left to call" in capsys.readouterr().out


def test_dry_run_of_the_builtin_pipelines_with_a_fake_model(capsys):
    for name in ("quickstart", "rlaif-prefs"):
        code = main(
            ["run", name, "--dry-run", "--set", "model.backend=fake", "--out", "/nonexistent/x"]
        )
        assert code == 0
        out = capsys.readouterr().out
        assert "20 prompts" in out and out.count("\ntotal ") == 1


# --- a real tokenizer ------------------------------------------------------------------------


def test_dry_run_counts_with_the_model_tokenizer(tmp_path):
    """The transformers backend on a tiny local model: the first step's prompt tokens are the
    backend's own counts, and the calls per step are what it was asked."""
    from rlaif.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", max_position_embeddings=4096)
    text = (
        PIPE.replace(
            "model: {{id: fake-model, backend: fake}}",
            f"model: {{{{id: {model}, backend: transformers}}}}",
        )
        .replace("extra_models: [{{id: other-judge, backend: fake}}]", "cai_sl: true")
        .replace("rounds: 2", "rounds: 1")
        .replace("principles_k: 2", "principles_k: 1")
    )
    cfg = load_pipeline(make_pipeline(tmp_path, n=3, text=text))
    est = estimate_pipeline(cfg)
    assert "tokenizer" in est.counting[str(model)]
    res = run_pipeline(cfg)
    by = {s.name: s for s in est.stages}
    run = tmp_path / "run"
    for step in ("respond", "critique-1", "revise-1", "sample"):
        recs = records(run, step)
        assert len(recs) == by[step].calls == 3 and all(r["status"] == "ok" for r in recs)
        tokens = sum(r["prompt_tokens"] for r in recs) * (3 if step == "sample" else 1)
        assert tokens == by[step].prompt_tokens if step in ("respond", "sample") else tokens > 0
    # a random model may repeat a sample or its response: fewer pairs, never more
    assert res.stats["requests"] <= est.total.calls


@pytest.mark.slow
def test_quickstart_dry_run_counts_smollm2_tokens_exactly(tmp_path, monkeypatch):
    """The built-in quickstart on the real SmolLM2 (2 prompts, short outputs): the dry run's
    first-step prompt tokens are the backend's, later steps stay under their bound, and the
    GGUF's own tokenizer (no converted copy yet: nothing converted, no weights) agrees."""
    short = [f"stages.critique_revise.{s}.max_new_tokens=8" for s in ("respond", "critique")]
    sets = ["prompts.limit=2", "model.backend=transformers", *short, f"output={tmp_path / 'run'}"]
    cfg = load_pipeline(ROOT / "pipelines" / "quickstart.yaml", sets)
    est = estimate_pipeline(cfg)
    res = run_pipeline(cfg)
    by = {s.name: s for s in est.stages}
    assert res.stats["requests"] == est.total.calls == 6
    for step in ("respond", "critique-1", "revise-1"):
        tokens = sum(r["prompt_tokens"] for r in records(tmp_path / "run", step))
        assert (
            tokens == by[step].prompt_tokens
            if step == "respond"
            else tokens <= by[step].prompt_tokens
        )
    monkeypatch.setenv("RLAIF_CACHE", str(tmp_path / "empty-cache"))
    fresh = estimate_pipeline(cfg, out=tmp_path / "fresh")
    assert [s.to_dict() for s in fresh.stages] == [s.to_dict() for s in est.stages]
    assert not (tmp_path / "empty-cache" / "models").exists()


@pytest.mark.slow
def test_dry_run_counts_training_and_evaluation_too(tmp_path, capsys):
    assert main(["run", "cai-dpo", "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "not counted" not in out and "judge " in out and "eval judge " in out
    assert "training  trainer" in out and "max_steps" in out
    assert not (tmp_path / "run").exists()
