"""``PromptBook.render_many`` renders a template once for many values of the variables it only
prints, and gives exactly what ``render`` gives for each: same messages, same errors.

The speed is measured by ``bench/judge_wave.py``; these tests pin behaviour only.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from rlaif.constitution import load_constitution
from rlaif.errors import ConfigError
from rlaif.prompts import PromptBook
from rlaif.stages import judge as J

TEMPLATES = {
    # printed in several messages, around loops and conditions, twice, at a body's edges
    "spread": """\
{% call message("user") %}
{{ x }}
{% endcall %}
{% call message("assistant") %}
  {{ x }}{{ y }}
{% endcall %}
{% call message("user") %}
pre {{ y }} mid {{ x }}
{% for i in items %}{{ x }}|{{ i }}{% endfor %}
{% if flag %}{{ y }}{% endif %}
{% endcall %}
""",
    "filtered": '{% call message("user") %}\n{{ x | upper }} {{ y }}\n{% endcall %}\n',
    "own_message": (
        "{% macro message(role) %}{{ caller() | upper }}{% endmacro %}\n"
        '{% call message("user") %}{{ x }}{% endcall %}\n'
    ),
    "assigned": '{% set x = "z" %}\n{% call message("user") %}{{ x }} {{ y }}{% endcall %}\n',
    "tested": '{% call message("user") %}{% if x %}yes{% endif %}{{ x }}{{ y }}{% endcall %}\n',
    "including": '{% call message("system") %}S{% endcall %}\n{% include "part.jinja" %}\n',
    "part": '{% call message("user") %}\n   {{ y }}\n{{ x }}   \n{% endcall %}\n',
    "macro_param": (
        '{% macro m(x) %}{% call message("user") %}{{ x }}{% endcall %}{% endmacro %}\n{{ m(y) }}\n'
    ),
    "outside": '{% call message("user") %}{{ y }}{% endcall %}\n{{ x }}\n',
    "other_call": (
        "{% macro shout() %}{{ caller() | upper }}{% endmacro %}\n"
        '{% call message("user") %}{% call shout() %}{{ x }}{% endcall %} {{ y }}{% endcall %}\n'
    ),
}

# What each template lets render_many splice: everything else renders in full.
PLAIN = {
    "spread": {"x", "y"},
    "filtered": {"y"},
    "own_message": set(),
    "assigned": {"y"},
    "tested": {"y"},
    "including": {"x", "y"},
    "macro_param": set(),
    "outside": {"y"},
    "other_call": {"y"},
}

# Values that probe the body stripping, the markers and Jinja syntax.
VALUES = ["", " ", "\n", "\n\n  x", "x  \n", "  \t\n y \n\n", "{{ x }}", "{% if %}", "\ue000",
          "a\r\nb", "\r", " \r\n", "plain", "\u2003", "\x0b\n", "A. B.\nAnswer: A"]  # fmt: skip


@pytest.fixture
def book(tmp_path: Path) -> PromptBook:
    for name, text in TEMPLATES.items():
        (tmp_path / f"{name}.jinja").write_text(text, encoding="utf-8")
    return PromptBook(tmp_path)


def _outcome(call):  # type: ignore[no-untyped-def]
    try:
        return call()
    except ConfigError as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_the_variables_spliced_are_those_only_printed_in_messages(book, name) -> None:
    assert book._entry(name).plain >= PLAIN[name]
    assert not (book._entry(name).plain & ({"x", "y"} - PLAIN[name]))


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_render_many_is_render_for_each_fill(book, name) -> None:
    rng = random.Random(name)
    for _ in range(400):
        fills = [
            {"x": rng.choice(VALUES) + rng.choice(VALUES), "y": rng.choice(VALUES)}
            for _ in range(rng.randint(1, 4))
        ]
        ctx = {"items": [1, 2][: rng.randint(0, 2)], "flag": rng.random() < 0.5}
        want = _outcome(lambda: [book.render(name, **ctx, **f) for f in fills])  # noqa: B023
        got = _outcome(lambda: book.render_many(name, fills, **ctx))  # noqa: B023
        assert got == want, fills


def test_values_that_are_not_text_render_in_full(book) -> None:
    fills = [{"x": 5, "y": "a"}, {"x": None, "y": "b"}]
    with pytest.raises(ConfigError, match="printed None"):
        book.render_many("spread", fills, items=[], flag=False)
    fills = [{"x": 5, "y": "a"}, {"x": 6.5, "y": "b"}]
    got = book.render_many("spread", fills, items=[], flag=False)
    assert got == [book.render("spread", items=[], flag=False, **f) for f in fills]


def test_a_fill_naming_a_context_variable_fails_as_render_does(book) -> None:
    with pytest.raises(TypeError):
        book.render_many("spread", [{"x": "a", "y": "b"}] * 2, x="c", items=[], flag=True)


def test_the_built_in_judge_templates_splice_both_responses() -> None:
    book = PromptBook(None)
    for name in J.TEMPLATES.values():
        assert {"response_a", "response_b"} <= book._entry(name).plain


@pytest.mark.parametrize("mode", ["logprob", "reasoning"])
def test_judge_requests_many_is_judge_requests_for_each_pair(mode) -> None:
    book = PromptBook(None)
    constitution = load_constitution("helpful-harmless")
    cfg = J.JudgeConfig(mode=mode)
    conversation = [{"role": "user", "content": "How do I sharpen a knife?\n"}]
    pairs = [("Use a whetstone.", "Sure,\n\nuse a stone.  "), ("\n", "x"), ("same", "same")]
    for principle in constitution.principles:
        if principle.judge is None:
            continue
        many = J.judge_requests_many(book, conversation, pairs, principle, cfg, system="Be fair.")
        one = [
            J.judge_requests(book, conversation, x, y, principle, cfg, system="Be fair.")
            for x, y in pairs
        ]
        assert many == one
