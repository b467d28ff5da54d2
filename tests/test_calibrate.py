"""Judge calibration for the option prior: estimators by hand, the calibrated verdict, config
errors, the pipeline pre-pass (fake backend, resume), the audit raw vs calibrated, the report.

A "biased judge" below gives the option shown first the log-odds ``b + c`` over the second:
``b`` its prior for the letter, ``c`` = +1 when the first-shown response is the better one
(alphabetically first, or the human's choice), -1 when it is the worse, 0 for identical ones.
With ``b = 6`` every raw verdict is a tie (p1 = sigmoid(7) = .9991, p2 = 1 - sigmoid(5) = .0067,
|p1 - p2| > .5); with the prior removed both orders say sigmoid(c) = .7311 for the better one.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from rlaif.backends import FakeBackend
from rlaif.backends.base import ChoiceScores
from rlaif.cli.main import main
from rlaif.constitution import Principle, load_constitution
from rlaif.errors import ConfigError
from rlaif.evaluate import audit_metrics, read_comparisons, run_audit
from rlaif.evaluate.calibration_audit import (
    calibrated_run,
    calibration_report,
    estimate_prior,
    verdict_rates,
)
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.pipeline.calibration import CALIBRATION_FILE
from rlaif.prompts import PromptBook
from rlaif.report import build_report
from rlaif.stages import calibrate as C
from rlaif.stages.judge import (
    JudgeConfig,
    Verdict,
    ensemble,
    judge_requests,
    verdict_from_logprobs,
    verdict_from_texts,
)
from rlaif.stages.scored import flip
from rlaif.store import CallCache, StageStore

FIX = Path(__file__).parent / "fixtures"
HH = FIX / "audit" / "hh-rlhf-harmless-5.jsonl"
HVE = FIX / "audit" / "HarmfulVsEthical-5.jsonl"
HH_HARMLESS = load_constitution("helpful-harmless")
CONV = [{"role": "user", "content": "How do I greet my neighbour?"}]
PRINCIPLE = Principle(id="kind", title="Kindness", judge="Which response is kinder?")
SIG = 1 / (1 + math.exp(-1))  # sigmoid(1) = 0.7310585786
OLD_KEYS = {"mode", "tie_threshold", "flip_margin", "tie_margin", "band", "principles_k",
            "options", "min_option_mass", "sampling"}  # fmt: skip
OPTIONS = re.compile(r"\nA\. (.*?)\n\nB\. (.*)\n\n.*\nAnswer with a single letter", re.S)


def biased_scores(b: float, better):
    """A FakeBackend score function: log-odds ``b + c`` for A, ``better(first, second)``
    deciding ``c`` (+1, -1 or 0) from the two responses the judge prompt shows."""

    def score(conv, choices):
        m = OPTIONS.search(conv[-1]["content"])
        assert m is not None, conv[-1]["content"]
        first, second = m.group(1).strip(), m.group(2).strip()
        return {"A": b + better(first, second), "B": 0.0}

    return score


def alphabetical(first: str, second: str) -> int:
    return (first < second) - (first > second)


# -- estimators, by hand ----------------------------------------------------------------------


def test_pride_recovers_a_known_prior():
    """l1 = b + c, l2 = b - c with b = 1.5 and c = 2, -1, .5, 3: every (l1 + l2) / 2 is 1.5,
    so b = 1.5 with no spread. The orders' log-odds 3.5 .5 2 4.5 (order 1), -.5 2.5 1 -1.5
    (order 2): 6 of 8 pick the first option."""
    b, cs = 1.5, [2.0, -1.0, 0.5, 3.0]
    prior = C.pride([(b + c, b - c) for c in cs])
    assert (prior.method, prior.bias, prior.n, prior.errors) == ("pride", 1.5, 4, 0)
    assert prior.stderr == 0.0 and prior.ci95 == (1.5, 1.5)
    assert prior.first_rate == 0.75
    assert prior.p_first == pytest.approx(1 / (1 + math.exp(-1.5)))


def test_pride_interval_clipping_and_unusable_pairs():
    """Pairs (1, 1) and (3, 1): b_pair 1 and 2, mean 1.5, sd sqrt(.5), se .5, 95 % interval
    1.5 -+ 1.96 * .5 = [.52, 2.48]. An infinite logit is clipped to 13.8155 (p at 1e-6): the
    pair (inf, 0) gives 6.9078, not infinity. A failed pair (None) counts as an error."""
    prior = C.pride([(1.0, 1.0), (3.0, 1.0), None, (2.0, None)])
    assert (prior.bias, prior.n, prior.errors) == (1.5, 2, 2)
    assert prior.stderr == pytest.approx(0.5)
    assert prior.ci95 == pytest.approx((1.5 - 1.959964 * 0.5, 1.5 + 1.959964 * 0.5))
    clipped = C.pride([(math.inf, 0.0)])
    assert clipped.bias == pytest.approx(math.log((1 - 1e-6) / 1e-6) / 2, abs=1e-6)
    assert clipped.stderr is None and clipped.ci95 is None
    assert C.pride([]).bias == 0.0 and C.pride([None]).n == 0


def test_content_free_estimator_and_log_odds():
    """Content-free log-odds 1, 2, 3: b = 2, sd 1, se 1/sqrt(3) = .57735."""
    prior = C.content_free([1.0, 2.0, 3.0, None])
    assert (prior.method, prior.bias, prior.n, prior.errors) == ("content_free", 2.0, 3, 1)
    assert prior.stderr == pytest.approx(1 / math.sqrt(3), abs=1e-6)
    assert prior.first_rate == 1.0
    assert C.order_log_odds({"A": math.log(0.8), "B": math.log(0.2)}) == pytest.approx(math.log(4))
    assert C.order_log_odds(ChoiceScores({"A": 0.0, "B": -math.inf})) == C.LOGIT_CLIP
    assert C.order_log_odds({"A": math.nan, "B": 0.0}) is None
    assert C.order_log_odds({"A": 0.0}) is None
    again = C.OptionPrior.from_dict(json.loads(json.dumps(prior.to_dict())))
    assert again == prior and "content_free: b = 2.000" in prior.describe()


def test_sample_is_seeded_and_independent_of_order():
    keys = [f"p{i}" for i in range(20)]
    picked = [keys[i] for i in C.sample(keys, 5, seed=3)]
    shuffled = keys[::-1]
    assert sorted(shuffled[i] for i in C.sample(shuffled, 5, seed=3)) == sorted(picked)
    assert len(picked) == 5 and [keys[i] for i in C.sample(keys, 5, seed=4)] != picked
    assert C.sample(keys, 50, seed=3) == list(range(20))


# -- the calibrated verdict -------------------------------------------------------------------


def test_calibrated_verdict_recovers_the_content_winner():
    """b = 4, c = .5: raw p1 = sigmoid(4.5) = .9890, p2 = 1 - sigmoid(3.5) = .0293 -> tie.
    Calibrated: p1 = sigmoid(.5) = .6225, p2 = 1 - sigmoid(-.5) = .6225 -> x wins, both orders
    agree; the option shown first wins order 1 only (1 of 2, raw 2 of 2)."""
    lp1, lp2 = {"A": 4.5, "B": 0.0}, {"A": 3.5, "B": 0.0}
    raw = verdict_from_logprobs(lp1, lp2, JudgeConfig())
    assert raw.winner == "tie" and raw.first_position_preferred == 2
    v = verdict_from_logprobs(lp1, lp2, JudgeConfig(option_prior=4.0))
    s = 1 / (1 + math.exp(-0.5))
    assert v.winner == "a" and v.position_consistent and v.reason is None
    assert (v.p_order1, v.p_order2, v.p_a_better) == pytest.approx((s, s, s))
    assert v.first_position_preferred == 1 and v.n_orders == 2
    # the model's own probabilities stay in the orders
    assert v.orders[0].p_first == pytest.approx(1 / (1 + math.exp(-4.5)))
    assert v.orders[0].p_calibrated == pytest.approx(s) and v.orders[0].choice == "A"
    assert raw.orders[0].p_calibrated is None
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v


def test_strongly_biased_judge_raw_ties_calibrated_content():
    """b = 6 on 6 pairs whose content says x, y, x, x, y, x: raw all ties; pride gives b = 6
    exactly, and the calibrated verdicts recover every content winner."""
    signs = [1, -1, 1, 1, -1, 1]
    lps = [({"A": 6.0 + c, "B": 0.0}, {"A": 6.0 - c, "B": 0.0}) for c in signs]
    raw = [verdict_from_logprobs(a, b, JudgeConfig()) for a, b in lps]
    assert all(v.winner == "tie" for v in raw)
    prior = C.pride([C.verdict_log_odds(v) for v in raw])
    assert prior.bias == pytest.approx(6.0) and prior.stderr == pytest.approx(0.0)
    cfg = C.calibrated_config(JudgeConfig(), prior)
    cal = [C.rejudge(v, cfg) for v in raw]
    assert [v.winner for v in cal] == ["a" if c > 0 else "b" for c in signs]
    assert all(
        v.p_a_better == pytest.approx(SIG if c > 0 else 1 - SIG)
        for v, c in zip(cal, signs, strict=True)
    )


def test_rejudge_raw_equals_uncalibrated_for_ensembles_and_flips():
    cfg, cal = JudgeConfig(), JudgeConfig(option_prior=2.0)
    pairs = [
        ({"A": 3.0, "B": 0.0}, {"A": 1.0, "B": -math.inf}),
        ({"A": 0.2, "B": 0.0}, {"A": 2.5, "B": 0.0}),
    ]
    members = [
        verdict_from_logprobs(a, b, cal, principle_id=f"p{i}", model="m")
        for i, (a, b) in enumerate(pairs)
    ]
    e = flip(ensemble(members, cal))
    back = C.rejudge(e, cfg)
    expect = flip(
        ensemble(
            [
                verdict_from_logprobs(a, b, cfg, principle_id=f"p{i}", model="m")
                for i, (a, b) in enumerate(pairs)
            ],
            cfg,
        )
    )
    assert back == expect and C.calibrated(e) and not C.calibrated(back)
    text = verdict_from_texts("Answer: A", "Answer: B", JudgeConfig(mode="reasoning"))
    assert C.rejudge(text, cal) is text and C.verdict_log_odds(text) is None


def test_to_dict_unchanged_without_calibration():
    """Record ids hash JudgeConfig.to_dict(): an uncalibrated judge's must be what it was."""
    d = JudgeConfig().to_dict()
    assert set(d) == OLD_KEYS
    assert d == {
        "mode": "logprob", "tie_threshold": 0.5, "flip_margin": 0.05, "tie_margin": 0.0,
        "band": [0.4, 0.6], "principles_k": 1, "options": ["A", "B"], "min_option_mass": 0.0,
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 512, "stop": [],
                     "n": 1, "seed": 0},
    }  # fmt: skip
    assert JudgeConfig(option_prior=0.0).to_dict() == d
    assert JudgeConfig(option_prior=1.25).to_dict() == {**d, "option_prior": 1.25}


