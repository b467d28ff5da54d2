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

from rlaif.backends.base import Backend, Completion, Conversation, SamplingParams
from rlaif.errors import BackendError, ModelError
from rlaif.store import CallCache, cache_key

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    """One generation request: rendered messages, how to sample, and the template behind them."""

    messages: Conversation
    params: SamplingParams
    template_hash: str | None = None


@dataclass
class GenResult:
    """Completions for a request, or the reason it failed."""

    completions: list[Completion] = field(default_factory=list)
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
        model: model id for cache keys; revision: its revision (from the backend once loaded).
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
            self._backend = self._factory()
        return self._backend

    @property
    def loaded(self) -> bool:
        return self._backend is not None

    def key(self, req: GenRequest) -> str:
        return cache_key(
            model=self.model,
            revision=self.revision,
            messages=req.messages,
            params=req.params.to_dict(),
            template_hash=req.template_hash,
        )

    def generate(
        self,
        requests: Sequence[GenRequest],
        on_batch: Callable[[list[int], list[GenResult]], None] | None = None,
    ) -> list[GenResult]:
        """Answer every request, from the cache where possible.

        Args:
            requests: the requests, in any order; results come back in the same order.
            on_batch: called after each backend batch with the request indices and results,
                after their cache entries are durable (the runner saves records there).
        """
        results: list[GenResult | None] = [None] * len(requests)
        keys = [self.key(r) for r in requests]
        todo: list[int] = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            if hit is not None:
                results[i] = GenResult([Completion(**c) for c in hit], cached=True)
                self.stats.cache_hits += 1
            else:
                todo.append(i)
        if todo:
            # Same sampling params in one backend call; longest prompts first cut padding waste
            # and surface context-overflow errors early.
            groups: dict[str, list[int]] = {}
            for i in todo:
                groups.setdefault(_params_key(requests[i].params), []).append(i)
            for idxs in groups.values():
                idxs.sort(key=lambda i: -self._length(requests[i].messages))
                for start in range(0, len(idxs), self.batch_size):
                    chunk = idxs[start : start + self.batch_size]
                    out = self._generate_isolated([requests[i] for i in chunk])
                    fresh = {
                        keys[i]: [c.__dict__ for c in r.completions]
                        for i, r in zip(chunk, out, strict=True)
                        if r.ok
                    }
                    self.cache.put_many(fresh)
                    for i, r in zip(chunk, out, strict=True):
                        results[i] = r
                    if on_batch is not None:
                        on_batch(chunk, out)
        return [r for r in results if r is not None]

    def _length(self, messages: Conversation) -> int:
        return sum(len(m["content"]) for m in messages)

    def _generate_isolated(self, reqs: list[GenRequest]) -> list[GenResult]:
        params = reqs[0].params
        try:
            self.stats.model_calls += 1
            self.stats.requests += len(reqs)
            outs = self.backend.generate([r.messages for r in reqs], params)
        except ModelError:
            raise
        except Exception as exc:  # one bad request must not sink its batch
            if len(reqs) == 1:
                self.stats.errors += 1
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
                log.warning("request failed and was recorded as an error: %s", reason)
                return [GenResult(error=reason)]
            mid = len(reqs) // 2
            return self._generate_isolated(reqs[:mid]) + self._generate_isolated(reqs[mid:])
        if len(outs) != len(reqs):
            raise BackendError(f"backend returned {len(outs)} results for {len(reqs)} requests")
        results = []
        for comps in outs:
            for c in comps:
                self.stats.prompt_tokens += c.prompt_tokens
                self.stats.completion_tokens += c.completion_tokens
            results.append(GenResult(list(comps)))
        return results

    def describe(self) -> dict[str, Any]:
        if self._backend is not None:
            return self._backend.describe()
        return {"model": self.model, "revision": self.revision}

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def _params_key(params: SamplingParams) -> str:
    return repr(sorted(params.to_dict().items()))
