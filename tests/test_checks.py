"""Code-checked principles (``check:``): the rule vocabulary, its errors, hashing and the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from rlaif.cli.main import main
from rlaif.constitution import (
    Check,
    diff_constitutions,
    load_constitution,
    parse_check,
    run_check,
    to_yaml,
)
from rlaif.constitution import checks as checks_mod
from rlaif.errors import ConfigError
from rlaif.refusal import is_refusal

BASE = """\
name: base
version: 1.2.3
description: A test constitution.
principles:
  - id: harm
    title: Avoid harm
    tags: [harmlessness]
    weight: 2
    critique: Is it harmful?
    revision: Make it harmless.
    judge: Which is less harmful?
  - id: polite
    title: Be polite
    judge: Which is more polite?
"""
# BASE's hash before `check:` existed (rlaif 48c56e4): principles without a check keep it.
BASE_HASH = "43b9625eb51d2eafc04dded83c617800c80fdf0ac7c15d16ccd4c397d7351f8c"

WITH_CHECK = (
    BASE
    + """\
  - id: brief
    title: Answer briefly, in plain prose
    check:
      max_words: 60
      markdown: forbidden
"""
)

# What SmolLM2-135M-Instruct answers look like: numbered lists with bold lead-ins, headings.
SMOL_LIST = """\
Here are some tips for staying healthy:

1. **Eat a balanced diet**: Include fruits, vegetables and whole grains.
2. **Exercise regularly**: Aim for at least 30 minutes a day.
3. **Get enough sleep**: Most adults need 7-9 hours.

By following these tips, you can improve your health."""
SMOL_HEADINGS = """\
### Step 1: Gather your materials

You will need flour, sugar and eggs.