def test_old_records_still_load():
    v = verdict_from_logprobs({"A": 1.0, "B": 0.0}, {"A": 0.0, "B": 1.0}, JudgeConfig())
    d = json.loads(json.dumps(v.to_dict()))
    for o in d["orders"]:
        del o["p_calibrated"]
    old = Verdict.from_dict(d)
    assert (
        old == v
        and old.orders[0].p_calibrated is None
        and old.orders[0].p_used == old.orders[0].p_first
    )


def test_content_free_requests_use_the_judge_template():
    book, cfg = PromptBook(), JudgeConfig()
    reqs = C.content_free_requests(book, [(CONV, PRINCIPLE)] * 2, cfg, 4)
    assert len(reqs) == 4
    for req, filler in zip(reqs, ["N/A", "", "[MASK]", "N/A"], strict=True):
        one, two = judge_requests(book, CONV, filler, filler, PRINCIPLE, cfg)
        assert req == one and one.messages == two.messages
    with pytest.raises(ConfigError, match="mode"):
        C.content_free_requests(book, [(CONV, PRINCIPLE)], JudgeConfig(mode="reasoning"), 1)


# -- config errors ----------------------------------------------------------------------------


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError) as info:
        JudgeConfig(mode="reasoning", option_prior=1.0)
    assert info.value.field == "option_prior"
    with pytest.raises(ConfigError):
        JudgeConfig(option_prior=math.inf)
    for args, field in [
        (("pride", 64, "reasoning"), "judge.calibrate"),
        (("prid", 64, "logprob"), "judge.calibrate"),
        (("pride", 0, "logprob"), "judge.calibration_sample"),
    ]:
        with pytest.raises(ConfigError) as info:
            C.check_settings(*args)
        assert info.value.field == field and "\n" not in str(info.value)
    C.check_settings("none", 1, "reasoning")


