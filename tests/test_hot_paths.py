"""The per-request shortcuts of the judge wave compute exactly what the general code computes:
cache keys from a caller's key frames, chat messages' canonical JSON, the judge's P(first)
from two finite floats, the call cache's entry lines and the weighted principle draw.

``bench/judge_wave.py`` measures the speed; these tests only pin behaviour (no timings).
"""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import pytest

from rlaif.backends.base import SamplingParams
from rlaif.calls.caller import GenRequest, ModelCaller, ScoreRequest, request_key
from rlaif.constitution import load_constitution
from rlaif.stages.answers import p_first_option
from rlaif.store import CallCache, canonical_json
from rlaif.store.hashing import _CANONICAL, _normalize
from rlaif.store.jsonl import encode_keyed_line, encode_line

TEXT = 'ab\u00e9\n"\\\t\x00 <>&\u2028\U0001f600'


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(TEXT) for _ in range(rng.randint(0, n)))


def _messages(rng: random.Random) -> list:
    out = []
    for _ in range(rng.randint(0, 3)):
        m = {"role": _text(rng, 5), "content": _text(rng, 30)}
        out.append(m if rng.random() < 0.5 else {"content": m["content"], "role": m["role"]})
    return out


def test_chat_messages_hash_as_the_general_walk_writes_them() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        msgs = _messages(rng)
        assert canonical_json(msgs) == _CANONICAL(_normalize(msgs, "$"))
    # anything else than exactly a string role and content takes the general path
    odd = [
        [{"role": "user", "content": "x", "name": "n"}],
        [{"role": "user"}],
        [{"role": "user", "content": 1.0}],
        [{"role": "user", "content": "x"}, "text"],
        [{"role": "user", "content": ["part"]}],
    ]
    for msgs in odd:
        assert canonical_json(msgs) == _CANONICAL(_normalize(msgs, "$"))


def test_a_callers_keys_are_request_key_for_every_model_params_and_template(
    tmp_path: Path,
) -> None:
    caller = ModelCaller(lambda: None, model="m", revision="r1",  # type: ignore[arg-type,return-value]
                         cache=CallCache(tmp_path / "calls.jsonl"))  # fmt: skip
    msgs = [[{"role": "user", "content": f"q {i} \u00e9"}] for i in range(3)]
    reqs: list = [ScoreRequest(m, ("A", "B"), t) for m in msgs for t in ("t1", "t2", None)]
    reqs += [ScoreRequest(m, ("Yes", "No"), "t1") for m in msgs]
    for params in (SamplingParams(), SamplingParams(temperature=0.7, seed=3, stop=("\n",))):
        reqs += [GenRequest(m, params, t) for m in msgs for t in ("t1", None)]
    # equal params whose JSON differs (True is not 1) keep keys of their own
    reqs += [GenRequest(msgs[0], SamplingParams(n=True), None)]
    reqs += [GenRequest(msgs[0], SamplingParams(n=1), None)]
    for model, revision in (("m", "r1"), ("m", "r2"), ("other", None)):
        caller.model, caller.revision = model, revision
        for req in reqs * 2:
            assert caller.key(req) == request_key(model, revision, req)
    assert caller.key(reqs[-1]) != caller.key(reqs[-2])
    labels = ["A", "B"]  # choices in a list, changed between two keys
    listed = ScoreRequest(msgs[0], labels, "t1")  # type: ignore[arg-type]
    first = caller.key(listed)
    labels[1] = "C"
    assert caller.key(listed) == request_key(caller.model, caller.revision, listed) != first


def _float(rng: random.Random) -> float:
    kind = rng.random()
    if kind < 0.1:
        return -math.inf
    if kind < 0.2:  # any finite double, tiny and huge ones included
        x = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        return x if math.isfinite(x) else 0.0
    return rng.choice([-1, 1]) * rng.random() * 10.0 ** rng.randint(-20, 3)


class _Float(float):
    """A float the shortcut does not take: the general path computes these."""


def _p_first_reference(la: float, lb: float) -> tuple[float, float]:
    """P(first) and log(P(A) + P(B)) as p_first_option computed them before its shortcut."""
    d = la - lb
    p = 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))
    log_mass = max(la, lb) + (math.log1p(math.exp(-abs(d))) if math.isfinite(d) else 0.0)
    return p, log_mass


def test_p_first_of_two_finite_floats_is_that_of_the_general_path() -> None:
    rng = random.Random(1)
    for _ in range(20000):
        a, b = _float(rng), _float(rng)
        if a == b == -math.inf:
            continue
        got = p_first_option({"A": a, "B": b})
        want = p_first_option({"A": _Float(a), "B": _Float(b)})
        assert repr(got) == repr(want), (a, b)
        assert repr(got) == repr(_p_first_reference(a, b)), (a, b)


def test_a_cache_entry_line_is_the_line_of_its_dict() -> None:
    rng = random.Random(2)
    for _ in range(2000):
        key = _text(rng, 20).replace("\ud800", "") or "k"
        value = {"logprobs": {"A": _float(rng) if rng.random() < 0.9 else None},
                 "prompt_tokens": rng.randint(0, 9), "t": _text(rng, 10)}  # fmt: skip
        if value["logprobs"]["A"] == -math.inf:
            value["logprobs"]["A"] = None
        assert encode_keyed_line(key, value) == encode_line({"key": key, "value": value})
    for bad in (float("nan"), object()):
        with pytest.raises((ValueError, TypeError)):
            encode_keyed_line("k", bad)
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="contains itself"):
        encode_keyed_line("k", loop)


def test_the_principle_draw_is_choices_by_weight() -> None:
    constitution = load_constitution("helpful-harmless")
    for kind, pool in (("judge", constitution.judge_principles),
                       ("critique", constitution.critique_principles)):  # fmt: skip
        weights = [p.weight for p in pool]
        for seed in range(200):
            got = constitution.sample_principles(3, random.Random(seed), kind=kind)
            want = random.Random(seed).choices(list(pool), weights=weights, k=3)
            assert [p.id for p in got] == [p.id for p in want]
