"""RL-CAI pairwise AI judge: is response x or y better under a principle? Both orders, always.

Pure functions; the pipeline runner owns model calls, batching, caching and storage. A judgement
of the pair (x, y) under one principle asks the judge twice: order 1 shows (x, y) as (A, B),
order 2 shows (y, x). Each order gives ``p_first``, the probability that the option shown first
is better:

* ``mode="logprob"`` (default): one forward pass per order, no generation. The backend scores
  the option tokens; ``p_first = exp(lpA) / (exp(lpA) + exp(lpB))``, renormalized over the two
  options only (the rest of the vocabulary is ignored), computed stably for values like -1e9
  or -inf. Both -inf, NaN or +inf is an error, never a guess.
* ``mode="reasoning"``: the judge writes its reasoning and ends with ``Answer: A`` or
  ``Answer: B`` (see :func:`parse_answer`). The chosen option gets ``band[1]``, the other
  ``band[0]`` (the CAI paper clamps chain-of-thought labels to 40-60 %).

Then ``p1 = p_first(order 1)`` and ``p2 = 1 - p_first(order 2)`` both estimate P(x better), and
``p_a_better = (p1 + p2) / 2`` cancels position bias. A calibrated judge (``option_prior = b``,
estimated by :mod:`rlaif.stages.calibrate`) first removes its prior for the letter shown first
from each order: ``p_calibrated = sigmoid(lpA - lpB - b)``; the verdict then uses that (the
model's own ``p_first`` stays in the order). The tie rule (:func:`decide`), in order:

1. ``|p1 - p2| > tie_threshold`` (default 0.5) -> tie: the order moved the answer by more than
   half the probability scale. Two probabilities on the same side of 0.5 always differ by less
   than 0.5, so with the default this fires only when the orders point different ways and one
   of them is confident (0.98 vs 0.47); lower it for a stricter judge.
2. The orders pick different winners, each more than ``flip_margin`` (default 0.05) from 0.5
   -> tie: the judge follows the position, not the content. The margin keeps a near-indifferent
   order (0.48) from vetoing a clear one.
3. ``|p_a_better - 0.5| <= tie_margin`` (default 0: only an exact 0.5) -> tie.
4. Otherwise the winner is ``"a"`` (x) if ``p_a_better > 0.5``, else ``"b"`` (y).

Comparisons ignore differences below ``TOL = 1e-9`` (round-off of exp/log). Worked examples:
lp1 = {A: ln .8, B: ln .2}, lp2 = {A: ln .3, B: ln .7} -> p1 = .8, p2 = .7, p = .75, winner a.
P(A) = .9 in order 1 and .85 in order 2 -> p1 = .9, p2 = .15, |p1 - p2| = .75 > .5 -> tie.
p1 = .7, p2 = .4 -> gap .3 passes rule 1, but winners differ by .2 and .1 > .05 -> tie.
p1 = .7, p2 = .48 -> order 2 is within .05 of 0.5 -> no veto; p = .59, winner a.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from rlaif.backends.base import ChoiceScores, Conversation, SamplingParams, shared_prefix
from rlaif.calls.caller import GenRequest, ScoreRequest
from rlaif.config.schema import JudgeStageConfig
from rlaif.constitution import Constitution, Principle
from rlaif.errors import ConfigError
from rlaif.prompts import PromptBook
from rlaif.stages.answers import VerdictError, VerdictParseError, p_first_option, parse_answer
from rlaif.store.hashing import content_hash, plain_fields

MODES = ("logprob", "reasoning")
TEMPLATES = {"logprob": "judge_mc", "reasoning": "judge_cot"}
TOL = 1e-9
P_CLIP = 1e-6  # margins are logit(p) with p clipped here: |margin| <= 13.8


@dataclass(frozen=True)
class JudgeConfig:
    """How to judge a pair. Invalid values raise :class:`ConfigError` naming the field.

    Args:
        mode: ``"logprob"`` (score the option tokens) or ``"reasoning"`` (chain of thought).
        tie_threshold: tie when the two orders' P(x better) differ by more than this.
        flip_margin: tie when the orders pick different winners, both further than this from 0.5.
        tie_margin: tie when the combined probability is within this of 0.5.
        band: (loser, winner) probabilities of a reasoning verdict; symmetric around 0.5.
        principles_k: judge principles sampled per pair (the ensemble size).
        options: the two option labels shown to the judge.
        min_option_mass: logprob mode: error when the two options together get less probability
            than this (the judge was not answering with a letter); 0 disables the check.
        sampling: how reasoning replies are generated.
        option_prior: logprob mode: the judge's log-odds for the option shown first, whatever
            the content (:mod:`rlaif.stages.calibrate`), removed from every order before the
            tie rule; 0 (the default) removes nothing and leaves :meth:`to_dict` as it was.
    """

    mode: str = "logprob"
    tie_threshold: float = 0.5
    flip_margin: float = 0.05
    tie_margin: float = 0.0
    band: tuple[float, float] = (0.4, 0.6)
    principles_k: int = 1
    options: tuple[str, str] = ("A", "B")
    min_option_mass: float = 0.0
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=512))
    option_prior: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "band", tuple(self.band))
        object.__setattr__(self, "options", tuple(self.options))
        lo, hi = (*self.band, math.nan, math.nan)[:2]
        opts = self.options
        band_ok = len(self.band) == 2 and 0 <= lo < 0.5 < hi <= 1 and abs(lo + hi - 1) < TOL
        labels_ok = len(opts) == 2 and opts[0] != opts[1]
        labels_ok &= all(isinstance(o, str) and o.strip() == o != "" for o in opts)
        b = self.option_prior
        prior_ok = isinstance(b, (int, float)) and math.isfinite(b)
        prior_ok = prior_ok and (self.mode == "logprob" or b == 0)
        checks = [
            ("mode", self.mode in MODES, f"must be one of {', '.join(MODES)}"),
            ("tie_threshold", 0 <= self.tie_threshold <= 1, "must be in [0, 1]"),
            ("flip_margin", 0 <= self.flip_margin < 0.5, "must be in [0, 0.5)"),
            ("tie_margin", 0 <= self.tie_margin < 0.5, "must be in [0, 0.5)"),
            ("min_option_mass", 0 <= self.min_option_mass <= 1, "must be in [0, 1]"),
            ("principles_k", self.principles_k >= 1, "must be >= 1"),
            ("band", band_ok, "must be (lo, hi), 0 <= lo < 0.5 < hi <= 1, lo + hi == 1"),
            ("options", labels_ok, "must be two distinct non-empty labels without outer spaces"),
            ("option_prior", prior_ok, "must be a finite log-odds, and 0 in reasoning mode"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"judge {name} {why}, got {getattr(self, name)!r}", field=name)

    def to_dict(self) -> dict[str, Any]:
        return plain_fields(self._dict)  # a copy: every judge record's id hashes one

    @cached_property
    def _dict(self) -> dict[str, Any]:  # built once: the config is frozen
        d = plain_fields(self)
        d.update(band=list(self.band), options=list(self.options), sampling=self.sampling.to_dict())
        if not self.option_prior:  # an uncalibrated judge keeps the ids of its records
            del d["option_prior"]
        return d


def judge_config(stage: JudgeStageConfig) -> JudgeConfig:
    """The judge settings of a pipeline's ``stages.judge`` section.

    Raises:
        ConfigError: a bad value, naming the field.
    """
    return JudgeConfig(
        mode=stage.mode,
        tie_threshold=stage.tie_threshold,
        flip_margin=stage.flip_margin,
        band=tuple(stage.band),
        principles_k=stage.principles_k,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=stage.max_new_tokens),
    )


@dataclass
class OrderResult:
    """One order of one judgement. ``p_first`` is P(the option shown first is better), as the
    model gave it; ``p_calibrated`` the same with the judge's option prior removed (None when
    the judge is not calibrated). ``choice`` is the model's own pick."""

    order: int  # 1: (x, y) shown as (A, B); 2: (y, x)
    p_first: float | None = None
    choice: str | None = None  # the preferred label; None at exactly 0.5 or on error
    logprobs: dict[str, float | None] | None = None  # None marks a non-finite score (no JSON inf)
    log_mass: float | None = None  # log(P(A) + P(B)) as scored, before renormalizing
    raw_text: str | None = None
    error: str | None = None
    p_calibrated: float | None = None

    @property
    def p_used(self) -> float | None:
        """The P(first) a verdict is built from: calibrated when the judge is."""
        return self.p_first if self.p_calibrated is None else self.p_calibrated