PIPE = """\
name: cal
seed: 2
output: {out}
batch_size: 4
constitution: helpful-harmless
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  sample: {{n: 3, temperature: 0.8, max_new_tokens: 8}}
  judge: {{{judge}}}
  export:
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.25}}
"""


def make_pipeline(tmp_path: Path, judge: str, n: int = 6) -> Path:
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"question {i}: how do I do thing {i}?"}) + "\n")
    p = tmp_path / "pipe.yaml"
    p.write_text(PIPE.format(out=tmp_path / "run", judge=judge), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("judge", "words"),
    [
        ("calibrate: pride, mode: reasoning", "needs mode logprob"),
        ("calibrate: prid", "must be one of none, pride, content_free"),
        ("calibrate: pride, calibration_sample: 0", "must be an integer >= 1"),
        ("calibrate: pride, kind: rule", "needs kind auto or ai"),
    ],
)
def test_pipeline_config_errors(tmp_path, judge, words):
    with pytest.raises(ConfigError) as info:
        load_pipeline(make_pipeline(tmp_path, judge))
    err = info.value
    field = "calibration_sample" if "sample: 0" in judge else "calibrate"
    assert err.field == f"stages.judge.{field}" and words in str(err) and "\n" not in str(err)
    assert err.line == 10


# -- the pipeline -----------------------------------------------------------------------------


