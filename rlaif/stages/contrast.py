"""RLCD contrast pairs: both responses from the same prompt, under opposite instructions.

RLCD (Yang et al., arXiv 2307.12950) asks the policy for a response under a principle's
positive instruction and another under its negative one, and labels the positive response
chosen by construction: no judge decides the label, so a judge at chance cannot spoil it. The
exported prompt is the plain prompt, so training distils the contrast into the model.

Where the instruction goes (``placement``):

* ``assistant`` (the paper): the affix opens the final assistant turn, which the model then
  continues (``Assistant (harmless, helpful response):`` in the paper's plain-text format; in
  chat format the final message is an assistant message holding the affix, and backends
  continue it); every earlier assistant turn of the conversation opens with the *opposite*
  affix, as in the paper's script.
* ``system``: a system message asks for the affix's kind of response (the ``rlcd_sys``
  variant); the pipeline's own system prompt, if any, comes first.

Pure functions; :mod:`rlaif.pipeline.contrast` owns model calls, records and the export.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from rlaif.backends.base import Conversation, SamplingParams
from rlaif.calls.caller import GenRequest
from rlaif.constitution import Check, Constitution, Principle, run_check
from rlaif.errors import ConfigError
from rlaif.prompts import PromptBook
from rlaif.refusal import is_refusal
from rlaif.stages.judge import Verdict
from rlaif.store import content_hash

PLACEMENTS = ("assistant", "system")
SIDES = ("positive", "negative")


def contrast_principle(constitution: Constitution, seed: int, prompt_id: str) -> Principle:
    """The principle whose contrast pair one prompt gets: one draw by weight, seeded by (seed,
    prompt), so it does not depend on batch order or on the other prompts of the run.

    Raises:
        ConfigError: the constitution has no principle with a ``contrast`` pair.
    """
    pool = constitution.contrast_principles
    if not pool:
        raise ConfigError(
            f"constitution '{constitution.name}' has no principle with a contrast pair",
            file=constitution.path, field="stages.contrast",
        )  # fmt: skip
    rng = random.Random(int(content_hash(["contrast", seed, prompt_id])[:16], 16))
    return rng.choices(list(pool), weights=[p.weight for p in pool], k=1)[0]


def system_instruction(affix: str) -> str:
    """The system message that asks for an affix's kind of response (``system`` placement)."""
    kind = affix.strip()
    if kind.startswith("(") and kind.endswith(")"):
        kind = kind[1:-1].strip()
    return f"Reply to the user's last message. Your reply must be this kind of reply: {kind}."


def contrast_conversation(
    conversation: Conversation, principle: Principle, side: str, placement: str
) -> tuple[Conversation, str | None]:
    """The conversation a ``side`` response is generated from, and the system text to add.

    ``assistant`` placement returns the conversation with the opposite affix opening each
    earlier assistant turn and a final assistant message holding the side's affix (continued
    by the backend) and no system text; ``system`` placement returns the conversation
    unchanged and the instruction for a system message.
    """
    if principle.contrast is None:
        raise ConfigError(f"principle '{principle.id}' has no contrast pair", field="contrast")
    if side not in SIDES or placement not in PLACEMENTS:
        raise ValueError(f"side {side!r} / placement {placement!r}")
    pair = principle.contrast.to_dict()
    affix, opposite = pair[side], pair[SIDES[1 - SIDES.index(side)]]
    if placement == "system":
        return [dict(m) for m in conversation], system_instruction(affix)
    out = [
        {**m, "content": f"{opposite} {m['content']}"} if m.get("role") == "assistant" else dict(m)
        for m in conversation
    ]
    return [*out, {"role": "assistant", "content": affix}], None


