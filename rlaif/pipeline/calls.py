"""Every model call of a run goes through :class:`ModelCaller`.

It answers identical calls from the cache, sends the rest to the backend in full batches
sorted by prompt length, and isolates a bad request: when a batch raises, it is split in
halves until the failing request stands alone, which is returned as an error while the rest
go on. A :class:`~rlaif.errors.ModelError` (the backend itself is gone) is never isolated:
it stops the run, and a resume continues from the last saved batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlaif.backends.base import Backend, ChoiceScores, Completion, Conversation, SamplingParams
from rlaif.errors import BackendError, ModelError, RlaifError
from rlaif.store import CallCache, cache_key

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    """One generation request: rendered messages, how to sample, and the template behind them."""

    messages: Conversation
    params: SamplingParams
    template_hash: str | None = None


@dataclass
class ScoreRequest:
    """Score ``choices`` as the assistant's reply to ``messages`` (no generation)."""

    messages: Conversation
    choices: tuple[str, ...]
    template_hash: str | None = None


@dataclass
class GenResult:
    """Completions for a generation request, or the reason it failed."""

    completions: list[Completion] = field(default_factory=list)
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ScoreResult:
    """Log-probabilities for a score request, or the reason it failed."""

    scores: ChoiceScores | None = None
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class CallStats:
    model_calls: int = 0  # backend.generate / score_choices invocations
    requests: int = 0  # requests sent to the backend
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class ModelCaller:
    """Cached, batched, failure-isolating access to a backend.

    Args:
        backend_factory: makes the backend on first need, so a run whose calls are all cached
            never loads a model.
        model: model id for cache keys; revision: its revision (resolved without loading).
        cache: the run's call cache.
        batch_size: requests per backend call.
    """

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        model: str,
        revision: str | None,
        cache: CallCache,
        batch_size: int = 16,
    ) -> None:
        self._factory = backend_factory
        self._backend: Backend | None = None
        self.model = model
        self.revision = revision
        self.cache = cache
        self.batch_size = batch_size
        self.stats = CallStats()

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            # A backend that cannot start (bad options, missing package) is one problem for
            # the whole run, not an error for each request that happened to load it.
            try:
                self._backend = self._factory()
            except RlaifError:
                raise
            except Exception as exc:
                msg = " ".join(str(exc).split())[:300]
                raise ModelError(
                    f"cannot start the backend for model '{self.model}': "
                    f"{type(exc).__name__}: {msg}",
                    field="model",
                ) from exc
        return self._backend

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def key(self, req: GenRequest | ScoreRequest) -> str:
        if isinstance(req, ScoreRequest):
            kind, params = "score_choices", {"choices": list(req.choices)}
        else:
            kind, params = "generate", req.params.to_dict()
        return cache_key(
            model=self.model,
            revision=self.revision,
            messages=req.messages,
            params=params,
            template_hash=req.template_hash,
            kind=kind,
        )

    def generate(
        self,
        requests: Sequence[GenRequest],
        on_batch: Callable[[list[int], list[GenResult]], None] | None = None,
    ) -> list[GenResult]:
        """Answer every generation request, from the cache where possible.

        Args:
            requests: results come back in the same order.
            on_batch: called after each backend batch with the request indices and results,
                once their cache entries are durable (the runner saves records there).
        """
        return self._run(
            requests,
            on_batch,
            self._backend_generate,
            lambda r: repr(sorted(r.params.to_dict().items())),
            lambda r: [c.__dict__ for c in r.completions],
            lambda v: GenResult([Completion(**c) for c in v], cached=True),
            lambda e: GenResult(error=e),
        )

    def score(
        self,
        requests: Sequence[ScoreRequest],
        on_batch: Callable[[list[int], list[ScoreResult]], None] | None = None,
    ) -> list[ScoreResult]:
        """Answer every scoring request (log-probabilities of fixed choices)."""
        return self._run(
            requests,
            on_batch,
            self._backend_score,
            lambda r: repr(r.choices),
            lambda r: {
                "logprobs": _finite(r.scores.logprobs),
                "prompt_tokens": r.scores.prompt_tokens,
            },
            lambda v: ScoreResult(
                ChoiceScores(
                    {k: (float("-inf") if x is None else x) for k, x in v["logprobs"].items()},
                    v.get("prompt_tokens", 0),
                ),
                cached=True,
            ),
            lambda e: ScoreResult(error=e),
        )

    def _run(self, requests, on_batch, call, group_of, encode, decode, fail) -> list:
        results: list[Any] = [None] * len(requests)
        keys = [self.key(r) for r in requests]
        todo: list[int] = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if hit is not None:
                results[i] = decode(hit)
                self.stats.cache_hits += 1
            else:
                todo.append(i)
        # One backend call per group of identical params; longest prompts first cut padding
        # waste and surface context-overflow errors early.
        groups: dict[str, list[int]] = {}
        for i in todo:
            groups.setdefault(group_of(requests[i]), []).append(i)
        for idxs in groups.values():
            idxs.sort(key=lambda i: -sum(len(m["content"]) for m in requests[i].messages))
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                self.backend  # noqa: B018 - start it outside the isolation below
                out = self._isolated(call, [requests[i] for i in chunk], fail)
                self.cache.put_many(
                    {keys[i]: encode(r) for i, r in zip(chunk, out, strict=True) if r.ok}
                )
                for i, r in zip(chunk, out, strict=True):
                    results[i] = r
                if on_batch is not None:
                    on_batch(chunk, out)
        return results

    def _isolated(self, call, reqs: list, fail) -> list:
        try:
            self.stats.model_calls += 1
            self.stats.requests += len(reqs)
            outs = call(reqs)
        except ModelError:
            raise
        except Exception as exc:  # one bad request must not sink its batch
            if len(reqs) == 1:
                self.stats.errors += 1
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
                log.warning("request failed and was recorded as an error: %s", reason)
                return [fail(reason)]
            mid = len(reqs) // 2
            return self._isolated(call, reqs[:mid], fail) + self._isolated(call, reqs[mid:], fail)
        if len(outs) != len(reqs):
            raise BackendError(f"backend returned {len(outs)} results for {len(reqs)} requests")
        return outs

    def _backend_generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        outs = self.backend.generate([r.messages for r in reqs], reqs[0].params)
        for comps in outs:
            for c in comps:
                self.stats.prompt_tokens += c.prompt_tokens
                self.stats.completion_tokens += c.completion_tokens
        return [GenResult(list(comps)) for comps in outs]

    def _backend_score(self, reqs: list[ScoreRequest]) -> list[ScoreResult]:
        outs = self.backend.score_choices([r.messages for r in reqs], list(reqs[0].choices))
        results = []
        for s in outs:
            self.stats.prompt_tokens += s.prompt_tokens
            problem = _score_problem(s)
            if problem is not None:
                # Failed, not cached: the cache stores -inf as null, so a NaN written there
                # would come back as -inf (a confident verdict) on resume.
                self.stats.errors += 1
                log.warning("score request failed and was recorded as an error: %s", problem)
                results.append(ScoreResult(error=problem))
            else:
                results.append(ScoreResult(s))
        return results

    def describe(self) -> dict[str, Any]:
        if self._backend is not None:
            return self._backend.describe()
        return {"model": self.model, "revision": self.revision}

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def _score_problem(scores: ChoiceScores) -> str | None:
    """Why the backend's scores are unusable (NaN, +inf, not a number), or None."""
    for choice, value in scores.logprobs.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            return f"BackendError: log-probability of {choice!r} is {type(value).__name__}"
        if number != number or number == float("inf"):
            return f"BackendError: backend returned log-probability {number!r} for {choice!r}"
    return None


def _finite(logprobs: dict[str, float]) -> dict[str, float | None]:
    """JSON has no -inf: an impossible option is stored as null."""
    return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in logprobs.items()}