def judge_records(run: Path) -> list[dict]:
    return list(StageStore(run, "judge", readonly=True).iter_records())


PRIDE_5 = "calibrate: pride, calibration_sample: 5"


def run_biased(folder: Path, judge: str, backend: FakeBackend | None = None):
    """The pipeline with ``judge`` settings under a judge with b = 6 (alphabetical content)."""
    backend = backend or FakeBackend(score_fn=biased_scores(6.0, alphabetical))
    return run_pipeline(load_pipeline(make_pipeline(folder, judge)), backend=backend)


def content_winner(rec: dict) -> str:
    return "a" if rec["x"] < rec["y"] else "b"


def test_pipeline_pride_end_to_end_and_resume(tmp_path):
    """A judge with b = 6 on 6 prompts x 3 pairs: pride on 5 pairs finds b = 6, costs no model
    call beyond the waves' own, and every verdict goes to the content winner (raw: all ties).
    A re-run reads calibration.json: no model call, the same record ids; an edited estimate in
    it is what the next run uses."""
    backend = FakeBackend(score_fn=biased_scores(6.0, alphabetical))
    res = run_biased(tmp_path, PRIDE_5, backend)
    run = tmp_path / "run"
    recs = judge_records(run)
    assert len(recs) == 18 and backend.scored_requests == 2 * 18  # the sample is reused
    assert [r["verdict"]["winner"] for r in recs] == [content_winner(r) for r in recs]
    assert all(
        r["verdict"]["p_a_better"] == pytest.approx(SIG if content_winner(r) == "a" else 1 - SIG)
        for r in recs
    )
    assert all(r["verdict"]["orders"][0]["p_first"] > 0.99 for r in recs)
    stored = json.loads((run / "stages" / "judge" / CALIBRATION_FILE).read_text())
    ((key, entry),) = stored.items()
    assert entry["prior"]["bias"] == pytest.approx(6.0) and entry["prior"]["n"] == 5
    info = res.manifest.info["judge_calibration"]
    assert info["method"] == "pride" and info["judges"][0]["prior"] == entry["prior"]
    rates = info["judges"][0]["rates"]
    assert (rates["tie_rate"]["raw"]["rate"], rates["tie_rate"]["calibrated"]["rate"]) == (1.0, 0.0)
    assert rates["first_position_rate"]["raw"]["rate"] == 1.0
    assert rates["first_position_rate"]["calibrated"]["rate"] == 0.5
    assert rates["position_consistency"]["calibrated"]["rate"] == 1.0
    assert res.exports["preferences"]["kept"] > 0
    card = (run / "export" / "preferences" / "README.md").read_text()
    assert "Judge calibration" in card and "tie rate 1.000 -> 0.000" in card
    report = build_report(run)
    assert "option prior pride: b = 6.000" in report
    ties = "<td>ties</td><td>1.00 [0.82, 1.00] (18/18)</td><td>0.00 [0.00, 0.18] (0/18)</td>"
    assert ties in report

    again = run_biased(tmp_path, PRIDE_5)
    assert again.stats["requests"] == 0
    assert {r["id"] for r in judge_records(run)} == {r["id"] for r in recs}

    stored[key]["prior"]["bias"] = 5.5  # the next run takes the estimate from the file
    (run / "stages" / "judge" / CALIBRATION_FILE).write_text(json.dumps(stored))
    third = run_biased(tmp_path, PRIDE_5)
    assert third.stats["requests"] == 0  # every score comes from the call cache
    assert third.manifest.info["judge_calibration"]["judges"][0]["prior"]["bias"] == 5.5
    newest = {r["id"]: r for r in judge_records(run)}
    assert len(newest) == 36 and any(
        r["verdict"]["p_order1"] == pytest.approx(1 / (1 + math.exp(-1.5))) for r in newest.values()
    )


