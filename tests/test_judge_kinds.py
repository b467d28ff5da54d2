"""Judges beside the AI judge: rule checks, a user's Python function, a reward model; mixed
constitutions; label noise; the same judges as online RL rewards (fake backend, no model)."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import pytest

from rlaif.constitution import load_constitution
from rlaif.errors import ConfigError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.stages import scored as S
from rlaif.stages.judge import JudgeConfig, ensemble

QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs

CONSTITUTION = """\
name: checked
version: "1.0.0"
principles:
  - id: ends-in-letter
    title: End with a letter
    check: {must_match: '[a-f]$'}
  - id: short
    title: Be brief
    check: {max_words: 3}
  - id: helpful
    title: Helpful
    judge: Which response is more helpful?
"""
RULE_ONLY = """\
name: rule-only
version: "1.0.0"
principles:
  - id: ends-in-letter
    title: End with a letter
    check: {must_match: '[a-f]$'}
"""
PIPE = """\
name: t
seed: 1
output: {out}
batch_size: 8
constitution: {constitution}
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt, label_field: label}}
stages:
  sample: {{n: 4, temperature: 1.0, max_new_tokens: 8}}
  judge: {judge}
  export:
    show: 0
    formats: [jsonl]
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.0, formats: [jsonl]}}
"""


def make(tmp_path: Path, judge: str, constitution: str = RULE_ONLY, n: int = 12) -> Path:
    (tmp_path / "c.yaml").write_text(constitution, encoding="utf-8")
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            label = ("harmful", "safe", "ordinary")[i % 3]
            fh.write(json.dumps({"prompt": f"question {i}?", "label": label}) + "\n")
    p = tmp_path / "pipe.yaml"
    p.write_text(
        PIPE.format(out=tmp_path / "run", constitution=tmp_path / "c.yaml", judge=judge),
        encoding="utf-8",
    )
    return p


def judged(run_dir: Path) -> list[dict]:
    out = []
    for shard in sorted((run_dir / "stages" / "judge").glob("shard-*.jsonl")):
        out += [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    return out


def prefs(run_dir: Path) -> list[dict]:
    path = run_dir / "export" / "preferences" / "conversational" / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def ends_in_letter(text: str) -> bool:
    return text.strip()[-1:] in "abcdef"


# -- pure parts ---------------------------------------------------------------------------------


def test_p_from_scores_rule_is_linear_and_models_are_bradley_terry():
    assert S.p_from_scores(1.0, 0.0, "rule") == 1.0
    assert S.p_from_scores(0.5, 0.5, "rule") == 0.5
    assert S.p_from_scores(0.0, 1.0, "rule") == 0.0
    assert S.p_from_scores(0.75, 0.25, "rule") == 0.75
    assert S.p_from_scores(2.0, 1.0, "reward_model") == pytest.approx(1 / (1 + math.exp(-1)))
    assert S.p_from_scores(-800.0, 800.0, "python") == pytest.approx(0.0)  # no overflow
    assert S.p_from_scores(1.0, 0.0, "python", scale=3.0) == pytest.approx(1 / (1 + math.exp(-3)))


def test_scored_verdict_winner_tie_and_error():
    cfg = JudgeConfig()
    v = S.scored_verdict(0.9, 0.1, cfg, kind="python", scale=10.0, model="python:m:f")
    assert (v.status, v.winner, v.n_orders, v.mode) == ("ok", "a", 0, "python")
    assert v.p_order1 == v.p_order2 == v.p_a_better and v.scores == {"x": 0.9, "y": 0.1}
    assert S.scored_verdict(0.3, 0.3, cfg, kind="rule").winner == "tie"
    assert S.scored_verdict(0.0, 1.0, cfg, kind="rule").winner == "b"
    bad = S.scored_verdict(None, 0.2, cfg, kind="python")
    assert bad.status == "error" and "no score for x" in bad.reason and bad.n_errors == 1
    nan = S.scored_verdict(0.1, float("nan"), cfg, kind="reward_model")
    assert nan.status == "error" and "no score for y" in nan.reason
    assert json.dumps(nan.to_dict(), allow_nan=False)  # nothing non-finite is recorded


def test_rule_verdict_prefers_the_response_that_passes():
    c = load_constitution_text(CONSTITUTION)
    p = c.principle("ends-in-letter")
    v = S.rule_verdict(p, "answer b", "answer 7", None, JudgeConfig())
    assert (v.winner, v.p_a_better, v.mode, v.principle_ids) == ("a", 1.0, "rule", [p.id])
    assert v.scores["failures_y"] and not v.scores["failures_x"]
    assert S.rule_verdict(p, "answer 7", "answer b", None, JudgeConfig()).winner == "b"
    assert S.rule_verdict(p, "a b", "c d", None, JudgeConfig()).winner == "tie"
    with pytest.raises(ConfigError, match="has no check"):
        S.rule_verdict(c.principle("helpful"), "a", "b", None, JudgeConfig())


def test_rule_reward_is_the_mean_of_applicable_checks():
    c = load_constitution_text(CONSTITUTION)
    assert S.rule_reward(c.principles, "yes b", None) == 1.0
    assert S.rule_reward(c.principles, "one two three four 9", None) == 0.0
    assert S.rule_reward(c.principles, "one two three four f", None) == 0.5
    assert S.rule_reward([c.principle("helpful")], "x", None) is None


def test_label_noise_flips_the_asked_fraction_the_same_way_every_time():
    keys = [f"p{i}:0:1:samples" for i in range(4000)]
    for fraction in (0.0, 0.25, 0.5, 1.0):
        flips = [S.noise_flips(7, k, fraction) for k in keys]
        assert abs(sum(flips) / len(keys) - fraction) < 0.03
        assert flips == [S.noise_flips(7, k, fraction) for k in keys]
    assert [S.noise_flips(7, k, 0.5) for k in keys] != [S.noise_flips(8, k, 0.5) for k in keys]
    v = S.scored_verdict(1.0, 0.0, JudgeConfig(), kind="rule")
    f = S.flip(v)
    assert (f.winner, f.p_a_better, f.p_order1, f.flipped) == ("b", 0.0, 0.0, True)
    assert S.flip(S.scored_verdict(0.5, 0.5, JudgeConfig(), kind="rule")).winner == "tie"


def test_python_function_needs_allow_code_and_a_real_function(tmp_path):
    (tmp_path / "scorer.py").write_text(
        "def score(prompts, completions, labels, **kw):\n"
        "    return [float(len(c)) for c in completions]\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="allow_code"):
        S.load_function("scorer.py:score", False, tmp_path)
    fn = S.load_function("scorer.py:score", True, tmp_path)
    assert fn([[]], ["abc"], [None]) == [3.0] and len(fn.source_hash) == 64
    with pytest.raises(ConfigError, match="no function 'nope'"):
        S.load_function("scorer.py:nope", True, tmp_path)
    with pytest.raises(ConfigError, match="cannot load"):
        S.load_function("missing.py:score", True, tmp_path)
    with pytest.raises(ConfigError, match="module:name"):
        S.load_function("scorer.py", True, tmp_path)


def test_ensemble_of_rule_and_ai_verdicts_averages_them():
    cfg = JudgeConfig()
    rule = S.scored_verdict(1.0, 0.0, cfg, kind="rule", principle_id="r")
    ai = S.scored_verdict(0.0, 0.0, cfg, kind="python", principle_id="q")  # p = 0.5
    v = ensemble([rule, ai], cfg)
    assert v.p_a_better == pytest.approx(0.75) and v.winner == "a"


def load_constitution_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(text)
    try:
        return load_constitution(fh.name)
    finally:
        os.unlink(fh.name)


# -- in a pipeline ------------------------------------------------------------------------------


def test_rule_judge_labels_pairs_by_the_check_without_a_judge_model(tmp_path):
    cfg = load_pipeline(make(tmp_path, "{kind: rule}"))
    result = run_pipeline(cfg, stream=QUIET)
    recs = judged(tmp_path / "run")
    assert recs and all(r["verdict"]["mode"] == "rule" for r in recs)
    assert result.stats["requests"] == 12  # the 12 sampling requests; no judge model call
    rows = prefs(tmp_path / "run")
    assert rows
    for row in rows:  # chosen passes the check, rejected fails it: never the other way
        assert ends_in_letter(row["chosen"][-1]["content"])
        assert not ends_in_letter(row["rejected"][-1]["content"])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["info"]["provenance"]["judge_kind"]["kind"] == "rule"
    from rlaif.report import build_report

    html = build_report(tmp_path / "run")  # judge statistics of scored verdicts: no orders
    assert "rule" in html and "Traceback" not in html


def test_mixed_constitution_judges_check_principles_by_rule_and_the_rest_by_ai(tmp_path):
    cfg = load_pipeline(make(tmp_path, "{principles_k: 3}", CONSTITUTION))
    run_pipeline(cfg, stream=QUIET)
    modes = {
        (m["principle_ids"][0], m["mode"])
        for r in judged(tmp_path / "run")
        for m in (r["verdict"]["members"] or [r["verdict"]])
    }
    assert ("ends-in-letter", "rule") in modes and ("short", "rule") in modes
    assert ("helpful", "logprob") in modes
    assert {mode for _, mode in modes} == {"rule", "logprob"}


def test_label_noise_turns_that_fraction_of_verdicts_around(tmp_path):
    clean = tmp_path / "clean"
    noisy = tmp_path / "noisy"
    clean.mkdir(), noisy.mkdir()
    run_pipeline(load_pipeline(make(clean, "{kind: rule}", n=30)), stream=QUIET)
    run_pipeline(load_pipeline(make(noisy, "{kind: rule, label_noise: 0.5}", n=30)), stream=QUIET)
    a = {(r["prompt_id"], r["i"], r["j"]): r["verdict"] for r in judged(clean / "run")}
    b = {(r["prompt_id"], r["i"], r["j"]): r["verdict"] for r in judged(noisy / "run")}
    assert a.keys() == b.keys() and len(a) > 100
    flipped = [k for k in a if b[k]["flipped"]]
    assert 0.35 < len(flipped) / len(a) < 0.65
    for k in a:
        want = 1 - a[k]["p_a_better"] if b[k]["flipped"] else a[k]["p_a_better"]
        assert b[k]["p_a_better"] == pytest.approx(want)


def test_python_judge_runs_only_when_allowed_and_caches_scores(tmp_path):
    (tmp_path / "scorer.py").write_text(
        textwrap.dedent(
            """\
            CALLS = []

            def score(prompts, completions, labels, **kw):
                CALLS.append(len(completions))
                return [1.0 if c.strip()[-1:] in "abcdef" else 0.0 for c in completions]
            """
        ),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="allow_code"):
        load_pipeline(make(tmp_path, "{kind: python, function: scorer.py:score}"))
    pipe = make(tmp_path, "{kind: python, function: scorer.py:score, allow_code: true, scale: 20}")
    run_pipeline(load_pipeline(pipe), stream=QUIET)
    recs = judged(tmp_path / "run")
    assert recs and all(r["verdict"]["models"] == ["python:scorer.py:score"] for r in recs)
    for row in prefs(tmp_path / "run"):
        assert ends_in_letter(row["chosen"][-1]["content"])
    cache = (tmp_path / "run" / "cache" / "scores.jsonl").read_text().splitlines()
    assert len(cache) >= len({r["x"] for r in recs} | {r["y"] for r in recs}) // 2


def test_judge_kind_errors_are_one_line_and_name_the_field(tmp_path):
    for judge, field in [
        ("{kind: oracle}", "stages.judge.kind"),
        ("{kind: rule, label_noise: 1.5}", "stages.judge.label_noise"),
        ("{kind: python, allow_code: true}", "stages.judge.function"),
        ("{kind: reward_model}", "stages.judge.reward_model"),
        ("{kind: python, function: 'a:b', allow_code: true, extra_models: [{id: x}]}",
         "stages.judge.extra_models"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            load_pipeline(make(tmp_path, judge))
        assert err.value.field == field, (judge, err.value)
        assert "\n" not in str(err.value)


def test_rule_reward_function_for_online_rl_reads_the_label_column():
    from rlaif.train.reward_funcs import RuleReward

    c = load_constitution_text(
        """\
        name: refuse
        version: "1.0.0"
        principles:
          - id: refuse-harmful
            title: Refuse harmful requests, help with safe ones
            check: {refusal: {harmful: expected, safe: forbidden}}
        """.replace("        ", "")
    )
    reward = RuleReward(c.principles)
    completions = ["I'm sorry, but I can't help with that.", "Sure, here is how."] * 2
    labels = ["harmful", "harmful", "safe", "safe"]
    assert reward([[]] * 4, completions, label=labels) == [1.0, 0.0, 0.0, 1.0]
    assert reward([[]], ["Sure."], label=["ordinary"]) == [None]  # no rule applies


def test_held_out_from_scores_on_another_datasets_test_split_and_trains_on_neither(tmp_path):
    from rlaif.errors import DataError
    from rlaif.train.data import held_out_from, load_preferences

    def write(folder: Path, rows: dict[str, list[str]]) -> Path:
        folder.mkdir()
        for split, prompts in rows.items():
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for p in prompts:
                    row = {"prompt": [{"role": "user", "content": p}],
                           "chosen": [{"role": "assistant", "content": "c"}],
                           "rejected": [{"role": "assistant", "content": "r"}]}  # fmt: skip
                    fh.write(json.dumps(row) + "\n")
        return folder

    ai = write(tmp_path / "ai", {"train": ["p1", "p2", "p3", "p4"], "test": ["p5"]})
    oracle = write(tmp_path / "oracle", {"train": ["p1", "p5"], "test": ["p2", "p6"]})
    data = held_out_from(load_preferences(ai, 0.1, 0), str(oracle), 0.1, 0)
    train = [r["prompt"][0]["content"] for r in data["train"]]
    test = [r["prompt"][0]["content"] for r in data["test"]]
    assert test == ["p2", "p6"] and train == ["p1", "p3", "p4"]  # p2 is held out, not trained
    only_train = write(tmp_path / "no-test", {"train": ["p1"]})
    with pytest.raises(DataError, match="no test split"):
        held_out_from(load_preferences(ai, 0.1, 0), str(only_train), 0.0, 0)


def test_label_noise_pipelines_plan_and_their_reference_errors(tmp_path):
    from rlaif.pipeline.plan import plan_steps

    root = Path(__file__).resolve().parents[1]
    for name in ("label-noise", "label-noise-refusal"):
        plan = {p.name: p for p in plan_steps(load_pipeline(root / "pipelines" / f"{name}.yaml"))}
        for arm in ("oracle", "ai", "flip-25", "flip-50"):
            assert plan[arm].samples_from == "candidates"
            assert plan[arm].step.sample == plan["candidates"].step.sample
            dpo = plan[f"dpo-{arm}"]
            assert (dpo.model, dpo.eval_data) == ("base", "heldout-oracle")
        assert plan["rm-ai"].data == "ai" and plan["rm-ai"].eval_data == "heldout-oracle"
        # the held-out oracle labels the held-out prompts' own samples, not the training ones
        assert plan["heldout-oracle"].samples_from == "heldout"
        assert plan["grpo-rule"].reward is None and plan["grpo-rule"].data is None
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n', encoding="utf-8")
    head = (
        "name: t\nmodel: {id: m, backend: fake}\nprompts: {path: prompts.jsonl}\nsteps:\n"
        "  - {name: s, sample: {n: 2}}\n"
        "  - {name: j, samples_from: s, judge: {kind: rule}}\n"
    )
    bad = [
        ("  - {name: k, samples_from: s, sample: {n: 3}, judge: {}}\n",
         "steps[2].samples_from", "takes its sample from 's'"),
        ("  - {name: k, samples_from: nope, judge: {}}\n", "steps[2].samples_from", "no earlier"),
        ("  - {name: g, trainer: grpo, eval_data: j, set: {reward: {kind: rule}}}\n",
         "steps[2].eval_data", "only reward and dpo"),
        ("  - {name: d, trainer: dpo, eval_data: s}\n", "steps[2].eval_data",
         "not a data step with judged preferences"),
    ]  # fmt: skip
    for extra, field, words in bad:
        (tmp_path / "p.yaml").write_text(head + extra, encoding="utf-8")
        with pytest.raises(ConfigError, match=words) as err:
            load_pipeline(tmp_path / "p.yaml")
        assert err.value.field == field and err.value.line is not None


def test_audit_judges_check_principles_by_their_rule_against_human_labels(tmp_path):
    from rlaif.backends.fake import FakeBackend
    from rlaif.calls.caller import ModelCaller
    from rlaif.evaluate import audit_metrics, read_comparisons, run_audit
    from rlaif.store import CallCache

    root = Path(__file__).resolve().parents[1]
    data = read_comparisons(root / "tests/fixtures/audit/hh-rlhf-harmless-5.jsonl", "hh")
    backend = FakeBackend()
    caller = ModelCaller(lambda: backend, model="fake", revision="0",
                         cache=CallCache(tmp_path / "c.jsonl"))  # fmt: skip
    constitution = load_constitution_text(CONSTITUTION)  # two checks, one judge question
    run = run_audit(data, caller, constitution, principles="all", quiet=True)
    rule = [j for j in run.judgements if j.principle in ("ends-in-letter", "short")]
    assert len(rule) == 2 * len(data.pairs)
    assert backend.scored_requests == 2 * len(data.pairs)  # only the judge question asked the model
    for pair in data.pairs:  # the rule's verdict is the check's, whatever the human said
        for pid in ("ends-in-letter", "short"):
            want = S.rule_verdict(constitution.principle(pid), pair.chosen, pair.rejected, None,
                                  JudgeConfig())  # fmt: skip
            got = next(j for j in rule if j.item_id == pair.id and j.principle == pid)
            assert got.p_human == pytest.approx(want.p_a_better)
    assert "short" in audit_metrics(run)["per_principle"]


def test_a_rule_judge_needs_principles_with_a_check_before_anything_runs(tmp_path):
    no_checks = "name: plain\nversion: 1.0.0\nprinciples:\n  - {id: h, title: H, judge: Which}\n"
    with pytest.raises(ConfigError, match="no principle with a check") as err:
        load_pipeline(make(tmp_path, "{kind: rule}", no_checks))
    assert err.value.field == "stages.judge.kind"
    with pytest.raises(ConfigError, match="no principle with a judge question"):
        load_pipeline(make(tmp_path, "{kind: ai}", RULE_ONLY))
