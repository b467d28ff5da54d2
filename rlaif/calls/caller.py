"""Every model call of a run goes through :class:`ModelCaller`.

It answers identical calls from the cache (and a request asked twice in one call from one
computation), sends the rest to the backend in full batches sorted by prompt length, and
isolates a bad request: when a batch raises, it is split in halves until the failing request
stands alone, which is returned as an error while the rest go on. A
:class:`~rlaif.errors.ModelError` (the backend itself is gone) is never isolated: it stops
the run, and a resume continues from the last saved batch.

With a :class:`~rlaif.calls.budget.Budget` attached, a batch is sent in parts whose
worst-case usage still fits the caps, each saved and charged at its real usage; when not even
the next request fits, :class:`~rlaif.calls.budget.BudgetExceeded` stops the run the same
way, before that request is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from rlaif.backends.base import Backend, ChoiceScores, Completion, Conversation, SamplingParams
from rlaif.calls.budget import Budget, Usage, usage_of_completions
from rlaif.errors import BackendError, ModelError, RlaifError
from rlaif.store import CallCache, Encoded, cache_key, cache_key_frame, key_of_frame

log = logging.getLogger(__name__)


class _Request:
    """What generation and scoring requests share."""

    messages: Conversation

    @cached_property
    def messages_json(self) -> Encoded:
        """The messages as canonical JSON, encoded once: the request's cache key and the id
        of the record that holds its messages both hash them (a request is not changed after
        it is built)."""
        return Encoded(self.messages)


@dataclass
class GenRequest(_Request):
    """One generation request: rendered messages, how to sample, and the template behind them."""

    messages: Conversation
    params: SamplingParams
    template_hash: str | None = None


@dataclass
class ScoreRequest(_Request):
    """Score ``choices`` as the assistant's reply to ``messages`` (no generation)."""

    messages: Conversation
    choices: tuple[str, ...]
    template_hash: str | None = None
    # Where the text shared with sibling requests ends (rlaif.backends.base.PrefixHint): a
    # backend that reuses prefixes computes it once. Not part of the cache key: a function of
    # ``messages`` and the siblings the same stage always builds with it.
    prefix: tuple[int, int] | None = None


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
    duplicates: int = 0  # requests answered by an identical one of the same call
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def request_key(model: str, revision: str | None, req: GenRequest | ScoreRequest) -> str:
    """The call-cache key of a request to ``model`` at ``revision``."""
    kind, params = _kind_params(req)
    return cache_key(
        model=model,
        revision=revision,
        messages=req.messages_json,
        params=params,
        template_hash=req.template_hash,
        kind=kind,
    )


def _kind_params(req: GenRequest | ScoreRequest) -> tuple[str, dict[str, Any]]:
    if isinstance(req, ScoreRequest):
        return "score_choices", {"choices": list(req.choices)}
    return "generate", req.params.to_dict()


class _KeyFrames:
    """:func:`request_key` with the text around each request's messages built once per
    (params, template, model, revision) rather than once per request (it was most of the
    cost of a key).

    Entries are found by the identity of the request's params (its choices tuple or
    :class:`SamplingParams`), which the stage's requests share; an entry holds that object, so
    its id is not reused while the entry lives. Equal but distinct params objects get
    entries of their own (equality would let ``1`` stand for ``True``, whose JSON differs).
    Params that could change after a key was made (choices in a list) are keyed afresh.
    """

    LIMIT = 256  # entries before the table starts again (a run has a handful)

    def __init__(self) -> None:
        self._frames: dict[tuple, tuple[object, str, str]] = {}

    def key(self, model: str, revision: str | None, req: GenRequest | ScoreRequest) -> str:
        params: object = req.choices if isinstance(req, ScoreRequest) else req.params
        if type(params) is not tuple and type(params) is not SamplingParams:
            return request_key(model, revision, req)
        slot = (id(params), req.template_hash, model, revision)
        frame = self._frames.get(slot)
        if frame is None or frame[0] is not params:
            if len(self._frames) >= self.LIMIT:
                self._frames.clear()
            kind, plain = _kind_params(req)
            head, tail = cache_key_frame(model=model, revision=revision, params=plain,
                                         template_hash=req.template_hash, kind=kind)  # fmt: skip
            frame = self._frames[slot] = (params, head, tail)
        return key_of_frame(frame[1], req.messages_json.text, frame[2])


def max_completion_tokens(req: GenRequest | ScoreRequest) -> int:
    """The most completion tokens a request can use (scoring generates none)."""
    return req.params.max_new_tokens * req.params.n if isinstance(req, GenRequest) else 0


def prompt_copies(req: GenRequest | ScoreRequest) -> int:
    """How many times the prompt is processed (and reported): once per completion."""
    return req.params.n if isinstance(req, GenRequest) else 1