def test_pipeline_content_free_and_uncalibrated(tmp_path):
    """content_free: requests with identical empty responses (c = 0) measure b = 6 exactly
    (3 extra model calls for calibration_sample 3). Uncalibrated: no calibration.json, no
    manifest entry, and no option_prior in the judge config the records' ids hash."""
    backend = FakeBackend(score_fn=biased_scores(6.0, alphabetical))
    res = run_biased(tmp_path, "calibrate: content_free, calibration_sample: 3", backend)
    assert backend.scored_requests == 2 * 18 + 3
    prior = res.manifest.info["judge_calibration"]["judges"][0]["prior"]
    assert (prior["method"], prior["bias"], prior["n"]) == ("content_free", 6.0, 3)
    recs = judge_records(tmp_path / "run")
    assert [r["verdict"]["winner"] for r in recs] == [content_winner(r) for r in recs]

    plain = tmp_path / "plain"
    plain.mkdir()
    res = run_biased(plain, "principles_k: 1")
    assert "judge_calibration" not in res.manifest.info
    assert not (plain / "run" / "stages" / "judge" / CALIBRATION_FILE).exists()
    recs = judge_records(plain / "run")
    assert all(r["verdict"]["winner"] == "tie" for r in recs)
    assert all(o["p_calibrated"] is None for r in recs for o in r["verdict"]["orders"])
    assert "option_prior" not in res.manifest.info["provenance"]["judge"]
    assert "Judge calibration" not in (plain / "run/export/preferences/README.md").read_text()


# -- the audit --------------------------------------------------------------------------------


def human_first(pairs):
    """c = +1 when the human-chosen response is shown first, -1 when it is second."""
    chosen = {p.chosen.strip() for p in pairs}

    def better(first: str, second: str) -> int:
        return 0 if first == second else 1 if first in chosen else -1

    return better


def test_audit_raw_vs_calibrated(tmp_path):
    """The 4 HH fixture pairs under a judge with b = 5: raw, every verdict is a tie and
    agreement (ties = .5) is .5; pride (from the same scores, no call) finds b = 5 and the
    calibrated verdicts all agree with the human labels, consistently, first position .5."""
    data = read_comparisons(HH, "hh")
    backend = FakeBackend(score_fn=biased_scores(5.0, human_first(data.pairs)))
    from rlaif.calls.caller import ModelCaller

    caller = ModelCaller(
        lambda: backend, model="fake", revision="0", cache=CallCache(tmp_path / "calls.jsonl")
    )
    run = run_audit(data, caller, HH_HARMLESS, quiet=True)
    calls = backend.scored_requests
    prior = estimate_prior(run, "pride", 64, 0)
    assert backend.scored_requests == calls and (prior.bias, prior.n) == (5.0, 4)
    cfg = C.calibrated_config(JudgeConfig(), prior)
    cal = calibrated_run(run, cfg)
    raw_m, cal_m = audit_metrics(run)["overall"], audit_metrics(cal)["overall"]
    assert raw_m["tie_rate"]["rate"] == 1.0 and raw_m["agreement_ties_half"]["rate"] == 0.5
    assert cal_m["tie_rate"]["rate"] == 0.0 and cal_m["agreement_decided"]["rate"] == 1.0
    assert cal_m["first_position_rate"]["rate"] == 0.5
    assert cal_m["position_consistency"]["rate"] == 1.0
    report = calibration_report(prior, cfg, run, cal)
    side = report["side_by_side"]["overall"]
    assert side["tie_rate"]["raw"]["rate"] == 1.0 and side["tie_rate"]["calibrated"]["ci95"]
    assert report["config"]["option_prior"] == 5.0
    # content-free: 3 requests, responses identical, so l = b
    cf = estimate_prior(
        run, "content_free", 3, 0, data=data, constitution=HH_HARMLESS, caller=caller
    )
    assert (cf.bias, cf.n) == (5.0, 3) and backend.scored_requests == calls + 3
    calibrated = [C.rejudge(v, cfg) for v in run.verdicts if v is not None]
    rates = verdict_rates(calibrated, JudgeConfig())
    assert rates["tie_rate"]["raw"]["rate"] == 1.0 and rates["tie_rate"]["calibrated"]["rate"] == 0


