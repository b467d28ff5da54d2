"""The fast paths of the judge wave give the same bytes and notice the same changes as the slow
ones they replaced: canonical JSON, verdict dicts, and the template freshness check.

``bench/scale.py`` measures the speed; these tests only pin behaviour (no timings).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import random
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest

from rlaif.backends.base import common_prefix_length
from rlaif.calls.caller import ScoreRequest, request_key
from rlaif.errors import ConfigError
from rlaif.prompts import PromptBook
from rlaif.stages.judge import JudgeConfig, OrderResult, Verdict
from rlaif.store.hashing import (
    _CANONICAL,
    CanonicalJSONError,
    Encoded,
    _normalize,
    cache_key,
    canonical_json,
    plain_fields,
    record_id,
)
from rlaif.store.jsonenc import compact_encoder


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


Point = namedtuple("Point", "x y")


def _value(rng: random.Random, depth: int = 0) -> object:
    scalars = [None, True, False, 7, -0.0, 2.0, 0.1, 2.0**60, 1e300, "é\U0001f600", Color.RED]
    scalars.append(Level.HIGH)
    kind = rng.randrange(len(scalars) + (6 if depth < 4 else 0))
    if kind < len(scalars):
        return scalars[kind]
    kind -= len(scalars)
    items = [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 0:
        return items
    if kind == 1:
        return tuple(items)
    if kind == 2:
        return {f"k{i}": v for i, v in enumerate(items)}
    if kind == 3:
        return OrderedDict(z=items)
    if kind == 4:
        return Point(items, None)
    return {Color.RED: items}


def _slow_canonical(obj: object) -> str:
    """The walk canonical_json used before its fast path (json encoder settings unchanged)."""
    return _CANONICAL(_normalize(obj, "$"))


def test_canonical_json_matches_the_path_walk_on_random_values() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        obj = _value(rng)
        assert canonical_json(obj) == _slow_canonical(obj)


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"a": [1, float("nan")]}, r"\$\.a\[1\]"),
        ({"p": {"t": float("-inf")}}, r"\$\.p\.t"),
        ({"a": {1: "x"}}, r"key 1 at \$\.a"),
        ([{"s": {1, 2}}], r"\$\[0\]\.s is a set"),
    ],
)
def test_canonical_json_errors_still_name_the_path(bad: object, where: str) -> None:
    with pytest.raises(CanonicalJSONError, match=where):
        canonical_json(bad)


def _spliced(rng: random.Random, obj: object) -> object:
    """``obj`` with some of its parts replaced by their :class:`Encoded` form."""
    if rng.random() < 0.3:
        try:
            return Encoded(obj)
        except CanonicalJSONError:
            return obj
    if type(obj) is dict:
        return {k: _spliced(rng, v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return [_spliced(rng, v) for v in obj]  # type: ignore[union-attr]
    return obj


def test_encoded_parts_hash_as_the_values_they_encode() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        obj = _value(rng)
        assert canonical_json(_spliced(rng, obj)) == canonical_json(obj)
    with pytest.raises(CanonicalJSONError, match=r"\$\.b\[0\]"):
        canonical_json({"a": Encoded([1]), "b": [float("nan")]})
    with pytest.raises(CanonicalJSONError, match=r"key 1 at \$\[1\]"):
        canonical_json([Encoded("x"), {1: 2}])
    loop: dict = {}
    loop["self"] = loop
    with pytest.raises(CanonicalJSONError, match="contains itself"):
        canonical_json(loop)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": 'Pick: é \U0001f600 "q" \\ end'},
]


def test_cache_keys_and_record_ids_are_those_of_before_the_splicing() -> None:
    # Pinned from the code before Encoded existed: every cache and record id stays valid.
    req = ScoreRequest(MESSAGES, ("A", "B"), "t")
    want = "0bff4e3aae80fdd575e4544feb6bd2f74876232e655ae442349f9baf1ec69e64"
    assert request_key("m", "r1", req) == want
    params = {"choices": ["A", "B"], "batch_size": 8}  # batch_size: not part of the key
    key = cache_key(model="m", revision="r1", messages=MESSAGES, kind="score_choices",
                    params=params, template_hash="t")  # fmt: skip
    assert key == want
    gen = cache_key(model="m", revision=None, messages=MESSAGES, template_hash=None,
                    params={"temperature": 0.0, "n": 2, "stop": ["\n"]})  # fmt: skip
    assert gen == "bf9692e537876601572baa1c61178dd41ef048aae5ba29d93f11cff65d834b2d"
    inputs = {"prompt": MESSAGES[1:], "x": "a", "y": "b", "model": "m", "revision": None,
              "requests": [[MESSAGES, MESSAGES], {"check": {"kind": "regex"}}],
              "judge": {"p": 0.5, "k": 1.0}}  # fmt: skip
    assert record_id("judge", inputs) == "d14f4d0b6d266f2f07e343c1"
    enc = req.messages_json
    assert req.messages_json is enc  # encoded once per request
    spliced = {**inputs, "requests": [[enc, enc], {"check": {"kind": "regex"}}],
               "judge": Encoded(inputs["judge"])}  # fmt: skip
    assert record_id("judge", spliced) == "d14f4d0b6d266f2f07e343c1"


def test_common_prefix_length_is_os_path_commonprefix() -> None:
    rng = random.Random(4)
    for _ in range(5000):
        a = "".join(rng.choice("ab\u00e9") for _ in range(rng.randint(0, 40)))
        b = "".join(rng.choice("ab\u00e9") for _ in range(rng.randint(0, 40)))
        b = a[: rng.randint(0, len(a))] + b if rng.random() < 0.7 else b
        assert common_prefix_length(a, b) == len(os.path.commonprefix([a, b]))  # noqa: RUF071


def _verdict(rng: random.Random) -> Verdict:
    order = OrderResult(1, 0.7, "A", {"A": -0.3, "B": None}, -1e-17)
    member = Verdict("ok", "a", 0.7, 0.7, 0.7, True, 1, 2, None, orders=[order, order])
    scores = {"x": 1.0, "y": 0.0, "odd": _value(rng), "failures_x": ("a", "b")}
    return Verdict(
        "ok", "tie", 0.5, principle_ids=["p", "q"], members=[member, member], scores=scores
    )


def test_plain_fields_is_asdict() -> None:
    rng = random.Random(1)
    for _ in range(300):
        v = _verdict(rng)
        # repr also compares key order and value types (1 vs 1.0, tuple vs list)
        assert repr(v.to_dict()) == repr(dataclasses.asdict(v))
    weird = Verdict("error", scores={"s": {1, 2}, "p": Point([1], (2,)), "e": Level.HIGH})
    assert repr(weird.to_dict()) == repr(dataclasses.asdict(weird))
    nested = JudgeConfig(option_prior=1.0)  # a frozen dataclass holding another
    assert repr(plain_fields(nested)) == repr(dataclasses.asdict(nested))


def test_verdict_dicts_are_copies() -> None:
    v = _verdict(random.Random(2))
    d = v.to_dict()
    d["members"][0]["orders"][0]["logprobs"]["A"] = 0.0
    d["principle_ids"].append("r")
    assert v.members[0].orders[0].logprobs == {"A": -0.3, "B": None}
    assert v.principle_ids == ["p", "q"]


def test_judge_config_dict_is_built_once_and_handed_out_as_copies() -> None:
    cfg = JudgeConfig(option_prior=0.5, band=(0.3, 0.7))
    want = dataclasses.asdict(cfg)
    want.update(band=[0.3, 0.7], options=["A", "B"], sampling=cfg.sampling.to_dict())
    first = cfg.to_dict()
    assert repr(first) == repr(want)
    first["band"].append(1.0)
    first["sampling"]["stop"].append("x")
    assert repr(cfg.to_dict()) == repr(want)
    assert "option_prior" not in JudgeConfig().to_dict()  # uncalibrated: ids unchanged


# -- template freshness -------------------------------------------------------------------------


def _write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _bump(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_warm_renders_do_not_resolve_paths(tmp_path: Path, monkeypatch) -> None:
    book = PromptBook(tmp_path)
    _write(tmp_path, "t.jinja", '{% call message("user") %}{{ q }}{% endcall %}\n')
    book.render("t", q="warm")

    def refuse(self: Path, strict: bool = False) -> Path:
        raise AssertionError("a warm render resolved a path")

    monkeypatch.setattr(Path, "resolve", refuse)
    for i in range(20):
        assert book.render("t", q=str(i)).messages[0]["content"] == str(i)


def test_warm_book_notices_a_same_size_edit_and_a_removed_override(tmp_path: Path) -> None:
    path = _write(tmp_path, "respond.jinja", '{% call message("user") %}one{% endcall %}\n')
    book = PromptBook(tmp_path)
    for _ in range(5):
        assert book.render("respond", conversation=[]).messages[0]["content"] == "one"
    path.write_text('{% call message("user") %}two{% endcall %}\n', encoding="utf-8")
    _bump(path)
    assert book.render("respond", conversation=[]).messages[0]["content"] == "two"
    path.unlink()  # the built-in template takes over again
    turn = [{"role": "user", "content": "hi"}]
    assert book.template_hash("respond") == PromptBook().template_hash("respond")
    assert book.render("respond", conversation=turn).messages == (
        PromptBook().render("respond", conversation=turn).messages
    )


def test_warm_book_notices_a_partial_appearing_in_a_sub_folder(tmp_path: Path) -> None:
    main = '{% include "parts/p.jinja" %}\n'
    _write(tmp_path / "parts", "p.jinja", '{% call message("user") %}old{% endcall %}\n')
    _write(tmp_path, "main.jinja", main)
    book = PromptBook(tmp_path)
    before = book.template_hash("main")
    assert book.render("main").messages[0]["content"] == "old"
    part = tmp_path / "parts" / "p.jinja"
    part.write_text('{% call message("user") %}new{% endcall %}\n', encoding="utf-8")
    _bump(part)
    assert book.render("main").messages[0]["content"] == "new"
    assert book.template_hash("main") != before


def test_a_symlink_retargeted_outside_is_refused_at_the_next_render(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    inside = _write(folder, "real.jinja", '{% call message("user") %}in{% endcall %}\n')
    outside = _write(tmp_path, "outside.jinja", '{% call message("user") %}out{% endcall %}\n')
    (folder / "t.jinja").symlink_to(inside)
    book = PromptBook(folder)
    assert book.render("t").messages[0]["content"] == "in"
    assert book.render("t").messages[0]["content"] == "in"
    (folder / "t.jinja").unlink()
    (folder / "t.jinja").symlink_to(outside)
    with pytest.raises(ConfigError, match="links outside its folder"):
        book.render("t")


# -- compact_encoder: the C encoder built once writes what JSONEncoder.encode writes ----------


def _reference(sort_keys: bool) -> json.JSONEncoder:
    return json.JSONEncoder(
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        check_circular=False,
        sort_keys=sort_keys,
    )


@pytest.mark.parametrize("sort_keys", [False, True])
def test_compact_encoder_writes_what_the_plain_encoder_writes(sort_keys: bool) -> None:
    fast, ref = compact_encoder(sort_keys=sort_keys), _reference(sort_keys)
    rng = random.Random(1)
    extra = ["", 'é\u2028\ud7ff\n\t"\\', 0.1, -0.0, 1e300, 5e-324, 2**70, -(2**63), True, None]
    for _ in range(2000):
        obj = _value(rng)
        obj = _normalize(obj, "$")  # plain JSON types (the generator makes tuples, enums...)
        assert fast(obj) == ref.encode(obj)
    for obj in [*extra, extra, {"b": extra, "a": {"c": [], "d": {}}}]:
        assert fast(obj) == ref.encode(obj)


@pytest.mark.parametrize("bad", [float("nan"), [1, float("inf")], {"x": object()}, {1j: 2}])
def test_compact_encoder_fails_as_the_plain_encoder_does(bad: object) -> None:
    fast, ref = compact_encoder(sort_keys=True), _reference(True)
    with pytest.raises((ValueError, TypeError)) as expected:
        ref.encode(bad)
    with pytest.raises(expected.type):
        fast(bad)


def test_compact_encoder_falls_back_without_a_c_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    from json import encoder as json_encoder

    monkeypatch.setattr(json_encoder, "c_make_encoder", None)
    assert compact_encoder(sort_keys=True)({"b": 1, "a": [0.5]}) == '{"a":[0.5],"b":1}'

    monkeypatch.undo()
    real_make = json_encoder.c_make_encoder
    calls = []

    def other_signature(*args: object) -> object:
        # the first call is compact_encoder's: an interpreter whose encoder takes other args
        calls.append(args)
        if len(calls) == 1:
            raise TypeError("takes 10 arguments")
        return real_make(*args)

    monkeypatch.setattr(json_encoder, "c_make_encoder", other_signature)
    assert compact_encoder(sort_keys=False)({"b": 1, "a": "é"}) == '{"b":1,"a":"é"}'
    assert len(calls) == 2  # built once, failed; then the plain encoder's own per call


def _spy_freezes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import gc

    calls: list[str] = []
    for name in ("freeze", "unfreeze"):
        real = getattr(gc, name)
        monkeypatch.setattr(gc, name, lambda n=name, f=real: (calls.append(n), f())[1])
    return calls


def test_run_gc_freezes_and_raises_the_threshold_for_the_run_then_restores_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from rlaif.pipeline.gc_tuning import YOUNG_THRESHOLD, run_gc

    calls = _spy_freezes(monkeypatch)
    before = gc.get_threshold()
    raised = (max(before[0], YOUNG_THRESHOLD), *before[1:])
    with run_gc():
        assert gc.get_threshold() == raised and calls == ["freeze"]
        with run_gc():  # nested: the outer run's setting stays
            assert gc.get_threshold() == raised
        assert gc.get_threshold() == raised and calls == ["freeze"]
    assert gc.get_threshold() == before and calls == ["freeze", "unfreeze"]
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyError), run_gc():
        raise KeyError("a run that fails")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_run_gc_leaves_a_freeze_of_the_process_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    from rlaif.pipeline.gc_tuning import run_gc

    gc.freeze()  # a server that froze its objects before forking, say
    try:
        calls = _spy_freezes(monkeypatch)
        with run_gc():
            pass
        assert calls == []  # no freeze of its own on top, no unfreeze of the process's
    finally:
        monkeypatch.undo()
        gc.unfreeze()
