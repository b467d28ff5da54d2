"""A budget cap on model usage: calls, tokens and dollars, for a whole run dir.

The budget covers everything a run dir has spent, over every invocation: it starts from the
usage already recorded for the run dir, then adds each new answer. Before each backend call
:class:`~rlaif.calls.caller.ModelCaller` asks :meth:`Budget.admit` how many of the batch's
requests still fit, counting each at its worst case (its prompt tokens plus
``max_new_tokens x n`` completion tokens), sends those, charges their real usage and asks again
for the rest; when not even the next request fits it raises :class:`BudgetExceeded` before
sending it. A cap is therefore never exceeded (as far as the backend's ``count_tokens`` is
right about prompts), every answered request is saved as usual, and a later run with a higher
cap goes on from there without redoing anything.

What counts: a request answered by a backend is one call, with the prompt and completion
tokens its completions report (``n`` completions of one prompt carry the prompt ``n`` times:
the local backends decode ``n`` rows, the OpenAI-compatible backend sends ``n`` requests). A
cache hit costs nothing, and a request that fails costs nothing (it returns no usage).

Where the total lives: a budgeted run keeps it in ``cache/usage.json`` next to the call cache,
with the cache's length at that moment; a later run adds the answers cached after that point
(by a run with no budget, or by one killed between the two writes). A run dir with no ledger
is counted from its cache alone (an identical request asked twice in one call is computed
and charged once, so cache and ledger agree). A run dir with more than one call cache (the
evaluation of a ``stages:`` pipeline keeps its own in ``eval/cache/``) counts them all
against the same caps; each cache keeps its own ledger.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.config.schema import BudgetConfig
from rlaif.errors import RlaifError
from rlaif.store.atomic import write_atomic
from rlaif.store.jsonl import JsonlReader

EXIT_BUDGET = 3  # `rlaif run` exit status when a budget cap stopped the run
LEDGER = "usage.json"  # next to the call cache

log = logging.getLogger(__name__)


@dataclass
class Usage:
    """Model usage: answered calls, prompt and completion tokens."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def cost(self, cfg: BudgetConfig) -> float:
        """Dollars at the configured prices (0 when none are set)."""
        return (
            self.prompt_tokens * cfg.price_per_1k_prompt_tokens
            + self.completion_tokens * cfg.price_per_1k_completion_tokens
        ) / 1000

    def describe(self, cfg: BudgetConfig) -> str:
        """``12 calls, 3,456 tokens (3,000 prompt + 456 completion)[, $0.0012]``."""
        text = (
            f"{self.calls:,} calls, {self.tokens:,} tokens "
            f"({self.prompt_tokens:,} prompt + {self.completion_tokens:,} completion)"
        )
        return text + (f", ${self.cost(cfg):.4f}" if cfg.priced else "")

    def to_dict(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


def usage_of_completions(completions: Sequence[Any]) -> Usage:
    """Usage of one answered generation request (its :class:`Completion` s, or their dicts)."""
    if not completions:
        return Usage(1)

    def get(c: Any, name: str) -> int:
        value = c.get(name, 0) if isinstance(c, dict) else getattr(c, name, 0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return Usage(
        1,
        sum(get(c, "prompt_tokens") for c in completions),
        sum(get(c, "completion_tokens") for c in completions),
    )


def usage_of_cached(value: Any) -> Usage | None:
    """Usage of one call-cache value: a list of completion dicts (generation) or a dict with
    ``prompt_tokens`` (choice scores); None for a value of another shape."""
    if isinstance(value, list) and all(isinstance(c, dict) for c in value):
        return usage_of_completions(value)
    if isinstance(value, dict) and "logprobs" in value:
        tokens = value.get("prompt_tokens", 0)
        return Usage(1, tokens if isinstance(tokens, int) else 0)
    return None


def usage_in_cache(path: Path, start: int = 0) -> Usage:
    """What the answers in a call-cache file cost (read-only; a torn tail is ignored).

    Args:
        path: the cache file.
        start: count only the entries from this byte offset on.
    """
    total = Usage()
    # Every line counts: a key is written twice only by two processes that each called the
    # model for it (one process skips keys it already holds).
    for offset, entry in JsonlReader(Path(path), tail="ignore"):
        if offset < start or not isinstance(entry, dict):
            continue
        used = usage_of_cached(entry.get("value"))
        if used is not None:
            total = total + used
    return total


def spent_in_run(cache_path: Path) -> Usage:
    """What a run dir has spent: its ledger plus the answers cached after the ledger was last
    written; the whole cache when there is no (readable) ledger. Reads only."""
    cache_path = Path(cache_path)
    ledger = cache_path.parent / LEDGER
    try:
        data = json.loads(ledger.read_text(encoding="utf-8"))
        used = Usage(
            **{k: int(data["usage"][k]) for k in ("calls", "prompt_tokens", "completion_tokens")}
        )
        end = int(data["cache_bytes"])
    except FileNotFoundError:
        return usage_in_cache(cache_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s); counting the call cache instead", ledger, exc)
        return usage_in_cache(cache_path)
    return used + usage_in_cache(cache_path, start=end)


class BudgetExceeded(RlaifError):
    """The next model call would take the run past a budget cap; nothing was lost."""

    def __init__(self, cap: str, limit: float, spent: Usage, cfg: BudgetConfig) -> None:
        self.cap = cap
        self.limit = limit
        self.spent = spent
        shown = f"${limit:g}" if cap == "max_cost_usd" else f"{limit:,}"
        super().__init__(
            f"budget cap budget.{cap} = {shown} reached: the next model call could exceed it "
            f"(spent in this run dir: {spent.describe(cfg)}); finished records are kept, "
            f"raise budget.{cap} and run again to resume"
        )


class Budget:
    """The running total of a run dir's model usage against its caps.

    Args:
        cfg: the caps and prices.
        spent: usage already recorded through ``cache_path`` before this invocation.
        cache_path: the run's call cache; its running total is kept next to it after each
            charge (see the module docs). None keeps it in memory only.
        elsewhere: usage of the run dir's other call caches (an evaluation has its own),
            counted against the caps but not written to this cache's ledger.
    """

    def __init__(
        self,
        cfg: BudgetConfig,
        spent: Usage | None = None,
        cache_path: Path | None = None,
        elsewhere: Usage | None = None,
    ) -> None:
        self.cfg = cfg
        self.own = spent or Usage()  # through this cache: what its ledger holds
        self.elsewhere = elsewhere or Usage()  # through the run dir's other call caches
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._blocked: tuple[str, float] | None = None

    @property
    def spent(self) -> Usage:
        """Everything the run dir has spent: through this cache and through the others."""
        return self.elsewhere + self.own

    @classmethod
    def for_run(
        cls, cfg: BudgetConfig, cache_path: Path, others: Sequence[Path] = ()
    ) -> Budget | None:
        """The budget of a run whose call cache is ``cache_path``; None when no cap is set.

        Args:
            cfg: the caps and prices.
            cache_path: the call cache this budget charges (its ledger is kept next to it).
            others: the run dir's other call caches (the data stages' and the evaluation's
                count against the same caps); read, never written.
        """
        if not cfg.active:
            return None
        elsewhere = sum((spent_in_run(p) for p in others), Usage())
        return cls(cfg, spent_in_run(cache_path), cache_path, elsewhere)

    @property
    def counts_tokens(self) -> bool:
        """Whether admitting a request needs its prompt length (a token or cost cap is set)."""
        return self.cfg.max_tokens is not None or self.cfg.max_cost_usd is not None

    def _over(self, usage: Usage) -> tuple[str, float] | None:
        c = self.cfg
        if c.max_calls is not None and usage.calls > c.max_calls:
            return "max_calls", c.max_calls
        if c.max_tokens is not None and usage.tokens > c.max_tokens:
            return "max_tokens", c.max_tokens
        # a relative tolerance, so float rounding of a sum never blocks a call that fits
        if c.max_cost_usd is not None and usage.cost(c) > c.max_cost_usd * (1 + 1e-9):
            return "max_cost_usd", c.max_cost_usd
        return None

    def admit(self, worst_cases: Sequence[tuple[int, int]]) -> int:
        """How many of the next requests fit, in order.

        Args:
            worst_cases: (prompt tokens, most completion tokens) per request.

        Returns:
            The length of the longest prefix whose worst case stays within every cap; when it
            is shorter than the input, :meth:`exceeded` says which cap stopped it.
        """
        total = self.spent
        for n, (prompt, completion) in enumerate(worst_cases):
            total = total + Usage(1, prompt, completion)
            over = self._over(total)
            if over is not None:
                self._blocked = over
                return n
        return len(worst_cases)

    def charge(self, usage: Usage) -> None:
        """Add the usage of answered requests (call it after their answers are cached)."""
        self.own = self.own + usage
        if self.cache_path is None:
            return
        cache_bytes = self.cache_path.stat().st_size if self.cache_path.exists() else 0
        ledger = self.cache_path.parent / LEDGER
        # Replaced whole, never torn. Were it lost, the next run would count the answers
        # cached since the previous ledger from the cache itself.
        write_atomic(ledger, json.dumps({"usage": self.own.to_dict(), "cache_bytes": cache_bytes}))

    def exceeded(self) -> BudgetExceeded:
        """The error for the cap that the last :meth:`admit` ran into."""
        cap, limit = self._blocked or ("max_calls", self.cfg.max_calls or 0)
        return BudgetExceeded(cap, limit, self.spent, self.cfg)