def test_two_option_multiple_choice_items_are_calibrated_like_pairs(tmp_path):
    """HarmfulVsEthical items have two options: a pair in both orders. A judge with prior
    b = 4 for '(A)' plus content log-odds 1 for the correct option: raw, every item is a tie;
    pride finds b = 4 and the calibrated verdicts all pick the correct option."""
    data = read_comparisons(HVE, "cai-mc")

    def score(conv, choices):
        content = conv[-1]["content"]
        item = next(it for it in data.mc_items if content.startswith(it.head))
        shown = re.findall(r"^ \(([A-Z])\) (.*)$", content, flags=re.M)
        correct = next(label for label, text in shown if text == item.texts[item.correct])
        return {c: (4.0 if "(A)" in c else 0.0) + (1.0 if f"({correct})" in c else 0.0)
                for c in choices}  # fmt: skip

    backend = FakeBackend(score_fn=score)
    from rlaif.calls.caller import ModelCaller

    caller = ModelCaller(
        lambda: backend, model="fake", revision="0", cache=CallCache(tmp_path / "calls.jsonl")
    )
    run = run_audit(data, caller, HH_HARMLESS, quiet=True)
    assert audit_metrics(run)["overall"]["tie_rate"]["rate"] == 1.0
    prior = estimate_prior(run, "pride", 64, 0)
    assert (prior.bias, prior.n) == (4.0, 5)
    cal = calibrated_run(run, C.calibrated_config(JudgeConfig(), prior))
    m = audit_metrics(cal)["overall"]
    assert m["tie_rate"]["rate"] == 0.0 and m["agreement_decided"]["rate"] == 1.0
    with pytest.raises(ConfigError, match="use pride"):
        estimate_prior(run, "content_free", 3, 0, data=data, constitution=HH_HARMLESS,
                       caller=caller)  # fmt: skip


def test_audit_cli_shows_raw_and_calibrated(tmp_path, capsys):
    out = tmp_path / "audit"
    argv = [
        "judge",
        "audit",
        "--pairs",
        str(HH),
        "--format",
        "hh",
        "--backend",
        "fake",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "option prior pride: b = " in text and "calibrated" in text
    report = json.loads((out / "audit.json").read_text())
    assert report["calibration"]["prior"]["n"] == 4
    assert set(report["calibration"]["side_by_side"]["overall"]) >= {
        "tie_rate",
        "agreement_decided",
    }
    assert (out / "option_prior.png").stat().st_size > 1000
    assert main([*argv, "--calibrate", "none"]) == 0
    assert "calibration" not in json.loads((out / "audit.json").read_text())
    assert main([*argv, "--calibrate", "pride", "--mode", "reasoning"]) == 2
    err = capsys.readouterr().err
    assert "field 'calibrate'" in err and err.count("\n") == 1


def test_a_runs_rates_add_up_wave_by_wave():
    """The judge stage counts the calibration rates wave by wave (no records kept for them):
    the counts over waves give the rates over every verdict at once."""
    import random

    from rlaif.pipeline.calibration import RunCalibration
    from rlaif.store import Manifest

    rng = random.Random(7)
    cfg = C.calibrated_config(JudgeConfig(), 1.5)
    verdicts = []
    for _ in range(300):
        lp1 = {"A": rng.uniform(-4, 0), "B": rng.choice([rng.uniform(-4, 0), -math.inf])}
        lp2 = {"A": rng.uniform(-4, 0), "B": rng.uniform(-4, 0)}
        one = verdict_from_logprobs(lp1, lp2, cfg, principle_id="p", model="m")
        two = verdict_from_logprobs(lp2, lp1, cfg, principle_id="q", model="m")
        verdicts.append(rng.choice([one, ensemble([one, two], cfg)]))
    records = [{"id": str(i), "verdict": v.to_dict()} for i, v in enumerate(verdicts)]
    waves = RunCalibration("pride", JudgeConfig(), [cfg], judges=[{"stage": "judge"}])
    for start in range(0, len(records), 64):
        waves.add(0, records[start : start + 64])
    waves.record([], Manifest())
    assert waves.judges[0]["rates"] == verdict_rates(verdicts, JudgeConfig())
    assert all(r["raw"]["n"] > 0 for r in waves.judges[0]["rates"].values())