def contrast_request(
    book: PromptBook,
    conversation: Conversation,
    principle: Principle,
    side: str,
    placement: str,
    system: str | None,
    params: SamplingParams,
) -> GenRequest:
    """The generation request of one side: :func:`contrast_conversation` through the
    ``respond`` template, the pipeline's ``system`` prompt first when it has one."""
    conv, instruction = contrast_conversation(conversation, principle, side, placement)
    joined = "\n\n".join(t for t in (system, instruction) if t) or None
    r = book.render("respond", conversation=conv, system=joined)
    return GenRequest(r.messages, params, r.template_hash)


def strip_affix(text: str, principle: Principle) -> str:
    """A response without an affix the model echoed at its start (either side's, with the
    colon of the paper's format)."""
    t = text.lstrip()
    if principle.contrast is not None:
        for affix in (principle.contrast.positive, principle.contrast.negative):
            if t.startswith(affix):
                t = t[len(affix) :].lstrip(" :\n\t")
                break
    return t.lstrip(":").strip()


def contrast_verdict(principle: Principle) -> Verdict:
    """The label of a contrast pair (x = positive, y = negative): x wins by construction.

    ``p_a_better`` is 1: the label does not come from a judgement with a confidence, and the
    export clips it to the largest margin. ``mode`` ``contrast`` marks it in every record.
    """
    return Verdict(
        "ok", "a", 1.0, 1.0, 1.0, True, 0, 0, None, mode="contrast",
        principle_ids=[principle.id],
    )  # fmt: skip


def filter_reason(
    verdict: Verdict | None, min_p: float, checked: dict[str, Any] | None
) -> str | None:
    """Why a filter drops a contrast pair, or None to keep it. A judge ``verdict`` (x =
    positive) drops it when P(positive better) < ``min_p``; a judge error keeps the
    construction's label (the filter knows nothing then). ``checked`` is what
    :func:`check_pair` found: drop when the rule check prefers the negative."""
    if checked is not None and checked["preferred"] == "negative":
        return "rule check prefers the negative response"
    p = verdict.p_a_better if verdict is not None and verdict.status == "ok" else None
    if p is not None and p < min_p:
        return f"judge prefers the negative response (p = {p:.3f} < {min_p})"
    return None


def check_pair(check: Check, positive: str, negative: str, label: str | None) -> dict[str, Any]:
    """A rule check on both responses: each one's score and which one it prefers (``positive``,
    ``negative``, or None when equal, not applicable or failed to run)."""
    rp, rn = run_check(check, positive, label), run_check(check, negative, label)
    preferred = None
    ran = not (rp.error or rn.error) and rp.score is not None and rn.score is not None
    if ran and rp.score != rn.score:
        preferred = "positive" if rp.score > rn.score else "negative"  # type: ignore[operator]
    return {"positive": rp.to_dict(), "negative": rn.to_dict(), "preferred": preferred}


@dataclass(frozen=True)
class ContrastRow:
    """One generated pair, for :func:`contrast_stats`."""

    principle_id: str
    positive: str
    negative: str
    checks: dict[str, Any] | None = None  # check_pair's result, when a rule check ran
    judge_p: float | None = None  # the filter judge's P(positive better), when it ran
    kept: bool = True


def contrast_stats(rows: Iterable[ContrastRow]) -> dict[str, Any]:
    """How far the positive and negative responses differ: refusal rate, length (words),
    identical pairs, rule-check pass rate and the judge's agreement where they ran, overall
    and per principle (:class:`ContrastTally` over ``rows``)."""
    tally = ContrastTally()
    for row in rows:
        tally.add(row)
    return tally.stats()