@dataclass
class Verdict:
    """P(x better than y) for one pair, from both orders (or an ensemble of such verdicts).

    ``winner`` is ``"a"`` (x, the pair's first response), ``"b"`` (y), ``"tie"``, or None when
    ``status == "error"``; ``reason`` says why a tie or an error. ``first_position_preferred``
    counts the orders (of ``n_orders``) where the option shown first won, for audits (all on
    the calibrated probabilities of a calibrated judge; its orders keep the raw ones). ``mode``
    is the AI judge's mode, or the kind of a scored judge (``rule``, ``python``,
    ``reward_model``), which shows no options and so has ``n_orders == 0``.
    """

    status: str  # "ok" | "error"
    winner: str | None = None
    p_a_better: float | None = None
    p_order1: float | None = None
    p_order2: float | None = None
    position_consistent: bool | None = None
    first_position_preferred: int = 0
    n_orders: int = 0
    reason: str | None = None
    mode: str = "logprob"
    principle_ids: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    orders: list[OrderResult] = field(default_factory=list)
    members: list[Verdict] = field(default_factory=list)  # an ensemble's judgements
    n_errors: int = 0  # failed judgements within (1 for a failed single judgement)
    # a scored judge (rule, python, reward_model: :mod:`rlaif.stages.scored`): the score of
    # each response and what a rule check found
    scores: dict[str, Any] | None = None
    flipped: bool = False  # label noise: the verdict was turned around on purpose

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; never NaN or infinity (the store rejects them). The same dict as
        ``dataclasses.asdict``, written out: every judged pair stores one."""
        d = _fields_of(self, _VERDICT_FIELDS)
        d["principle_ids"] = plain_fields(self.principle_ids)
        d["models"] = plain_fields(self.models)
        d["orders"] = [_order_dict(o) for o in self.orders]
        d["members"] = [m.to_dict() for m in self.members]
        if self.scores is not None:
            d["scores"] = plain_fields(self.scores)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        kw = dict(d)
        kw["orders"] = [OrderResult(**o) for o in kw.get("orders", [])]
        kw["members"] = [cls.from_dict(m) for m in kw.get("members", [])]
        return cls(**kw)


_VERDICT_FIELDS = tuple(f.name for f in fields(Verdict))
_ORDER_FIELDS = tuple(f.name for f in fields(OrderResult))


def _fields_of(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """``{field: value}`` in field order: a copy of the instance dict when it holds just the
    fields in order (as ``__init__`` leaves it), else field by field."""
    d = obj.__dict__.copy()
    return d if tuple(d) == names else {name: getattr(obj, name) for name in names}


def _order_dict(o: OrderResult) -> dict[str, Any]:
    d = o.__dict__.copy()  # _fields_of, inlined: four of these per judged pair
    if tuple(d) != _ORDER_FIELDS:
        d = {name: getattr(o, name) for name in _ORDER_FIELDS}
    lp = d["logprobs"]
    if lp is not None:
        d["logprobs"] = plain_fields(lp)
    return d


# -- requests ---------------------------------------------------------------------------------


def judge_principles(
    constitution: Constitution, k: int, seed: int, pair_id: str, kind: str = "auto"
) -> list[Principle]:
    """``k`` judge principles for a pair, by weight and with replacement, seeded by (seed, pair)
    so the draw does not depend on batch order or on the other pairs of the run.

    ``kind`` says which principles can judge: ``ai`` those with a ``judge`` question, ``rule``
    those with a ``check``, ``auto`` both (a principle with a check is judged by its rule).

    Raises:
        ConfigError: the constitution has no principle of that kind.
    """
    rng = random.Random(int(content_hash([seed, pair_id])[:16], 16))
    if kind == "auto":
        return constitution.sample_principles(k, rng, kind="judge")
    pool = [p for p in constitution.principles if judged_by(p, kind)]
    if not pool:
        what = "a judge question" if kind == "ai" else "a check"
        raise ConfigError(
            f"constitution '{constitution.name}' has no principle with {what} "
            f"for a {kind} judge", file=constitution.path, field="judge.kind",
        )  # fmt: skip
    return rng.choices(pool, weights=[p.weight for p in pool], k=k)


def judged_by(principle: Principle, kind: str) -> bool:
    """Whether a ``kind`` judge (``auto``, ``ai``, ``rule``) judges with ``principle``."""
    has_check = getattr(principle, "check", None) is not None
    if kind == "rule":
        return has_check
    if kind == "ai":
        return principle.judge is not None
    return has_check or principle.judge is not None


def rule_judged(principle: Principle, kind: str) -> bool:
    """Whether ``principle`` is judged by its check (not by the AI judge) under ``kind``."""
    return kind == "rule" or (kind == "auto" and getattr(principle, "check", None) is not None)


def judge_requests(
    book: PromptBook,
    conversation: Conversation,
    response_a: str,
    response_b: str,
    principle: Principle,
    cfg: JudgeConfig,
    *,
    system: str | None = None,
) -> tuple[ScoreRequest, ScoreRequest] | tuple[GenRequest, GenRequest]:
    """The two requests judging (x = ``response_a``, y = ``response_b``): order 1, order 2.

    Logprob mode gives :class:`ScoreRequest` s for ``backend.score_choices(messages, choices)``;
    reasoning mode gives :class:`GenRequest` s for generation with ``cfg.sampling``.
    """
    pair = (response_a, response_b)
    return judge_requests_many(book, conversation, [pair], principle, cfg, system=system)[0]


def judge_requests_many(
    book: PromptBook,
    conversation: Conversation,
    pairs: Sequence[tuple[str, str]],
    principle: Principle,
    cfg: JudgeConfig,
    *,
    system: str | None = None,
) -> list[tuple[ScoreRequest, ScoreRequest] | tuple[GenRequest, GenRequest]]:
    """:func:`judge_requests` for each ``(x, y)`` of ``pairs`` after the same conversation,
    under the same principle: the template renders once for all of them where it can."""
    ctx = {"conversation": conversation, "principle": principle.to_dict(), "system": system}
    ctx["options"] = list(cfg.options)
    fills = [{"response_a": a, "response_b": b} for x, y in pairs for a, b in ((x, y), (y, x))]
    renders = book.render_many(TEMPLATES[cfg.mode], fills, **ctx)
    out: list = []
    for r1, r2 in zip(renders[::2], renders[1::2], strict=True):
        if cfg.mode == "logprob":
            # Both orders start with the same conversation; a backend that reuses prefixes
            # computes it once per pair (and once for every principle it is judged under).
            prefix = shared_prefix(r1.messages, r2.messages)
            out.append(tuple(ScoreRequest(r.messages, cfg.options, r.template_hash, prefix)
                             for r in (r1, r2)))  # fmt: skip
        else:
            out.append(tuple(GenRequest(r.messages, cfg.sampling, r.template_hash)
                             for r in (r1, r2)))  # fmt: skip
    return out


# -- one order ----------------------------------------------------------------------------------


def _choice(p: float, options: Sequence[str]) -> str | None:
    return options[0] if p > 0.5 + TOL else options[1] if p < 0.5 - TOL else None


def _finite_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _order_from_logprobs(order: int, scores: Any, cfg: JudgeConfig) -> OrderResult:
    lp = scores.logprobs if isinstance(scores, ChoiceScores) else scores
    if type(lp) is not dict and not isinstance(lp, Mapping):
        return OrderResult(order, error=f"option scores are {type(lp).__name__}, not a mapping")
    shown = {  # a finite float as it is (x - x is 0.0 only for finite x)
        str(k): v if type(v) is float and v - v == 0.0 else _finite_or_none(v)
        for k, v in lp.items()
    }
    try:
        p, log_mass = p_first_option(lp, cfg.options)
    except VerdictError as exc:
        return OrderResult(order, logprobs=shown, error=exc.message)
    if cfg.min_option_mass > 0 and log_mass < math.log(cfg.min_option_mass):
        why = f"options got probability {math.exp(log_mass):.3g} < min_option_mass"
        return OrderResult(order, logprobs=shown, log_mass=log_mass, error=why)
    calibrated = None
    if cfg.option_prior:  # sigmoid(lpA - lpB - b), as stably as the raw p
        first, second = cfg.options[:2]
        shifted = {first: float(lp[first]) - cfg.option_prior, second: lp[second]}
        calibrated = p_first_option(shifted, cfg.options)[0]
    return OrderResult(order, p, _choice(p, cfg.options), shown, log_mass, p_calibrated=calibrated)


def _order_from_text(order: int, text: str, cfg: JudgeConfig) -> OrderResult:
    try:
        label = parse_answer(text, cfg.options)
    except VerdictParseError as exc:
        return OrderResult(order, raw_text=str(text), error=exc.message)
    p = cfg.band[1] if label == cfg.options[0] else cfg.band[0]
    return OrderResult(order, p, label, raw_text=text)


# -- combining ----------------------------------------------------------------------------------


def decide(p1: float, p2: float, cfg: JudgeConfig) -> tuple[str, str | None, bool]:
    """Winner (``"a"``/``"b"``/``"tie"``), tie reason and position consistency of P(x better)
    from order 1 (``p1``) and order 2 (``p2``); the rule is in the module docstring."""
    side1, side2 = _choice(p1, "ab"), _choice(p2, "ab")
    consistent = side1 is not None and side1 == side2
    p, gap = (p1 + p2) / 2, abs(p1 - p2)
    if gap > cfg.tie_threshold + TOL:
        return "tie", f"orders disagree: |p1 - p2| = {gap:.4f} > {cfg.tie_threshold}", consistent
    if side1 != side2 and min(abs(p1 - 0.5), abs(p2 - 0.5)) > cfg.flip_margin + TOL:
        why = f"orders pick different winners (p1 = {p1:.4f}, p2 = {p2:.4f})"
        return "tie", why, consistent
    if abs(p - 0.5) <= cfg.tie_margin + TOL:
        return "tie", f"combined probability {p:.4f} within {cfg.tie_margin} of 0.5", consistent
    return ("a" if p > 0.5 else "b"), None, consistent


def _verdict(
    orders: list[OrderResult], cfg: JudgeConfig, principle_id: str | None, model: str | None
) -> Verdict:
    ids, models = [principle_id] if principle_id else [], [model] if model else []
    failed = [f"order {o.order}: {o.error}" for o in orders if o.error is not None]
    if failed:
        return Verdict("error", reason="; ".join(failed), n_errors=1, mode=cfg.mode,
                       principle_ids=ids, models=models, orders=orders)  # fmt: skip
    o1, o2 = orders
    u1, u2 = o1.p_used, o2.p_used
    assert u1 is not None and u2 is not None
    p1, p2 = u1, 1 - u2
    winner, reason, consistent = decide(p1, p2, cfg)
    first = int(u1 > 0.5 + TOL) + int(u2 > 0.5 + TOL)  # orders the first shown won
    return Verdict("ok", winner, (p1 + p2) / 2, p1, p2, consistent, first, 2, reason,
                   mode=cfg.mode, principle_ids=ids, models=models, orders=orders)  # fmt: skip


def verdict_from_logprobs(
    lp1: Mapping[str, float] | ChoiceScores,
    lp2: Mapping[str, float] | ChoiceScores,
    cfg: JudgeConfig,
    *,
    principle_id: str | None = None,
    model: str | None = None,
) -> Verdict:
    """Verdict from the option scores of order 1 and order 2 (logprob mode).

    An unusable score in either order makes the verdict an ``error`` naming the order.
    """
    orders = [_order_from_logprobs(i, lp, cfg) for i, lp in ((1, lp1), (2, lp2))]
    return _verdict(orders, cfg, principle_id, model)


def verdict_from_texts(
    t1: str, t2: str, cfg: JudgeConfig, *, principle_id: str | None = None, model: str | None = None
) -> Verdict:
    """Verdict from the reasoning replies of order 1 and order 2 (reasoning mode).

    Each parsed answer gives ``band[1]`` to the label it chose and ``band[0]`` to the other;
    an unparseable reply makes the verdict an ``error`` that keeps both raw texts.
    """
    orders = [_order_from_text(i, t, cfg) for i, t in ((1, t1), (2, t2))]
    return _verdict(orders, cfg, principle_id, model)


def ensemble(verdicts: Sequence[Verdict], cfg: JudgeConfig) -> Verdict:
    """One verdict from several (k sampled principles and/or several judge models).

    Error verdicts are left out of the means and counted in ``n_errors``; if all failed, the
    result is an error. Ties are kept in: their probabilities near 0.5 are evidence too, and
    dropping them would favour confident, possibly position-biased judgements. The means of
    ``p_order1`` and ``p_order2`` go through the same tie rule as a single judgement, so
    ``p_a_better`` is the mean of the members' ``p_a_better``.
    """
    if not verdicts:
        raise ValueError("ensemble() needs at least one verdict")
    ok = [v for v in verdicts if v.status == "ok"]
    common: dict[str, Any] = {  # lists, not generators, in the sums: one per judged pair
        "mode": cfg.mode,
        "principle_ids": [p for v in verdicts for p in v.principle_ids],
        "models": list(dict.fromkeys([m for v in verdicts for m in v.models])),
        "members": list(verdicts),
        "n_errors": sum([v.n_errors for v in verdicts]),
    }
    if not ok:
        return Verdict("error", reason=f"all {len(verdicts)} judgements failed", **common)
    p1 = sum([v.p_order1 for v in ok]) / len(ok)  # type: ignore[misc]
    p2 = sum([v.p_order2 for v in ok]) / len(ok)  # type: ignore[misc]
    winner, reason, consistent = decide(p1, p2, cfg)
    first = sum([v.first_position_preferred for v in ok])
    n_orders = sum([v.n_orders for v in ok])
    return Verdict(
        "ok", winner, (p1 + p2) / 2, p1, p2, consistent, first, n_orders, reason, **common
    )
