"""Judges that score each response on its own instead of comparing two: a principle's rule
check, a user's Python function, a trained reward model.

Each gives both responses of a pair a score ``s`` and turns the two into P(x better):

* ``rule``: ``s`` is the fraction of the check's applicable parts the response passes
  (:func:`rlaif.constitution.checks.run_check`), and ``p = 0.5 + (s_x - s_y) / 2``: 1 when x
  passes and y fails, 0.5 (a tie) when both pass or both fail.
* ``python`` and ``reward_model``: ``p = sigmoid(scale * (s_x - s_y))``, the Bradley-Terry
  probability a reward model is trained to give.

A scored judge shows the judge no options, so it has no position bias: its verdict has
``p_order1 == p_order2 == p`` and ``n_orders == 0``, and goes through the same tie rule
(:func:`rlaif.stages.judge.decide`) as the AI judge's. Verdicts keep the two scores (and a
rule's failures) in ``Verdict.scores``; records, exports, audits and reports read them like
any other verdict.

Label noise (:func:`noisy`) turns a seeded fraction of verdicts around, for experiments on
what wrong labels cost: each pair is flipped or not by a hash of (seed, pair), so the same
pairs flip on every run and in every wave.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rlaif.constitution import Principle
from rlaif.constitution.checks import run_check
from rlaif.errors import ConfigError
from rlaif.stages.judge import JudgeConfig, Verdict, decide
from rlaif.store import content_hash

SCORED_KINDS = ("rule", "python", "reward_model")
JUDGE_KINDS = ("auto", "ai", *SCORED_KINDS)  # auto: rule for principles with check, else ai


def p_from_scores(sx: float, sy: float, kind: str, scale: float = 1.0) -> float:
    """P(x better) from the scores of x and y (see the module docstring)."""
    if kind == "rule":
        return min(1.0, max(0.0, 0.5 + (sx - sy) / 2))
    d = scale * (sx - sy)
    return 1 / (1 + math.exp(-d)) if d >= 0 else math.exp(d) / (1 + math.exp(d))


def scored_verdict(
    sx: float | None,
    sy: float | None,
    cfg: JudgeConfig,
    *,
    kind: str,
    scale: float = 1.0,
    principle_id: str | None = None,
    model: str | None = None,
    details: dict[str, Any] | None = None,
) -> Verdict:
    """The verdict of a scored judge from the two scores; a missing or non-finite score (a
    check that could not run, a function that failed) makes it an error, never a guess."""
    common: dict[str, Any] = {
        "mode": kind,
        "principle_ids": [principle_id] if principle_id else [],
        "models": [model] if model else [],
        "scores": {"x": sx, "y": sy, **(details or {})},
    }
    bad = [n for n, s in (("x", sx), ("y", sy)) if s is None or not math.isfinite(s)]
    if bad:
        why = (details or {}).get("error") or f"no score for {' and '.join(bad)}"
        common["scores"] = {k: v for k, v in common["scores"].items() if k not in bad}
        return Verdict("error", reason=f"{kind} judge: {why}", n_errors=1, **common)
    assert sx is not None and sy is not None
    p = p_from_scores(sx, sy, kind, scale)
    winner, reason, consistent = decide(p, p, cfg)
    return Verdict("ok", winner, p, p, p, consistent, 0, 0, reason, **common)


def rule_verdict(
    principle: Principle, x: str, y: str, label: str | None, cfg: JudgeConfig
) -> Verdict:
    """Judge (x, y) by ``principle.check``; a check that applies to neither response (a
    refusal rule for another prompt label) is a tie, since the rule prefers neither."""
    if principle.check is None:
        raise ConfigError(f"principle '{principle.id}' has no check", field="check")
    rx, ry = run_check(principle.check, x, label), run_check(principle.check, y, label)
    details: dict[str, Any] = {"failures_x": rx.failures, "failures_y": ry.failures}
    if rx.error or ry.error:
        details["error"] = rx.error or ry.error
        return scored_verdict(None, None, cfg, kind="rule", principle_id=principle.id,
                              details=details)  # fmt: skip
    sx = 1.0 if rx.score is None else rx.score  # nothing applied: nothing failed
    sy = 1.0 if ry.score is None else ry.score
    return scored_verdict(sx, sy, cfg, kind="rule", principle_id=principle.id, details=details)


def rule_reward(principles: Sequence[Principle], text: str, label: str | None) -> float | None:
    """A response's mean check score over ``principles`` that apply to it, in [0, 1]; None
    when none applies or a check errs (an online trainer then gives no reward)."""
    scores = []
    for p in principles:
        if p.check is None:
            continue
        r = run_check(p.check, text, label)
        if r.error:
            return None
        if r.score is not None:
            scores.append(r.score)
    return sum(scores) / len(scores) if scores else None


# -- label noise ------------------------------------------------------------------------------


def noise_flips(seed: int, key: str, fraction: float) -> bool:
    """Whether the pair ``key`` is one of the ``fraction`` whose label is turned around."""
    if fraction <= 0:
        return False
    u = int(hashlib.sha256(f"label-noise:{seed}:{key}".encode()).hexdigest()[:15], 16)
    return u / 16**15 < fraction


def flip(v: Verdict) -> Verdict:
    """``v`` turned around: x and y swap places in its probabilities and winner."""
    if v.status != "ok" or v.p_a_better is None:
        return v
    winner = {"a": "b", "b": "a"}.get(v.winner or "", v.winner)
    p1 = None if v.p_order1 is None else 1 - v.p_order1
    p2 = None if v.p_order2 is None else 1 - v.p_order2
    return replace(v, winner=winner, p_a_better=1 - v.p_a_better, p_order1=p1, p_order2=p2,
                   flipped=True)  # fmt: skip


def noisy(v: Verdict, seed: int, key: str, fraction: float) -> Verdict:
    """``v``, turned around when :func:`noise_flips` draws the pair."""
    return flip(v) if noise_flips(seed, key, fraction) else v


# -- a user's Python function -----------------------------------------------------------------


@dataclass(frozen=True)
class PythonScorer:
    """A user's scoring function and where it came from.

    The function is called as ``fn(prompts=[messages, ...], completions=[text, ...],
    labels=[label or None, ...])`` and returns one number per completion (None for "cannot
    score"); it should accept ``**kwargs``, so the same function also serves TRL, which passes
    more keyword arguments. ``source_hash`` (sha256 of its file) enters record ids and cache
    keys: editing the function re-judges.
    """

    spec: str
    fn: Callable[..., Sequence[float | None]]
    source_hash: str

    def provenance(self) -> dict[str, Any]:
        return {"function": self.spec, "source_hash": self.source_hash}

    def __call__(
        self, prompts: list[Any], completions: list[str], labels: list[str | None]
    ) -> list[float | None]:
        out = list(self.fn(prompts=prompts, completions=completions, labels=labels))
        if len(out) != len(completions):
            raise ConfigError(
                f"{self.spec} returned {len(out)} scores for {len(completions)} completions",
                field="function",
            )
        return [None if s is None else float(s) for s in out]


def load_function(spec: str, allow_code: bool, base_dir: str | Path | None = None) -> PythonScorer:
    """The function ``module:name`` (an importable module) or ``path/file.py:name`` (relative
    to ``base_dir``). Runs the user's code, so it needs ``allow_code``.

    Raises:
        ConfigError: not allowed, a bad spec, a module or name that does not exist.
    """
    if not allow_code:
        raise ConfigError(
            f"judge function '{spec}' runs your code: set allow_code: true to allow it",
            field="allow_code",
        )
    mod_part, sep, name = spec.rpartition(":")
    if not sep or not mod_part or not name.isidentifier():
        raise ConfigError(f"function must be 'module:name' or 'file.py:name', got {spec!r}",
                          field="function")  # fmt: skip
    try:
        if mod_part.endswith(".py"):
            path = Path(base_dir or ".") / mod_part
            mod_name = "rlaif_user_" + content_hash(str(path.resolve()))[:12]
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            if loader_spec is None or loader_spec.loader is None or not path.is_file():
                raise FileNotFoundError(str(path))
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_part)
    except Exception as exc:  # the user's module: any error is theirs to see, in one line
        raise ConfigError(f"cannot load {mod_part}: {exc!r}", field="function") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{mod_part} has no function {name!r}", field="function")
    source = getattr(module, "__file__", None)
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else "unknown"
    return PythonScorer(spec, fn, digest)