class ContrastTally:
    """The statistics of :func:`contrast_stats`, counted one row at a time: sums, not rows, so
    a run of any size. Means are exact sums divided at the end (as ``statistics.fmean``
    divides ``math.fsum``): the same figures, to the last bit, as means over every row."""

    def __init__(self) -> None:
        self.overall = _Block()
        self.by: dict[str, _Block] = {}

    def add(self, row: ContrastRow) -> None:
        self.overall.add(row)
        self.by.setdefault(row.principle_id, _Block()).add(row)

    def stats(self) -> dict[str, Any]:
        stats = self.overall.stats()
        stats["by_principle"] = {pid: b.stats() for pid, b in sorted(self.by.items())}
        return stats

    def to_dict(self) -> dict[str, Any]:
        """The counts as JSON (a wave's, kept in its ledger entry); :meth:`merge` adds them."""
        return {"overall": self.overall.to_dict(),
                "by": {pid: b.to_dict() for pid, b in sorted(self.by.items())}}  # fmt: skip

    def merge(self, counts: dict[str, Any]) -> None:
        """Add the counts of another tally (:meth:`to_dict`): the same as adding its rows."""
        self.overall.merge(counts["overall"])
        for pid, block in counts["by"].items():
            self.by.setdefault(pid, _Block()).merge(block)


class _Block:
    def __init__(self) -> None:
        self.pairs = self.kept = self.identical = 0
        self.refusals = dict.fromkeys(SIDES, 0)
        self.words = dict.fromkeys(SIDES, 0)
        self.checked = 0
        self.passed = {s: [0, 0] for s in SIDES}  # passed, checks that gave an answer
        self.prefers: dict[str, int] = dict.fromkeys(SIDES, 0)
        self.judged, self.p_sum, self.judge_pos, self.judge_neg = 0, Fraction(0), 0, 0

    _INTS = ("pairs", "kept", "identical", "checked", "judged", "judge_pos", "judge_neg")
    _BY_SIDE = ("refusals", "words", "prefers")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self._INTS + self._BY_SIDE}
        out["passed"] = {s: list(v) for s, v in self.passed.items()}
        out["p_sum"] = [self.p_sum.numerator, self.p_sum.denominator]  # exact
        return out

    def merge(self, d: dict[str, Any]) -> None:
        for k in self._INTS:
            setattr(self, k, getattr(self, k) + d[k])
        for k in self._BY_SIDE:
            mine = getattr(self, k)
            for side, v in d[k].items():
                mine[side] = mine.get(side, 0) + v
        for side, (k, m) in d["passed"].items():
            self.passed[side][0] += k
            self.passed[side][1] += m
        self.p_sum += Fraction(*d["p_sum"])

    def add(self, r: ContrastRow) -> None:
        self.pairs += 1
        self.kept += r.kept
        self.identical += r.positive.strip() == r.negative.strip()
        for s, text in zip(SIDES, (r.positive, r.negative), strict=True):
            self.refusals[s] += is_refusal(text)
            self.words[s] += len(text.split())
        if r.checks is not None:
            self.checked += 1
            for s in SIDES:
                if r.checks[s]["passed"] is not None:
                    self.passed[s][0] += bool(r.checks[s]["passed"])
                    self.passed[s][1] += 1
            if r.checks["preferred"] in self.prefers:
                self.prefers[r.checks["preferred"]] += 1
        if r.judge_p is not None:
            self.judged += 1
            self.p_sum += Fraction(r.judge_p)  # exact: its float is fsum's correctly rounded sum
            self.judge_pos += r.judge_p > 0.5
            self.judge_neg += r.judge_p < 0.5

    def stats(self) -> dict[str, Any]:
        n = self.pairs
        out: dict[str, Any] = {"pairs": n, "kept": self.kept, "identical": self.identical}
        for s in SIDES:
            out[s] = {
                "refusal_rate": float(self.refusals[s]) / n if n else None,
                "mean_words": float(self.words[s]) / n if n else None,
            }
        if self.checked:
            for s in SIDES:
                k, m = self.passed[s]
                out[s]["check_pass_rate"] = float(k) / m if m else None
            out["check_prefers"] = dict(self.prefers)
        if self.judged:
            out["judge"] = {
                "pairs": self.judged,
                "mean_p_positive": float(self.p_sum) / self.judged,
                "prefers_positive": self.judge_pos,
                "prefers_negative": self.judge_neg,
            }
        return out
