"""The AI judge's prior for the option labels themselves: estimated, then removed (calibration).

A multiple-choice judge carries a prior for the option letters whatever they stand for: the
embedded 135M judge nearly always answers with the letter shown first. Judging both orders
cancels that prior in the mean ``p_a_better``, but the tie rule (:func:`rlaif.stages.judge.decide`)
sees each order alone and throws such verdicts away. Pure functions, no model calls.

Model, per judgement in logprob mode: ``l = log P(A) - log P(B)`` (the log-odds of the option
shown first) is ``l1 = b + c`` in order 1 (x first) and ``l2 = b - c`` in order 2 (y first);
``b`` is the prior for the letter shown first, ``c`` the content's log-odds of x over y.

* ``pride`` (Zheng et al. 2023, arXiv 2309.03882): ``b_pair = (l1 + l2) / 2`` cancels the
  content; ``b`` is its mean over a sample of the run's own pairs. No labels, and no model
  call: the judge scores both orders of those pairs anyway.
* ``content_free`` (contextual calibration, Zhao et al. 2021, arXiv 2102.09690): ``l`` of
  requests whose two responses carry no content (``"N/A"``, ``""``, ``"[MASK]"``); both
  responses are the same text, so both orders are one request and ``l = b``; ``b`` is the mean.

The judge then uses ``p_calibrated = sigmoid(l - b)`` (``JudgeConfig.option_prior = b``) in
each order; the tie rule is unchanged. For estimation only, logits are clipped to
``+-LOGIT_CLIP`` (p within ``P_CLIP`` of 0 or 1): one order with P(B) = 0 does not make ``b``
infinite. The 95 % interval is the mean +- 1.96 standard errors (pairs taken as independent;
pairs of one prompt are not quite, so read it as a lower bound on the uncertainty).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlaif.backends.base import ChoiceScores, Conversation
from rlaif.calls.caller import ScoreRequest
from rlaif.constitution import Principle
from rlaif.errors import ConfigError
from rlaif.prompts import PromptBook
from rlaif.stages import judge as J
from rlaif.stages.scored import flip
from rlaif.store import content_hash

METHODS = ("none", "pride", "content_free")
CONTENT_FREE = ("N/A", "", "[MASK]")  # the content-free inputs of Zhao et al.
LOGIT_CLIP = math.log((1 - J.P_CLIP) / J.P_CLIP)  # 13.8155
Z95 = 1.959963984540054


@dataclass(frozen=True)
class OptionPrior:
    """An estimate of the judge's prior ``b`` for the option shown first (log-odds).

    Attributes:
        method: ``pride`` or ``content_free``.
        bias: ``b``, the mean of the sample's estimates; 0 when none was usable.
        n: usable estimates (pairs for pride, requests for content_free).
        stderr: standard error of ``bias`` (None below 2 estimates).
        ci95: ``bias +- 1.96 stderr`` (None below 2 estimates).
        first_rate: share of the sample's single-order answers (raw, as the model gave them)
            that pick the option shown first; None when none picks a side.
        errors: sample items left out (a failed call or unusable option scores).
    """

    method: str
    bias: float
    n: int
    stderr: float | None = None
    ci95: tuple[float, float] | None = None
    first_rate: float | None = None
    errors: int = 0

    @property
    def p_first(self) -> float:
        """The prior as a probability: P(first option) of a judge with no content to go on."""
        return 1 / (1 + math.exp(-self.bias))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ci95"] = list(self.ci95) if self.ci95 else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptionPrior:
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        kw["ci95"] = tuple(kw["ci95"]) if kw.get("ci95") else None
        return cls(**kw)

    def describe(self) -> str:
        """One line: ``pride: b = 2.310 [2.101, 2.519] (P(first) 0.910), n = 64``."""
        ci = f" [{self.ci95[0]:.3f}, {self.ci95[1]:.3f}]" if self.ci95 else ""
        errs = f", {self.errors} unusable" if self.errors else ""
        return (
            f"{self.method}: b = {self.bias:.3f}{ci} (P(first) {self.p_first:.3f}), "
            f"n = {self.n}{errs}"
        )


def check_settings(method: str, sample: int, mode: str, *, cli: bool = False) -> None:
    """The one-line errors of calibration settings: a pipeline's ``judge.calibrate`` and
    ``judge.calibration_sample``, or the audit's ``--calibrate`` / ``--calibration-sample``.

    Raises:
        ConfigError: naming the field.
    """
    name, size = ("--calibrate", "--calibration-sample") if cli else (
        "judge calibrate", "judge calibration_sample")  # fmt: skip
    where, count = ("calibrate", "calibration_sample") if cli else (
        "judge.calibrate", "judge.calibration_sample")  # fmt: skip
    if method not in METHODS:
        raise ConfigError(f"{name} must be one of {', '.join(METHODS)}, got {method!r}",
                          field=where)  # fmt: skip
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 1:
        raise ConfigError(f"{size} must be an integer >= 1, got {sample!r}", field=count)
    if method != "none" and mode != "logprob":
        raise ConfigError(
            f"{name} {method} needs mode logprob (reasoning letters are generated, not "
            f"scored), got mode {mode!r}",
            field=where,
        )


# -- log-odds ---------------------------------------------------------------------------------


def clip_logit(x: float) -> float:
    """``x`` within ``+-LOGIT_CLIP`` (infinities included)."""
    return max(-LOGIT_CLIP, min(LOGIT_CLIP, x))


def order_log_odds(
    scores: Mapping[str, float] | ChoiceScores, options: Sequence[str] = ("A", "B")
) -> float | None:
    """``log P(first) - log P(second)`` of one order, clipped; None for unusable scores (the
    judge's own rule: a missing option, NaN, +inf, or both -inf)."""
    lp = scores.logprobs if isinstance(scores, ChoiceScores) else scores
    try:
        J.p_first_option(lp, options)
    except J.VerdictError:
        return None
    return clip_logit(float(lp[options[0]]) - float(lp[options[1]]))


def _stored(order: J.OrderResult) -> dict[str, float]:
    """An order's option scores as stored: None marks a non-finite score, which in an ok
    order can only be -inf (NaN and +inf make the order an error)."""
    return {k: -math.inf if v is None else v for k, v in (order.logprobs or {}).items()}


def _scored(v: J.Verdict) -> bool:
    """Whether ``v`` is one logprob judgement with both orders' option scores kept."""
    return (
        v.status == "ok"
        and v.mode == "logprob"
        and not v.members
        and len(v.orders) == 2
        and all(o.logprobs is not None for o in v.orders)
    )


def verdict_log_odds(
    v: J.Verdict, options: Sequence[str] = ("A", "B")
) -> tuple[float | None, float | None] | None:
    """(l1, l2) of one logprob judgement from its stored scores; None for anything else
    (an ensemble, a rule or scored verdict, reasoning mode, an error)."""
    if not _scored(v):
        return None
    o1, o2 = v.orders
    return order_log_odds(_stored(o1), options), order_log_odds(_stored(o2), options)


def pair_log_odds(
    judgements: Sequence[tuple[float | None, float | None] | None],
) -> tuple[float, float] | None:
    """(l1, l2) of a pair judged under several principles: the mean per order over its usable
    judgements (clipped); None when none is usable."""
    ok = [(clip_logit(a), clip_logit(b)) for a, b in (x or (None, None) for x in judgements)
          if a is not None and b is not None]  # fmt: skip
    if not ok:
        return None
    return math.fsum(a for a, _ in ok) / len(ok), math.fsum(b for _, b in ok) / len(ok)


# -- estimators -------------------------------------------------------------------------------


def _estimate(method: str, values: list[float], picks: list[float], errors: int) -> OptionPrior:
    n = len(values)
    first = [x for x in picks if x != 0]
    first_rate = round(sum(x > 0 for x in first) / len(first), 6) if first else None
    if n == 0:
        return OptionPrior(method, 0.0, 0, first_rate=first_rate, errors=errors)
    mean = math.fsum(values) / n
    stderr = ci = None
    if n >= 2:
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1))
        stderr = round(sd / math.sqrt(n), 6)
        ci = (round(mean - Z95 * sd / math.sqrt(n), 6), round(mean + Z95 * sd / math.sqrt(n), 6))
    return OptionPrior(method, round(mean, 6), n, stderr, ci, first_rate, errors)


