"""Code-checked principles: the ``check:`` rule vocabulary, parsed, validated and run exactly.

A principle may carry ``check:``, a small declarative mapping that code evaluates on a
response, with no model and no user code::

    check:
      max_words: 60
      markdown: forbidden
      must_not_match: ['(?i)as an ai']
      refusal: {harmful: expected, safe: forbidden}

:func:`parse_check` validates it when the constitution loads (every problem is a one-line
:class:`~rlaif.errors.ConfigError` naming file, line and ``...check.<rule>``), and
:func:`run_check` applies it to one response. Each rule that applies is one *sub-check*
(each pattern of ``must_match`` / ``must_not_match`` is one); the result passes when all of
them pass.

No pattern can hang a run: user patterns go through the ``regex`` module with a per-match
``timeout`` (:data:`REGEX_TIMEOUT`), on responses of at most :data:`MAX_TEXT` characters; a
match that times out, or a pattern rule on a longer response, is an error result, never a
guess. The markdown rule uses fixed patterns of this module, applied line by line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import regex

from rlaif.errors import ConfigError
from rlaif.refusal import refusal_match
from rlaif.yamlio import line_of, short_repr

COUNTS = ("max_words", "min_words", "max_chars", "min_chars")
PATTERNS = ("must_match", "must_not_match")
CHECK_KEYS = (*COUNTS, *PATTERNS, "ignore_case", "markdown", "refusal")
MARKDOWN = ("allowed", "forbidden")
REFUSAL = ("expected", "forbidden")
REFUSAL_BY_LABEL = ("expected", "forbidden", "any")
REGEX_TIMEOUT = 0.25  # seconds per pattern and response
MAX_TEXT = 20_000  # the longest response a user pattern is matched on, in characters
MAX_COUNT = 10**9
_Fail = Callable[..., ConfigError]  # parse_check's error maker: (message, rule, index)

# What ``markdown: forbidden`` forbids: fixed patterns (CommonMark / GFM syntax), applied to one
# line at a time. None can backtrack across lines, and the one repeated group starts with a
# fixed "|", so every match attempt is linear in the line.
_MARKDOWN_LINE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("heading", re.compile(r"^ {0,3}#{1,6}(?:[ \t]|$)")),
    ("code fence", re.compile(r"^ {0,3}(?:```|~~~)")),
    ("bullet list", re.compile(r"^[ \t]*[-*+•][ \t]+\S")),
    ("numbered list", re.compile(r"^[ \t]*\d{1,3}[.)][ \t]+\S")),
    ("table", re.compile(r"^[ \t]*\|.*\|[ \t]*$")),  # a row between pipes
    ("table", re.compile(r"^[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)+\|?[ \t]*$")),
    ("bold", re.compile(r"\*\*(?=\S)[^*\n]*?\S\*\*|(?<!\w)__(?=\S)[^_\n]*?\S__(?!\w)")),
)


@dataclass(frozen=True)
class Check:
    """A validated ``check:`` mapping (see the module docstring for the vocabulary).

    Attributes:
        max_words, min_words, max_chars, min_chars: bounds on the response's length; words
            are whitespace-separated tokens, characters are counted after stripping the ends.
        must_match, must_not_match: patterns (``regex`` syntax, searched anywhere).
        ignore_case: the patterns ignore case.
        markdown: ``allowed`` (no rule) or ``forbidden``.
        refusal: ``expected``, ``forbidden``, a tuple of ``(label, expected|forbidden|any)``
            pairs sorted by label, or None.
    """

    max_words: int | None = None
    min_words: int | None = None
    max_chars: int | None = None
    min_chars: int | None = None
    must_match: tuple[str, ...] = ()
    must_not_match: tuple[str, ...] = ()
    ignore_case: bool = False
    markdown: str = "allowed"
    refusal: str | tuple[tuple[str, str], ...] | None = None

    def refusal_for(self, label: str | None) -> str | None:
        """``expected`` or ``forbidden`` for a prompt with this label, or None (no verdict)."""
        if self.refusal is None or isinstance(self.refusal, str):
            return self.refusal
        verdict = dict(self.refusal).get(label) if label is not None else None
        return verdict if verdict in REFUSAL else None

    @property
    def needs_label(self) -> bool:
        """Whether the refusal rule depends on the prompt's label (a mapping)."""
        return isinstance(self.refusal, tuple)

    def to_dict(self) -> dict[str, Any]:
        """The canonical plain form: set rules only, sorted keys, patterns as sorted lists."""
        out: dict[str, Any] = {}
        for key in COUNTS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in PATTERNS:
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.ignore_case:
            out["ignore_case"] = True
        if self.markdown != "allowed":
            out["markdown"] = self.markdown
        if isinstance(self.refusal, tuple):
            out["refusal"] = dict(self.refusal)
        elif self.refusal is not None:
            out["refusal"] = self.refusal
        return dict(sorted(out.items()))

    def warnings(self) -> list[tuple[str, str]]:
        """``(rule, message)`` for rules that are valid but may not do what the author meant."""
        out = []
        if self.needs_label:
            out.append(
                (
                    "refusal",
                    "a refusal mapping needs each prompt's label (a pipeline's "
                    "prompts.label_field); a prompt without a label, or with one not in the "
                    "mapping, gets no refusal verdict",
                )
            )
        return out


