"""A deterministic backend with no model, for logic tests.

Everything it returns is derived from a hash of its inputs, so a test can run a whole pipeline
in milliseconds, re-run it and get the same bytes, and assert how many model calls happened.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from typing import Any

from rlaif.backends.base import Backend, ChoiceScores, Completion, Conversation, SamplingParams
from rlaif.errors import BackendError

ScoreFn = Callable[[Conversation, list[str]], dict[str, float]]


def _digest(*parts: Any) -> str:
    """sha256 hex of a canonical JSON encoding of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _last_user(conversation: Conversation) -> str:
    for message in reversed(conversation):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def _words(text: str) -> int:
    return len(text.split())


class FakeBackend(Backend):
    """A backend that answers from hashes and canned text instead of a model.

    ``generate`` returns ``"fake response <8 hex>"`` where the hex is a hash of
    (conversation, seed, j); for greedy params the seed is ignored, as a real backend ignores
    it. When the last user message contains a key of ``responses`` (first matching key in
    insertion order wins), a greedy first completion is exactly the canned text; sampled
    completions and ``j > 0`` get ``"<canned> fake response <8 hex>"`` so that ``n`` samples
    still differ, as a real sampler's would. ``stop`` strings and
    ``max_new_tokens`` (counted in whitespace words) are honored like a real backend.

    ``score_choices`` returns a log-softmax over hash-derived logits per conversation, or
    whatever ``score_fn(conversation, choices)`` returns (normalized here to log-probs only if
    ``normalize_scores`` is true).

    Args:
        responses: substring of the last user message -> canned reply.
        score_fn: optional callable giving raw logits per choice.
        fail_marker: conversations containing this string (in any message) make the call
            raise :class:`BackendError`, to test failure isolation.
        model_id: what :meth:`describe` reports as the model.
        max_context: optional context limit in tokens (whitespace words).
        normalize_scores: apply log-softmax to ``score_fn`` output.

    Attributes:
        calls: number of ``generate`` + ``score_choices`` calls.
        generated_requests: conversations passed to ``generate`` (each counted once, not ``n``).
        scored_requests: conversations passed to ``score_choices``.
        history: (method, conversations) of every call, for assertions (kept unless the
            backend is made with ``history=False``, as a pipeline's ``backend: fake`` is: a
            long run would otherwise hold every request it sent).
    """

    name = "fake"

    def __init__(
        self,
        responses: dict[str, str] | None = None,
        *,
        score_fn: ScoreFn | None = None,
        fail_marker: str | None = None,
        model_id: str = "fake-model",
        max_context: int | None = None,
        normalize_scores: bool = True,
        history: bool = True,
    ) -> None:
        self.responses = dict(responses or {})
        self.score_fn = score_fn
        self.fail_marker = fail_marker
        self.model_id = model_id
        self.model_revision = "fake-0"
        self._max_context = max_context
        self.normalize_scores = normalize_scores
        self.calls = 0
        self.generated_requests = 0
        self.scored_requests = 0
        self.history: list[tuple[str, list[Conversation]]] = []
        self._keep_history = history

    # -- helpers ---------------------------------------------------------------------------

    def _check(self, conversations: list[Conversation]) -> None:
        for i, conversation in enumerate(conversations):
            if self.fail_marker and any(
                self.fail_marker in m.get("content", "") for m in conversation
            ):
                raise BackendError(
                    f"fake backend: request {i} contains the failure marker {self.fail_marker!r}"
                )
            if self._max_context is not None and self.count_tokens(conversation) > (
                self._max_context
            ):
                raise BackendError(
                    f"fake backend: request {i} has {self.count_tokens(conversation)} tokens, "
                    f"more than the context of {self._max_context}"
                )

    def _text(self, conversation: Conversation, params: SamplingParams, j: int) -> str:
        seed = None if params.greedy else params.seed
        text = f"fake response {_digest(conversation, seed, j)[:8]}"
        user = _last_user(conversation)
        for key, canned in self.responses.items():
            if key in user:
                text = f"{canned} {text}" if seed is not None or j else canned
                break
        return text

    # -- Backend API -----------------------------------------------------------------------

    def generate(
        self, conversations: list[Conversation], params: SamplingParams
    ) -> list[list[Completion]]:
        """Return ``params.n`` deterministic completions per conversation."""
        self.calls += 1
        self.generated_requests += len(conversations)
        if self._keep_history:
            self.history.append(("generate", [list(c) for c in conversations]))
        self._check(conversations)
        out: list[list[Completion]] = []
        for conversation in conversations:
            prompt_tokens = self.count_tokens(conversation)
            row = []
            for j in range(params.n):
                text = self._text(conversation, params, j)
                finish = "stop"
                cut = [text.find(s) for s in params.stop if s and s in text]
                if cut:
                    text = text[: min(cut)]
                words = text.split()
                if len(words) > params.max_new_tokens:
                    text = " ".join(words[: params.max_new_tokens])
                    finish = "length"
                row.append(Completion(text, prompt_tokens, _words(text), finish))
            out.append(row)
        return out

    def score_choices(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[ChoiceScores]:
        """Deterministic log-probabilities of each choice after each conversation."""
        self.calls += 1
        self.scored_requests += len(conversations)
        if self._keep_history:
            self.history.append(("score_choices", [list(c) for c in conversations]))
        self._check(conversations)
        out = []
        for conversation in conversations:
            if self.score_fn is not None:
                raw = dict(self.score_fn(conversation, list(choices)))
            else:
                # Hash-derived logits in [-4, 4): spread enough that verdicts differ.
                raw = {
                    c: int(_digest(conversation, c)[:8], 16) / 0xFFFFFFFF * 8 - 4 for c in choices
                }
            if self.normalize_scores:
                top = max(raw.values())
                log_z = top + math.log(sum(math.exp(v - top) for v in raw.values()))
                raw = {c: v - log_z for c, v in raw.items()}
            out.append(ChoiceScores(logprobs=raw, prompt_tokens=self.count_tokens(conversation)))
        return out

    def count_tokens(self, conversation: Conversation) -> int:
        """Whitespace word count of all message contents."""
        return sum(_words(m.get("content", "")) for m in conversation)

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def describe(self) -> dict[str, Any]:
        """Provenance: backend name, model id and revision."""
        return {"backend": self.name, "model": self.model_id, "revision": self.model_revision}

    def reset_counts(self) -> None:
        """Zero the call counters and history (between phases of a test)."""
        self.calls = self.generated_requests = self.scored_requests = 0
        self.history.clear()