def pride(log_odds: Sequence[tuple[float | None, float | None] | None]) -> OptionPrior:
    """PriDe: ``b`` = mean of ``(l1 + l2) / 2`` over pairs, from each pair's (order 1,
    order 2) log-odds of the option shown first. A pair that is None or holds a None (failed
    or unusable) is counted in ``errors`` and left out."""
    ok = [(clip_logit(a), clip_logit(b)) for a, b in (x or (None, None) for x in log_odds)
          if a is not None and b is not None]  # fmt: skip
    values = [(a + b) / 2 for a, b in ok]
    return _estimate("pride", values, [x for pair in ok for x in pair], len(log_odds) - len(ok))


def content_free(log_odds: Sequence[float | None]) -> OptionPrior:
    """Contextual calibration: ``b`` = mean log-odds of the option shown first over
    content-free requests; None entries (failed or unusable) count in ``errors``."""
    values = [clip_logit(x) for x in log_odds if x is not None]
    return _estimate("content_free", values, values, len(log_odds) - len(values))


# -- requests and samples ---------------------------------------------------------------------


def sample(keys: Sequence[str], n: int, seed: int) -> list[int]:
    """Indices (ascending) of up to ``n`` of ``keys``: those whose hash of (seed, key) is
    smallest, so the draw depends on neither the keys' order nor on other keys' presence
    beyond their hashes (a resumed run draws the same sample)."""
    ranked = sorted(range(len(keys)), key=lambda i: (content_hash(["calibrate", seed, keys[i]]), i))
    return sorted(ranked[: max(0, n)])