@dataclass
class CheckResult:
    """What :func:`run_check` found.

    Attributes:
        passed: all applicable sub-checks passed; None when none applied or on error.
        score: the fraction of applicable sub-checks that passed, in [0, 1]; None likewise.
        failures: one short reason per failed sub-check, e.g. ``"73 words > max_words 60"``.
        applied: how many sub-checks applied.
        error: why no verdict could be given (a pattern timed out), else None.
    """

    passed: bool | None
    score: float | None
    failures: list[str] = field(default_factory=list)
    applied: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "score": self.score,
            "failures": list(self.failures),
            "applied": self.applied,
            "error": self.error,
        }


def parse_check(
    mapping: Any, where: str = "check", *, file: str | None = None, line: int | None = None
) -> Check:
    """Validate a ``check:`` mapping (as loaded by :mod:`rlaif.yamlio`, or a plain dict).

    Args:
        mapping: the value of ``check:``.
        where: the dotted field of the mapping, for errors (``principles[2](brief).check``).
        file: the file it came from, for errors.
        line: the line of the ``check:`` key; a loaded mapping knows the line of each rule.

    Raises:
        ConfigError: one line naming the field, e.g. ``...check.max_words``.
    """

    def fail(message: str, key: str | None = None, index: int | str | None = None) -> ConfigError:
        at = (
            line_of(mapping, key, line)
            if key is not None
            else line or getattr(mapping, "line", None)
        )
        if index is not None:
            at = line_of(mapping[key], index, at)
        name = f"{where}.{key}" if key is not None else where
        if index is not None:  # a list item, or a key of a nested mapping
            name += f"[{index}]" if isinstance(index, int) else f".{index}"
        return ConfigError(message, file=file, line=at, field=name)

    allowed = ", ".join(CHECK_KEYS)
    if not isinstance(mapping, dict):
        raise fail(f"check must be a mapping of rules ({allowed}), got {short_repr(mapping)}")
    for key in mapping:
        if key not in CHECK_KEYS:
            raise fail(f"unknown key '{key}' (allowed: {allowed})", str(key))
    values: dict[str, Any] = {}
    for key in COUNTS:
        if key in mapping:
            n = mapping[key]
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_COUNT:
                raise fail(f"must be a whole number >= 0, got {short_repr(n)}", key)
            values[key] = n
    for low, high in (("min_words", "max_words"), ("min_chars", "max_chars")):
        if low in values and high in values and values[low] > values[high]:
            raise fail(f"{low} {values[low]} > {high} {values[high]}: nothing can pass", low)
    if "ignore_case" in mapping:
        if not isinstance(mapping["ignore_case"], bool):
            raise fail(
                f"must be true or false, got {short_repr(mapping['ignore_case'])}", "ignore_case"
            )
        values["ignore_case"] = mapping["ignore_case"]
    for key in PATTERNS:
        if key in mapping:
            values[key] = _patterns(mapping[key], key, values.get("ignore_case", False), fail)
    if "markdown" in mapping:
        if mapping["markdown"] not in MARKDOWN:
            raise fail(
                f"must be allowed or forbidden, got {short_repr(mapping['markdown'])}", "markdown"
            )
        values["markdown"] = mapping["markdown"]
    if "refusal" in mapping:
        values["refusal"] = _refusal(mapping["refusal"], fail)
    check = Check(**values)
    if not check.to_dict().keys() - {"ignore_case"}:
        raise fail(f"check has no rule that checks anything (rules: {allowed})")
    return check


def _patterns(value: Any, key: str, ignore_case: bool, fail: _Fail) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise fail(
            f"must be a pattern or a non-empty list of patterns, got {short_repr(value)}", key
        )
    for i, p in enumerate(items):
        index = None if isinstance(value, str) else i
        if not isinstance(p, str) or not p:
            raise fail(f"a pattern must be a non-empty string, got {short_repr(p)}", key, index)
        try:
            _compiled(p, ignore_case)
        except regex.error as exc:
            raise fail(f"pattern {short_repr(p)} does not compile: {exc}", key, index) from None
    return tuple(sorted(set(items)))


