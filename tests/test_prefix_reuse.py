"""Shared-prefix reuse in judge scoring: the two orders of a pair share the conversation, the
transformers backend computes it once, and scores stay independent of batching, call order
and cache state (issue 7's byte-identical guarantee, with issue 9's speed-up)."""

from __future__ import annotations

import pytest

from rlaif.backends import TransformersBackend
from rlaif.backends.base import shared_prefix
from rlaif.backends.prefix_cache import MIN_PREFIX_TOKENS
from rlaif.calls.caller import GenRequest, ModelCaller, ScoreRequest
from rlaif.constitution import Principle
from rlaif.prompts import PromptBook
from rlaif.stages.judge import JudgeConfig, judge_requests
from rlaif.store import CallCache

PRINCIPLE = Principle(id="kind", title="Kindness", judge="Which response is kinder?")
OTHER = Principle(id="safe", title="Safety", judge="Which response is safer?")
CONVS = [
    [
        {
            "role": "user",
            "content": "My neighbour moved in last week and I would like to say hello to "
            "them in a friendly way without being too pushy about it. What should I do?",
        }
    ],
    [
        {"role": "user", "content": "I need to return a borrowed ladder that I broke by accident."},
        {"role": "assistant", "content": "Tell the owner what happened and offer to replace it."},
        {"role": "user", "content": "They might be angry though. How should I start?"},
    ],
    [{"role": "user", "content": "Write one short line about rain in the city at night, please."}],
]
REPLIES = [
    ("Bring a small gift.", "Ignore them."),
    ("Apologise first.", "Hide it."),
    ("Wet.", "No"),
]


def requests(principle: Principle = PRINCIPLE) -> list[ScoreRequest]:
    book, cfg = PromptBook(), JudgeConfig()
    out: list[ScoreRequest] = []
    for conv, (x, y) in zip(CONVS, REPLIES, strict=True):
        out.extend(judge_requests(book, conv, x, y, principle, cfg))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    with TransformersBackend(str(tiny_model_dir), dtype="float32") as backend:
        yield backend


def scores(backend, reqs, *, hints=True):
    convs = [r.messages for r in reqs]
    kw = {"prefixes": [r.prefix for r in reqs]} if hints else {}
    return [s.logprobs for s in backend.score_choices(convs, ["A", "B"], **kw)]


def test_shared_prefix_points_after_the_common_text():
    a = [{"role": "system", "content": "S"}, {"role": "user", "content": "abc X"}]
    b = [{"role": "system", "content": "S"}, {"role": "user", "content": "abc Y"}]
    assert shared_prefix(a, b) == (1, 4)
    assert shared_prefix(a, a) is None
    x, y = [{"role": "user", "content": "X"}], [{"role": "user", "content": "Y"}]
    assert shared_prefix(x, y) is None
    c = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "abc X"}]
    assert shared_prefix(a, c) == (1, 0)  # roles differ: the split is at that message


def test_judge_orders_carry_the_same_hint_before_the_options():
    r1, r2 = judge_requests(PromptBook(), CONVS[0], "Yes.", "No.", PRINCIPLE, JudgeConfig())
    assert r1.prefix == r2.prefix is not None
    index, offset = r1.prefix
    content = r1.messages[index]["content"]
    assert content[:offset] == r2.messages[index]["content"][:offset]
    assert CONVS[0][0]["content"] in content[:offset] and "Yes." not in content[:offset]
    # Reasoning requests generate: nothing to score, no hint.
    g1, _ = judge_requests(
        PromptBook(), CONVS[0], "Yes.", "No.", PRINCIPLE, JudgeConfig(mode="reasoning")
    )
    assert isinstance(g1, GenRequest) and not hasattr(g1, "prefix")


def test_prefix_is_computed_once_per_pair_and_reused(tiny):
    reqs = requests()
    convs = [r.messages for r in reqs]
    prompts = tiny._prompts(convs, reserve=1)
    splits = [tiny._split_at(c, p, r.prefix) for c, p, r in zip(convs, prompts, reqs, strict=True)]
    assert all(s >= MIN_PREFIX_TOKENS for s in splits), splits
    assert splits[0::2] == splits[1::2]
    for p, s in zip(prompts, splits, strict=True):
        assert s < len(p) - 1
    tiny.prefix_kv.clear()
    hits, misses, reused = tiny.prefix_kv.hits, tiny.prefix_kv.misses, tiny.prefix_kv.reused_tokens
    scores(tiny, reqs)
    assert tiny.prefix_kv.misses - misses == len(CONVS)  # one prefix forward per pair
    assert tiny.prefix_kv.hits - hits == len(CONVS)
    assert tiny.prefix_kv.reused_tokens - reused == sum(splits[1::2])
    # Other principles judge the same pair: the conversation prefix is already there.
    scores(tiny, requests(OTHER))
    assert tiny.prefix_kv.misses - misses == len(CONVS)
    # reset_prefix_cache frees every prefix: the next pair is computed again.
    assert tiny.prefix_kv.bytes > 0
    tiny.reset_prefix_cache()
    assert tiny.prefix_kv.bytes == 0 and tiny.prefix_kv.max_bytes > 0
    scores(tiny, requests()[:2])
    assert tiny.prefix_kv.misses - misses == len(CONVS) + 1


