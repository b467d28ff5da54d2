"""From judged pairs to training pairs: which sampled responses to compare, which response
of a verdict is chosen, and the reward margin of its soft label.

Pure functions over judge verdicts (:class:`~rlaif.stages.judge.Verdict`); the judge itself
(both orders, the tie rule, ensembles) is :mod:`rlaif.stages.judge`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rlaif.backends.base import Conversation
from rlaif.errors import ConfigError
from rlaif.stages.judge import P_CLIP, TOL, Verdict


def rank_by_win_rate(n: int, verdicts_by_pair: Mapping[tuple[int, int], Verdict]) -> list[int]:
    """Response indices best first, by round-robin win rate (win 1, tie 0.5, loss 0).

    ``verdicts_by_pair[(i, j)]`` judged x = response i against y = response j. Error verdicts
    do not count; a response with no usable verdict is left out (it cannot be best or worst).
    Equal win rates are broken by the mean P(win), then by the lower index.
    """
    games: dict[int, list[tuple[float, float]]] = {}  # index -> [(score, P(win))]
    for (i, j), v in verdicts_by_pair.items():
        if v.status != "ok" or v.p_a_better is None or i == j or not (0 <= i < n and 0 <= j < n):
            continue
        score = {"a": 1.0, "b": 0.0}.get(v.winner or "", 0.5)
        games.setdefault(i, []).append((score, v.p_a_better))
        games.setdefault(j, []).append((1 - score, 1 - v.p_a_better))

    def key(i: int) -> tuple[float, float, int]:
        g = games[i]
        return (-sum(s for s, _ in g) / len(g), -sum(p for _, p in g) / len(g), i)

    return sorted(games, key=key)


def candidate_pairs(
    responses: Sequence[str],
    strategy: str = "all",
    verdicts_by_pair: Mapping[tuple[int, int], Verdict] | None = None,
) -> tuple[list[tuple[int, int]], list[dict[str, Any]]]:
    """Pairs (i, j), i < j, of sampled responses to judge, and the skipped ones with reasons.

    ``"all"``: every unordered pair whose texts differ after ``strip()``, each distinct pair of
    texts once. ``"best_vs_worst"``: the best and worst of :func:`rank_by_win_rate` over an
    all-pairs round robin: judge the ``"all"`` pairs first, then call again with their verdicts
    (keyed by those pairs). The verdict for the returned pair is already among them.
    """
    if strategy not in ("all", "best_vs_worst"):
        raise ConfigError(f"unknown pair strategy {strategy!r}", field="strategy")
    texts = [r.strip() for r in responses]
    pairs: list[tuple[int, int]] = []
    skipped: list[dict[str, Any]] = []
    seen: dict[frozenset[str], tuple[int, int]] = {}
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            key = frozenset((texts[i], texts[j]))
            if texts[i] == texts[j]:
                skipped.append({"pair": [i, j], "reason": "identical responses"})
            elif key in seen:
                skipped.append({"pair": [i, j], "reason": f"same texts as pair {list(seen[key])}"})
            else:
                seen[key] = (i, j)
                pairs.append((i, j))
    if strategy == "all":
        return pairs, skipped
    if verdicts_by_pair is None:
        raise ValueError("best_vs_worst needs the round-robin verdicts_by_pair")
    ranking = rank_by_win_rate(len(responses), verdicts_by_pair)
    if len(ranking) < 2:
        return [], [{"pair": ranking, "reason": "fewer than two judged responses"}]
    best, worst = ranking[0], ranking[-1]
    if texts[best] == texts[worst]:
        return [], [{"pair": sorted([best, worst]), "reason": "identical responses"}]
    return [(min(best, worst), max(best, worst))], []


def margin_from_p(p_chosen: float) -> float:
    """TRL reward margin for a pair the judge prefers with probability ``p_chosen``.

    TRL's RewardTrainer minimises ``-logsigmoid(r_chosen - r_rejected - margin)``: the margin
    is a reward gap, on the logit scale of the Bradley-Terry model ``P = sigmoid(r_c - r_r)``.
    The gap that model needs to reproduce the judge's soft label is ``logit(p_chosen)``:
    0.75 -> ln 3 = 1.10; a reasoning verdict at 0.6 -> ln 1.5 = 0.41; near 0.5 -> near 0.
    ``p`` is clipped to ``[P_CLIP, 1 - P_CLIP]`` so a certain judge gives 13.8, not infinity.
    """
    p = min(max(p_chosen, P_CLIP), 1 - P_CLIP)
    return math.log(p / (1 - p))


def preference_row(
    conversation: Conversation, x: str, y: str, verdict: Verdict
) -> tuple[dict[str, Any] | None, str | None]:
    """A TRL explicit-prompt conversational preference row from a verdict on (x, y).

    Returns ``(row, None)`` with keys ``prompt`` (the messages), ``chosen`` and ``rejected``
    (one assistant message each) and ``margin`` (:func:`margin_from_p`, always > 0), or
    ``(None, reason)`` for a tie, a judge error or identical texts: never chosen == rejected.
    """
    if x.strip() == y.strip():
        return None, "identical responses"
    if verdict.status != "ok" or verdict.p_a_better is None:
        return None, f"judge error: {verdict.reason}"
    if verdict.winner not in ("a", "b"):
        return None, f"tie: {verdict.reason}"
    a_wins = verdict.winner == "a"
    chosen, rejected = (x, y) if a_wins else (y, x)
    p = verdict.p_a_better if a_wins else 1 - verdict.p_a_better
    row = {
        "prompt": [dict(m) for m in conversation],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "margin": margin_from_p(p),
    }
    return row, None


def keep_cai_sl_pair(verdict: Verdict, min_p: float = 0.5) -> tuple[bool, str | None]:
    """Whether a CAI-SL revision beats its initial response, judged with x = the revision.

    Kept only when the judge prefers the revision (winner ``"a"``) with
    ``p_a_better >= min_p``; a tie, an error or a preferred initial response drops it.
    """
    if verdict.status != "ok" or verdict.p_a_better is None:
        return False, f"judge error: {verdict.reason}"
    if verdict.winner == "tie":
        return False, f"tie: {verdict.reason}"
    if verdict.winner != "a":
        return False, f"judge prefers the initial response (p = {verdict.p_a_better:.4f})"
    if verdict.p_a_better < min_p - TOL:
        return False, f"p(revision better) = {verdict.p_a_better:.4f} < min_p {min_p}"
    return True, None