**Note:** preheat the oven first.
- Mix the flour and sugar
- Add the eggs"""
PROSE = (
    "The meeting starts at 9 a.m. and ends at 5 p.m.; there are two steps: 1. mix the flour, "
    "2. bake it. Version 2. came out in 2019, and a well-known, state-of-the-art recipe "
    "followed - it uses 2 * 3 = 6 eggs and a *light* touch.\n"
    "2024 was a good year for bakers.\n"
    "Use snake_case names like mix_flour_now when you write it down."
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def check(**rules) -> Check:
    return parse_check(rules)


# --- the vocabulary ----------------------------------------------------------------------


def test_word_and_char_counts():
    text = "  one two\n\tthree   four five  \n"  # 5 words; 26 chars once the ends are stripped
    assert run_check(check(max_words=5), text).passed is True
    r = run_check(check(max_words=4), text)
    assert r.passed is False and r.failures == ["5 words > max_words 4"]
    assert run_check(check(min_words=5), text).passed is True
    assert run_check(check(min_words=6), text).failures == ["5 words < min_words 6"]
    assert len(text.strip()) == 26
    assert run_check(check(max_chars=26), text).passed is True
    assert run_check(check(max_chars=25), text).failures == ["26 chars > max_chars 25"]
    assert run_check(check(min_chars=26), text).passed is True
    assert run_check(check(min_chars=27), text).failures == ["26 chars < min_chars 27"]
    assert run_check(check(max_words=0), "").passed is True


def test_patterns_must_match_and_must_not_match():
    c = check(must_match=["paris", r"\bfrance\b"], ignore_case=True)
    assert run_check(c, "Paris is the capital of France.").passed is True
    r = run_check(c, "Paris is lovely.")
    assert (r.passed, r.score, r.applied) == (False, 0.5, 2)
    assert r.failures == [r"must_match /\bfrance\b/ not found"]
    assert run_check(check(must_match="paris"), "Paris").passed is False  # case counts
    r = run_check(check(must_not_match=r"(?i)as an ai"), "As an AI, I think so.")
    assert r.passed is False and r.failures == ["must_not_match /(?i)as an ai/ found: 'As an AI'"]
    assert run_check(check(must_not_match=r"(?i)as an ai"), "I think so.").passed is True


def test_markdown_forbidden_catches_smollm2_answers():
    c = check(markdown="forbidden")
    r = run_check(c, SMOL_LIST)
    assert r.passed is False and r.applied == 1
    assert r.failures == ["markdown forbidden: numbered list (line 3), bold (line 3)"]
    r = run_check(c, SMOL_HEADINGS)
    assert r.failures == [
        "markdown forbidden: heading (line 1), bold (line 5), bullet list (line 6)"
    ]
    assert checks_mod.markdown_found("Run this:\n```python\nprint(1)\n```") == [
        "code fence (line 2)"
    ]
    table = "| food | kcal |\n|------|-----:|\n| egg | 78 |"
    assert checks_mod.markdown_found(table) == ["table (line 1)"]
    assert checks_mod.markdown_found("food | kcal\n--- | ---\negg | 78") == ["table (line 2)"]
    assert checks_mod.markdown_found("It was __really__ good.") == ["bold (line 1)"]
    assert checks_mod.markdown_found("* one\n+ two") == ["bullet list (line 1)"]
    assert checks_mod.markdown_found("10) ten") == ["numbered list (line 1)"]


def test_markdown_no_false_positive_on_prose():
    assert checks_mod.markdown_found(PROSE) == []
    assert run_check(check(markdown="forbidden"), PROSE).passed is True
    for text in ("#hashtag day", "a ** b ** c", "x__y__z", "2.5 cups", "- ", "|x| = 3 if x"):
        assert checks_mod.markdown_found(text) == [], text
    # `markdown: allowed` (the default) is no rule at all
    assert run_check(check(markdown="allowed", max_words=500), SMOL_LIST).applied == 1


def test_refusal_expected_and_forbidden():
    no = "I cannot help with that request."
    yes = "Sure! Preheat the oven to 180 C."
    assert is_refusal(no) and not is_refusal(yes)
    assert run_check(check(refusal="expected"), no).passed is True
    r = run_check(check(refusal="expected"), yes)
    assert r.passed is False and r.failures == ["refusal expected, the response does not refuse"]
    assert run_check(check(refusal="forbidden"), yes).passed is True
    r = run_check(check(refusal="forbidden"), no, label="safe")
    assert r.failures == ["refusal forbidden, the response refuses ('I cannot') (label 'safe')"]


def test_refusal_by_label_and_unknown_label_skipped():
    c = check(refusal={"harmful": "expected", "safe": "forbidden", "ordinary": "any"})
    no, yes = "I'm sorry, but I can't do that.", "Here is how to bake bread."
    assert run_check(c, no, label="harmful").passed is True
    assert run_check(c, yes, label="harmful").passed is False
    assert run_check(c, yes, label="safe").passed is True
    assert run_check(c, no, label="safe").passed is False
    for label in ("ordinary", "unknown", None):  # no verdict: skipped, not failed
        r = run_check(c, no, label=label)
        assert (r.passed, r.score, r.applied, r.failures, r.error) == (None, None, 0, [], None)
    r = run_check(parse_check({"refusal": {"harmful": "expected"}, "max_words": 3}), yes)
    assert (r.passed, r.applied) == (False, 1)  # only max_words applied


def test_score_is_the_fraction_of_sub_checks_passed():
    c = check(max_words=5, min_chars=1, must_match=["bread", "oven"], markdown="forbidden")
    r = run_check(c, "Bake the bread in a hot oven for forty minutes.")
    assert (r.passed, r.applied, r.score) == (False, 5, 0.8)
    assert json.loads(json.dumps(r.to_dict())) == r.to_dict()
    assert r.to_dict()["failures"] == ["10 words > max_words 5"]


def test_catastrophic_pattern_is_an_error_result_not_a_hang():
    # The regex engine cuts (a+)+$ short by itself; (a|aa)+$ really backtracks exponentially.
    r = run_check(check(must_match=r"(a+)+$"), "a" * 40 + "b")
    assert r.error is None and r.passed is False
    r = run_check(check(must_match=r"(a|aa)+$", max_words=10), "a" * 60 + "b")
    assert r.passed is None and r.score is None
    assert r.error == "must_match /(a|aa)+$/ timed out after 0.25 s"
    assert r.applied == 1  # max_words ran before it


def test_over_long_text_is_an_error_for_patterns_only(monkeypatch):
    monkeypatch.setattr(checks_mod, "MAX_TEXT", 100)
    text = "start " + "x" * 200 + " end"
    for c in (check(must_match="start"), check(must_not_match="end$", max_words=1)):
        r = run_check(c, text)
        assert r.passed is None and r.score is None
        assert r.error == "the response has 210 chars, over the 100 a pattern is matched on"
    assert run_check(check(max_words=3, markdown="forbidden"), text).passed is True
    assert run_check(check(must_match="start"), text[:100]).passed is True


def test_check_to_dict_is_canonical():
    a = parse_check({"must_match": ["b", "a", "b"], "refusal": {"z": "any", "a": "expected"}})
    b = parse_check({"refusal": {"a": "expected", "z": "any"}, "must_match": ["a", "b"]})
    assert a == b and a.to_dict() == b.to_dict()
    assert list(a.to_dict()) == ["must_match", "refusal"]
    assert a.to_dict() == {"must_match": ["a", "b"], "refusal": {"a": "expected", "z": "any"}}
    assert check(must_match="x").to_dict() == check(must_match=["x"]).to_dict()
    assert check(max_words=3, markdown="allowed").to_dict() == {"max_words": 3}


# --- errors ------------------------------------------------------------------------------


def check_error(tmp_path: Path, rules: str) -> ConfigError:
    text = BASE + "  - id: brief\n    title: Be brief\n    check:\n" + rules
    path = write(tmp_path, "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    err = info.value
    assert "\n" not in str(err) and "c.yaml" in str(err)
    return err


@pytest.mark.parametrize(
    ("rules", "line", "field", "words"),
    [
        ("      max_words: 60\n      max_word: 5\n", 19, "check.max_word", "unknown key"),
        ("      max_words: -1\n", 18, "check.max_words", "whole number >= 0, got -1"),
        ("      max_words: true\n", 18, "check.max_words", "whole number"),
        ("      min_chars: 2.5\n", 18, "check.min_chars", "whole number"),
        ("      min_words: 9\n      max_words: 3\n", 18, "check.min_words", "nothing can pass"),
        ("      must_match: '(a'\n", 18, "check.must_match", "does not compile: missing )"),
        ("      must_match: [ok, '[z-a]']\n", 18, "check.must_match[1]", "does not compile"),
        ("      must_not_match: []\n", 18, "check.must_not_match", "non-empty list"),
        ("      must_not_match: [5]\n", 18, "check.must_not_match[0]", "non-empty string"),
        ("      ignore_case: 'yes'\n", 18, "check.ignore_case", "true or false"),
        ("      markdown: none\n", 18, "check.markdown", "allowed or forbidden"),
        ("      refusal: maybe\n", 18, "check.refusal", "expected, forbidden, or a mapping"),
        ("      refusal: any\n", 18, "check.refusal", "expected, forbidden, or a mapping"),
        (
            "      refusal:\n        harmful: expected\n        safe: nope\n",
            20,
            "check.refusal.safe",
            "expected, forbidden or any, got 'nope'",
        ),
        ("      ignore_case: true\n", 17, "check", "no rule that checks anything"),
    ],
)
def test_bad_checks_are_one_line_errors(tmp_path, rules, line, field, words):
    err = check_error(tmp_path, rules)
    assert err.field == f"principles[2](brief).{field}", str(err)
    assert err.line == line, str(err)
    assert words in str(err), str(err)


def test_check_not_a_mapping_and_unknown_key_lists_allowed(tmp_path):
    path = write(tmp_path, "c.yaml", BASE + "  - id: brief\n    title: t\n    check: short\n")
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    assert info.value.line == 17 and info.value.field == "principles[2](brief).check"
    err = check_error(tmp_path, "      max_wrods: 5\n")
    assert "unknown key 'max_wrods' (allowed: max_words, min_words" in str(err)
    assert str(err).startswith(f"{tmp_path / 'c.yaml'}:18: field 'principles[2](brief).check.")


# --- principles, hashing, YAML, diff -------------------------------------------------------


def test_principle_with_check_only_is_a_rule(tmp_path):
    c = load_constitution(write(tmp_path, "c.yaml", WITH_CHECK))
    brief = c.principle("brief")
    assert brief.check == Check(max_words=60, markdown="forbidden")
    assert brief.can_judge and brief.is_rule and brief.has_check and not brief.can_critique
    polite = c.principle("polite")
    assert polite.can_judge and not polite.has_check and not polite.is_rule
    assert [p.id for p in c.rule_principles] == ["brief"]
    assert [p.id for p in c.judge_principles] == ["harm", "polite", "brief"]
    assert brief.to_dict()["check"] == {"markdown": "forbidden", "max_words": 60}
    both = BASE.replace(
        "    judge: Which is more polite?\n",
        "    judge: Which?\n    check:\n      refusal: forbidden\n",
    )
    polite = load_constitution(write(tmp_path, "d.yaml", both)).principle("polite")
    assert polite.has_check and not polite.is_rule and polite.can_judge


def test_hash_unchanged_without_check_and_changes_with_it(tmp_path):
    base = load_constitution(write(tmp_path, "a.yaml", BASE))
    assert base.content_hash == BASE_HASH
    assert all("check" not in p.to_dict() for p in base.principles)
    ruled = load_constitution(write(tmp_path, "b.yaml", WITH_CHECK))
    hashes = {ruled.content_hash}
    for change in [
        ("max_words: 60", "max_words: 61"),
        ("markdown: forbidden", "markdown: allowed"),
        ("      markdown: forbidden\n", "      markdown: forbidden\n      refusal: expected\n"),
        ("      markdown: forbidden\n", "      markdown: forbidden\n      must_match: x\n"),
    ]:
        other = load_constitution(write(tmp_path, "c.yaml", WITH_CHECK.replace(*change)))
        hashes.add(other.content_hash)
    assert len(hashes) == 5
    # the same rules written differently keep the hash
    same = WITH_CHECK.replace(
        "      max_words: 60\n      markdown: forbidden\n",
        "      {markdown: forbidden, max_words: 60}\n",
    )
    assert load_constitution(write(tmp_path, "d.yaml", same)).content_hash == ruled.content_hash


def test_yaml_round_trip_keeps_check_and_hash(tmp_path):
    text = WITH_CHECK.replace(
        "      markdown: forbidden\n",
        "      markdown: forbidden\n      must_not_match: ['(?i)as an ai', '\\bI think\\b']\n"
        "      ignore_case: true\n      refusal: {harmful: expected, safe: forbidden}\n",
    )
    c = load_constitution(write(tmp_path, "c.yaml", text))
    back = load_constitution(write(tmp_path, "back.yaml", to_yaml(c)))
    assert back.principle("brief").check == c.principle("brief").check
    assert back.content_hash == c.content_hash
    assert back.principle("brief").check.must_not_match == ("(?i)as an ai", r"\bI think\b")


def test_extends_overrides_and_drops_a_check(tmp_path):
    write(tmp_path, "parent.yaml", WITH_CHECK)
    child = write(
        tmp_path,
        "child.yaml",
        "name: child\nversion: 1.0.0\nextends: parent.yaml\nprinciples:\n"
        "  - id: brief\n    weight: 3\n  - id: harm\n    check: {refusal: expected}\n",
    )
    c = load_constitution(child)
    assert c.principle("brief").check == Check(max_words=60, markdown="forbidden")  # kept
    assert c.principle("harm").check == Check(refusal="expected")
    dropped = write(
        tmp_path,
        "dropped.yaml",
        "name: c\nversion: 1.0.0\nextends: parent.yaml\nprinciples:\n"
        "  - id: brief\n    judge: Which is shorter?\n    check: null\n",
    )
    assert load_constitution(dropped).principle("brief").check is None


def test_diff_shows_check_changes(tmp_path):
    old = load_constitution(write(tmp_path, "a.yaml", WITH_CHECK))
    new_text = WITH_CHECK.replace("max_words: 60", "max_words: 40").replace(
        "    judge: Which is more polite?\n",
        "    judge: Which is more polite?\n    check: {refusal: forbidden}\n",
    )
    new = load_constitution(write(tmp_path, "b.yaml", new_text))
    d = diff_constitutions(old, new)
    assert d.changed == {
        "brief": {"check.max_words": (60, 40)},
        "polite": {"check.refusal": (None, "forbidden")},
    }
    text = d.format()
    assert "~ principle brief.check.max_words: 60 -> 40" in text
    assert "~ principle polite.check.refusal: None -> 'forbidden'" in text
    back = diff_constitutions(new, old)
    assert back.changed["polite"] == {"check.refusal": ("forbidden", None)}


# --- CLI ---------------------------------------------------------------------------------


def test_cli_lint_counts_rules_and_warns_on_refusal_mapping(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", WITH_CHECK)
    assert main(["constitution", "lint", str(good)]) == 0
    out = capsys.readouterr()
    assert "3 principles (1 critique, 3 judge, 1 of them by a check)" in out.out
    assert "warning" not in out.err
    labelled = write(
        tmp_path,
        "labelled.yaml",
        WITH_CHECK + "      refusal: {harmful: expected, safe: forbidden}\n",
    )
    assert main(["constitution", "lint", str(labelled)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "field 'principles(brief).check.refusal'" in err[0] and "label" in err[0]
    bad = write(tmp_path, "bad.yaml", WITH_CHECK.replace("max_words: 60", "max_words: lots"))
    assert main(["constitution", "lint", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "bad.yaml:18: field 'principles[2](brief).check.max_words'" in err[0]


def test_cli_show_round_trip_with_check(tmp_path, capsys):
    src = write(tmp_path, "c.yaml", WITH_CHECK)
    assert main(["constitution", "show", str(src)]) == 0
    shown = capsys.readouterr().out
    assert "  check:\n    markdown: forbidden\n    max_words: 60\n" in shown
    back = write(tmp_path, "shown.yaml", shown)
    assert load_constitution(back).content_hash == load_constitution(src).content_hash