def test_scores_do_not_depend_on_batching_order_or_cache_state(tiny):
    reqs = requests()
    tiny.prefix_kv.clear()
    cold = scores(tiny, reqs)
    warm = scores(tiny, reqs)
    alone = [scores(tiny, [r])[0] for r in reversed(reqs)][::-1]
    tiny.prefix_kv.clear()
    order2_first = [scores(tiny, [r])[0] for r in reqs[1::2]]
    tiny.prefix_kv.clear()
    backwards = scores(tiny, reqs[::-1])[::-1]
    assert cold == warm == alone == backwards
    assert order2_first == cold[1::2]
    # A cache too small to hold one prefix recomputes it every time: same numbers.
    small = tiny.prefix_kv.max_bytes
    try:
        tiny.prefix_kv.max_bytes = 1
        tiny.prefix_kv.clear()
        assert scores(tiny, reqs) == cold
    finally:
        tiny.prefix_kv.max_bytes = small


def test_split_scores_match_one_forward_to_rounding(tiny):
    reqs = requests()
    split, plain = scores(tiny, reqs), scores(tiny, reqs, hints=False)
    for a, b in zip(split, plain, strict=True):
        for option in ("A", "B"):
            assert a[option] == pytest.approx(b[option], abs=1e-4)


def test_multi_token_choices_reuse_the_prefix_too(tiny):
    reqs = requests()
    convs, hints = [r.messages for r in reqs], [r.prefix for r in reqs]
    choices = ["Yes indeed", "No"]
    tiny.prefix_kv.clear()
    split = [s.logprobs for s in tiny.score_choices(convs, choices, prefixes=hints)]
    assert tiny.prefix_kv.reused_tokens > 0
    again = [s.logprobs for s in tiny.score_choices(convs[::-1], choices, prefixes=hints[::-1])]
    plain = [s.logprobs for s in tiny.score_choices(convs, choices)]
    assert split == again[::-1]
    for a, b in zip(split, plain, strict=True):
        for c in choices:
            assert a[c] == pytest.approx(b[c], abs=1e-4)


@pytest.mark.parametrize(
    "hint",
    [(5, 3), (0, 10_000), (0, -1), ("x", 1), (0,)],
    ids=["no-such-message", "offset-past-end", "negative", "not-an-int", "short"],
)
def test_unusable_hints_fall_back_to_one_forward(tiny, hint):
    conv = requests()[0].messages
    assert tiny._split_at(conv, tiny._prompts([conv], 1)[0], hint) == 0
    [with_hint] = tiny.score_choices([conv], ["A", "B"], prefixes=[hint])
    [plain] = tiny.score_choices([conv], ["A", "B"])
    assert with_hint.logprobs == plain.logprobs


def test_marker_character_in_the_text_means_no_split(tiny):
    r1, _ = judge_requests(PromptBook(), CONVS[0], "a \ue000 b", "No.", PRINCIPLE, JudgeConfig())
    prompt = tiny._prompts([r1.messages], 1)[0]
    assert tiny._split_at(r1.messages, prompt, r1.prefix) == 0


def test_prefix_cache_off_scores_exactly_as_one_forward(tiny_model_dir):
    reqs = requests()
    with TransformersBackend(str(tiny_model_dir), dtype="float32", prefix_cache_mb=0) as off:
        assert scores(off, reqs) == scores(off, reqs, hints=False)
        assert off.prefix_kv.reused_tokens == 0
    with pytest.raises(Exception, match="prefix_cache_mb"):
        TransformersBackend(str(tiny_model_dir), prefix_cache_mb=-1)


def caller_over(backend, like, cache_path) -> ModelCaller:
    """A ModelCaller over ``backend`` keyed as ``like`` (model id and revision)."""
    return ModelCaller(
        lambda: backend,
        model=like.model_id,
        revision=like.model_revision,
        cache=CallCache(cache_path),
        batch_size=4,
    )


def test_caller_passes_hints_only_to_backends_that_take_them(tiny, tmp_path):
    reqs = requests()
    tiny.prefix_kv.clear()
    before = tiny.prefix_kv.reused_tokens
    caller = caller_over(tiny, tiny, tmp_path / "calls.jsonl")
    results = caller.score(reqs)
    caller.cache.close()
    assert all(r.ok for r in results)
    assert tiny.prefix_kv.reused_tokens > before
    assert [r.scores.logprobs for r in results] == scores(tiny, reqs)

    class TwoArgs(TransformersBackend):  # a backend of one's own, old signature
        reuses_prefixes = False

        def score_choices(self, conversations, choices):  # type: ignore[override]
            return super().score_choices(conversations, choices)

    plain = TwoArgs.__new__(TwoArgs)
    plain.__dict__.update(tiny.__dict__)
    caller = caller_over(plain, tiny, tmp_path / "calls2.jsonl")
    assert all(r.ok for r in caller.score(reqs))
    caller.cache.close()
