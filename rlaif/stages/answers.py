"""Reading a judge's answer for one order: the two options' log-probabilities (logprob mode)
or the last line of a reasoning reply (reasoning mode). Nothing here is recorded or decided;
:mod:`rlaif.stages.judge` turns these into verdicts."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from rlaif.errors import RlaifError


class VerdictError(RlaifError):
    """A judge output that is not a probability (recorded as an error, never guessed); ``raw``
    holds the model's text or a repr of the option scores."""

    def __init__(self, message: str, raw: str = "") -> None:
        super().__init__(message)
        self.raw = raw


class VerdictParseError(VerdictError):
    """A reasoning reply whose last non-empty line is not a strict ``Answer: X`` line."""


def p_first_option(
    logprobs: Mapping[str, float], options: Sequence[str] = ("A", "B")
) -> tuple[float, float]:
    """P(first option) renormalized over the two options, and log(P(A) + P(B)).

    Raises:
        VerdictError: an option is missing or not a number, a score is NaN or +inf, or both
            options are -inf (no probability to renormalize).
    """
    try:
        first, second = options[:2]
        la, lb = logprobs[first], logprobs[second]
        # two finite floats, as a backend gives them, need no checks (x - x is 0.0 only for
        # finite x); anything else is converted and checked
        plain = type(la) is float and type(lb) is float and la - la == 0.0 == lb - lb
        if not plain:
            la, lb = float(la), float(lb)
    except (KeyError, TypeError, ValueError) as exc:
        raise VerdictError(f"bad option scores {logprobs!r}: {exc!r}", repr(logprobs)) from exc
    if not plain:
        if math.isnan(la) or math.isnan(lb) or math.inf in (la, lb):
            raise VerdictError(f"non-finite option scores {logprobs!r}", repr(logprobs))
        if la == lb == -math.inf:
            raise VerdictError("both options have probability 0", repr(logprobs))
    # d is finite or +-inf; exp() only sees arguments <= 0, so it never overflows, and an
    # infinite d gives exp() == 0.0: p is 1 or 0 and log_mass the larger score
    d = la - lb
    if d >= 0:
        return 1 / (1 + math.exp(-d)), la + math.log1p(math.exp(-d))
    e = math.exp(d)
    return e / (1 + e), lb + math.log1p(e)


_ANSWER = r"\s*(?:\*\*)?(?i:answer)(?:\*\*)?\s*:\s*(?:\*\*)?\s*(?:\((?P<p>{0})\)|(?P<l>{0}))"
_ANSWER_END = r"(?:\*\*)?\s*\.?\s*"


def parse_answer(text: str, options: Sequence[str] = ("A", "B")) -> str:
    """The option a reasoning reply chose, read strictly from its last non-empty line.

    That line must be ``Answer: A`` (or B), optionally bold (``**Answer:** A``,
    ``**Answer: A**``, ``Answer: **A**``), parenthesised (``Answer: (A)``) or ending in a period.
    ``answer`` is case-insensitive; the label is not: ``Answer: a`` is an error, because the
    template asks for the label exactly and a parse error is counted, where a misread letter
    would silently become a label. Earlier lines are reasoning and may mention anything, but an
    earlier ``Answer:`` line naming the other option is a contradiction and an error.

    Raises:
        VerdictParseError: anything else (empty, no answer line, ``A or B``, ``Answer: C``, ...),
            with the raw text in ``.raw``.
    """
    if not isinstance(text, str):
        raise VerdictParseError(f"judge reply is {type(text).__name__}, not text", repr(text))
    letters = "|".join(re.escape(o) for o in options)
    pattern = re.compile(_ANSWER.format(letters) + _ANSWER_END)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise VerdictParseError("empty judge reply", text)
    m = pattern.fullmatch(lines[-1])
    if m is None:
        want = " or ".join(f"'Answer: {o}'" for o in options)
        raise VerdictParseError(f"last line is not {want}: {lines[-1][:80]!r}", text)
    chosen = m.group("p") or m.group("l")
    for line in lines[:-1]:
        earlier = pattern.fullmatch(line)
        if earlier and (earlier.group("p") or earlier.group("l")) != chosen:
            raise VerdictParseError(f"conflicting answer lines: {line!r} then {lines[-1]!r}", text)
    return chosen