def content_free_requests(
    book: PromptBook,
    items: Sequence[tuple[Conversation, Principle]],
    cfg: J.JudgeConfig,
    n: int,
    *,
    system: str | None = None,
    fillers: Sequence[str] = CONTENT_FREE,
) -> list[ScoreRequest]:
    """Up to ``n`` content-free judge requests: for each (conversation, principle) in turn,
    one per filler, shown as both responses (through :func:`rlaif.stages.judge.judge_requests`,
    the judge's own template; with identical responses order 2 is order 1, so one request).

    Raises:
        ConfigError: ``cfg`` is not in logprob mode.
    """
    if cfg.mode != "logprob":
        raise ConfigError("content-free calibration needs mode logprob", field="mode")
    out: list[ScoreRequest] = []
    for conversation, principle in items:
        for filler in fillers:
            if len(out) >= n:
                return out
            first, _ = J.judge_requests(book, conversation, filler, filler, principle, cfg,
                                        system=system)  # fmt: skip
            assert isinstance(first, ScoreRequest)
            out.append(first)
    return out


# -- applying a prior -------------------------------------------------------------------------


def calibrated_config(cfg: J.JudgeConfig, prior: OptionPrior | float | None) -> J.JudgeConfig:
    """``cfg`` removing ``prior`` (an estimate, a bias, or None: nothing)."""
    b = prior.bias if isinstance(prior, OptionPrior) else float(prior or 0.0)
    return dataclasses.replace(cfg, option_prior=b)


def rejudge(v: J.Verdict, cfg: J.JudgeConfig) -> J.Verdict:
    """``v`` judged again from its stored option scores under ``cfg``: with another option
    prior, or with none (``cfg.option_prior == 0``: the raw verdict of a calibrated judge).

    No model call. An ensemble is re-averaged from its rejudged members; a verdict without
    option scores (reasoning, rule, scored, an error) comes back as it is; a verdict turned
    around by label noise is turned around again.
    """
    if v.members:
        out = J.ensemble([rejudge(m, cfg) for m in v.members], cfg)
    elif _scored(v):
        o1, o2 = v.orders
        out = J.verdict_from_logprobs(
            _stored(o1),
            _stored(o2),
            cfg,
            principle_id=v.principle_ids[0] if v.principle_ids else None,
            model=v.models[0] if v.models else None,
        )
    else:
        return v
    return flip(out) if v.flipped else out


def calibrated(v: J.Verdict) -> bool:
    """Whether any judgement behind ``v`` used a calibrated probability."""
    return any(o.p_calibrated is not None for o in v.orders) or any(map(calibrated, v.members))