class ModelCaller:
    """Cached, batched, failure-isolating access to a backend.

    Args:
        backend_factory: makes the backend on first need, so a run whose calls are all cached
            never loads a model.
        model: model id for cache keys; revision: its revision (resolved without loading).
        cache: the run's call cache.
        batch_size: requests per backend call.
        budget: caps on the run's usage, shared by all callers of the run (the runner may also
            set the ``budget`` attribute after construction).
    """

    def __init__(
        self,
        backend_factory: Callable[[], Backend],
        *,
        model: str,
        revision: str | None,
        cache: CallCache,
        batch_size: int = 16,
        budget: Budget | None = None,
    ) -> None:
        self._factory = backend_factory
        self._backend: Backend | None = None
        self.model = model
        self.revision = revision
        self.cache = cache
        self.batch_size = batch_size
        self.stats = CallStats()
        self.budget = budget
        self._frames = _KeyFrames()

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
        """:func:`request_key` of ``req`` for this caller's model and revision."""
        return self._frames.key(self.model, self.revision, req)

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
        # A request identical to an earlier one of the same call (a judge drawing the same
        # principle twice for a pair) is answered with that one's result: never computed twice.
        # Batches are cut from every distinct request, answered or not, so a resumed run meets
        # the batches of an uninterrupted one (see ``_send``).
        first: dict[str, int] = {}
        copies: dict[int, list[int]] = {}
        cached = self.cache.get_many(keys)  # one index query per batch of keys
        for i, k in enumerate(keys):
            hit = cached.get(k)
            if hit is not None:
                results[i] = decode(hit)
                self.stats.cache_hits += 1
                first.setdefault(k, i)
            elif k in first:
                copies.setdefault(first[k], []).append(i)
                self.stats.duplicates += 1
            else:
                first[k] = i
        # One backend call per group of identical params; longest prompts first cut padding
        # waste and surface context-overflow errors early.
        groups: dict[str, list[int]] = {}
        for i in first.values():
            groups.setdefault(group_of(requests[i]), []).append(i)
        for idxs in groups.values():
            size = {i: sum([len(m["content"]) for m in requests[i].messages]) for i in idxs}
            idxs.sort(key=size.__getitem__, reverse=True)  # stable: ties keep their order
            for start in range(0, len(idxs), self.batch_size):
                batch = idxs[start : start + self.batch_size]
                rest = [i for i in batch if results[i] is None]
                while rest:  # more than one pass only when the budget cuts the batch
                    chunk = self._admitted(requests, rest)
                    out = self._send(call, requests, batch, chunk, fail)
                    # distinct keys get_many missed above, written once each: not asked again
                    self.cache.put_many(
                        {keys[i]: encode(r) for i, r in zip(chunk, out, strict=True) if r.ok},
                        looked_up=True,
                    )
                    if self.budget is not None:  # after the cache: its ledger says how far
                        self.budget.charge(sum((_usage(r) for r in out if r.ok), Usage()))
                    for i, r in zip(chunk, out, strict=True):
                        results[i] = r
                        for c in copies.get(i, ()):
                            # a fresh object, as a cache hit would give (errors are shared)
                            results[c] = decode(encode(r)) if r.ok else r
                    if on_batch is not None:
                        same = [c for i in chunk for c in copies.get(i, ())]
                        on_batch(chunk + same, out + [results[c] for c in same])
                    rest = rest[len(chunk) :]
        return results

    def _send(self, call, requests, batch: list[int], chunk: list[int], fail) -> list:
        """Results for ``chunk``, the unanswered part of ``batch`` sent now.

        A backend whose results depend on the batch (``batch_invariant`` False) gets the
        whole batch when an earlier run left part of it answered (a resume): the answered
        requests are computed again and only the chunk's results kept, so every request is
        computed in the batch an uninterrupted run gave it. Under a budget only the chunk is
        sent: the budget admitted no more.
        """
        if len(chunk) == len(batch) or self.budget is not None or self.backend.batch_invariant:
            return self._isolated(call, [requests[i] for i in chunk], fail)
        out = self._isolated(call, [requests[i] for i in batch], fail)
        wanted = set(chunk)
        return [r for i, r in zip(batch, out, strict=True) if i in wanted]

    def _admitted(self, requests: Sequence, idxs: list[int]) -> list[int]:
        """The leading requests of a batch to send now, with the backend started; raises
        :class:`~rlaif.calls.budget.BudgetExceeded` when not even the first one fits."""
        if self.budget is not None and not self.budget.admit(
            [(0, max_completion_tokens(requests[idxs[0]]))]
        ):  # checked before the backend starts: no model is loaded just to stop
            raise self.budget.exceeded()
        self.backend  # noqa: B018 - start it outside the failure isolation
        if self.budget is None:
            return idxs
        # Each request at its worst case; what is answered is charged at its real usage
        # before the rest of the batch is tried again, so the run goes on while calls fit.
        n = self._admit([requests[i] for i in idxs])
        if n == 0:
            raise self.budget.exceeded()
        return idxs[:n]

    def _admit(self, reqs: list) -> int:
        """How many of ``reqs`` (in order) the budget admits at their worst case."""
        assert self.budget is not None
        count = self._prompt_tokens if self.budget.counts_tokens else (lambda _: 0)
        return self.budget.admit(
            [(count(r.messages) * prompt_copies(r), max_completion_tokens(r)) for r in reqs]
        )

    def _prompt_tokens(self, messages: Conversation) -> int:
        try:
            return self.backend.count_tokens(messages)
        except Exception:  # the backend will reject this request by itself
            # a rough length keeps the admission honest until the backend reports the error
            return sum(len(m.get("content", "")) for m in messages) // 4

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
        conversations, choices = [r.messages for r in reqs], list(reqs[0].choices)
        if getattr(self.backend, "reuses_prefixes", False):
            outs = self.backend.score_choices(
                conversations, choices, prefixes=[r.prefix for r in reqs]
            )
        else:
            outs = self.backend.score_choices(conversations, choices)
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


def _usage(result: GenResult | ScoreResult) -> Usage:
    """What one answered request cost (see :mod:`rlaif.calls.budget`)."""
    if isinstance(result, GenResult):
        return usage_of_completions(result.completions)
    return Usage(1, result.scores.prompt_tokens if result.scores is not None else 0)


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
    return {k: (v if v - v == 0.0 else None) for k, v in logprobs.items()}  # 0 iff v is finite