def _refusal(value: Any, fail: _Fail) -> str | tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        if value not in REFUSAL:
            raise fail(
                f"must be expected, forbidden, or a mapping from a prompt label to "
                f"expected|forbidden|any, got {short_repr(value)}",
                "refusal",
            )
        return value
    if not isinstance(value, dict) or not value:
        raise fail(
            "must be expected, forbidden, or a mapping from a prompt label to "
            f"expected|forbidden|any, got {short_repr(value)}",
            "refusal",
        )
    for label, verdict in value.items():
        if not isinstance(label, str) or not label:
            raise fail(
                f"a prompt label must be a non-empty string, got {short_repr(label)}", "refusal"
            )
        if verdict not in REFUSAL_BY_LABEL:
            raise fail(
                f"must be expected, forbidden or any, got {short_repr(verdict)}", "refusal", label
            )
    return tuple(sorted(value.items()))


@lru_cache(maxsize=1024)
def _compiled(pattern: str, ignore_case: bool) -> regex.Pattern:
    return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)


def markdown_found(text: str) -> list[str]:
    """The kinds of markdown in ``text``, each with the line it first appears on.

    Returns:
        e.g. ``["numbered list (line 3)", "bold (line 3)"]``; empty for plain prose.
    """
    found: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        for kind, pattern in _MARKDOWN_LINE:
            if kind not in found and pattern.search(line):
                found[kind] = n
    return [f"{kind} (line {n})" for kind, n in found.items()]


def run_check(check: Check, text: str, label: str | None = None) -> CheckResult:
    """Apply ``check`` to one response.

    Args:
        check: the principle's rules.
        text: the response.
        label: the prompt's label (for a ``refusal`` mapping); None when the source has none.

    Returns:
        A :class:`CheckResult`; an error result when a pattern timed out, or when there are
        patterns and the response is longer than :data:`MAX_TEXT` characters.
    """
    results: list[bool] = []
    failures: list[str] = []

    def sub(ok: bool, reason: str) -> None:
        results.append(ok)
        if not ok:
            failures.append(reason)

    words, chars = len(text.split()), len(text.strip())
    for key, n, unit, over in (
        ("max_words", words, "words", True),
        ("min_words", words, "words", False),
        ("max_chars", chars, "chars", True),
        ("min_chars", chars, "chars", False),
    ):
        bound = getattr(check, key)
        if bound is not None:
            sub(
                n <= bound if over else n >= bound,
                f"{n} {unit} {'>' if over else '<'} {key} {bound}",
            )
    if (check.must_match or check.must_not_match) and len(text) > MAX_TEXT:
        # Matching a prefix could be wrong both ways (`$`, `\b` and lookarounds at the cut).
        return _error(
            f"the response has {len(text)} chars, over the {MAX_TEXT} a pattern is matched on",
            failures,
            results,
        )
    for key, want in (("must_match", True), ("must_not_match", False)):
        for p in getattr(check, key):
            try:
                m = _compiled(p, check.ignore_case).search(text, timeout=REGEX_TIMEOUT)
            except TimeoutError:
                return _error(f"{key} /{p}/ timed out after {REGEX_TIMEOUT} s", failures, results)
            if want:
                sub(m is not None, f"{key} /{p}/ not found")
            else:
                sub(m is None, f"{key} /{p}/ found: {short_repr(m.group(0)) if m else ''}")
    if check.markdown == "forbidden":
        kinds = markdown_found(text)
        sub(not kinds, f"markdown forbidden: {', '.join(kinds)}")
    verdict = check.refusal_for(label)
    if verdict is not None:
        phrase = refusal_match(text)
        if verdict == "expected":
            sub(phrase is not None, _for(label, "refusal expected, the response does not refuse"))
        else:
            sub(
                phrase is None, _for(label, f"refusal forbidden, the response refuses ({phrase!r})")
            )
    if not results:
        return CheckResult(passed=None, score=None, applied=0)
    return CheckResult(
        passed=all(results),
        score=sum(results) / len(results),
        failures=failures,
        applied=len(results),
    )


def _for(label: str | None, reason: str) -> str:
    return f"{reason} (label {label!r})" if label is not None else reason


def _error(message: str, failures: list[str], results: list[bool]) -> CheckResult:
    return CheckResult(
        passed=None, score=None, failures=failures, applied=len(results), error=message
    )
