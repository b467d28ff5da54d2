"""The one interface every model backend implements.

A backend turns batches of chat conversations into completions, and scores fixed options
("A" / "B") after a conversation by their log-probabilities, without generating. It knows
nothing about principles, records or files.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}
Conversation = list[Message]
# Where a prompt's shared prefix ends: (message index, characters of that message's content).
# A caller that sends several prompts starting with the same text (the judge's two orders)
# marks the end of that text; a backend that ``reuses_prefixes`` computes the prefix's KV
# once and scores each prompt as prefix + rest. The hint is part of the request, so a
# prompt's scores never depend on which other prompts were sent with it.
PrefixHint = tuple[int, int]


def shared_prefix(a: Conversation, b: Conversation) -> PrefixHint | None:
    """The hint for the text ``a`` and ``b`` start with, or None if they differ at once.

    Messages before the first differing one must be equal; the hint points into that
    message's content, after the characters both share. Equal conversations give None.
    """
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x == y:
            continue
        if x.get("role") != y.get("role") or set(x) != set(y):
            return (i, 0) if i else None
        cx, cy = x.get("content"), y.get("content")
        if not isinstance(cx, str) or not isinstance(cy, str):
            return (i, 0) if i else None
        n = common_prefix_length(cx, cy)
        return (i, n) if i or n else None
    return None


def common_prefix_length(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` start with in common.

    Slices are compared in C, halving the span each time (``os.path.commonprefix`` steps
    through the characters one by one in Python, which costs more than rendering the prompt).
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo]; a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding (``top_p`` and ``seed`` unused).

    Args:
        temperature: softmax temperature; 0 for greedy.
        top_p: nucleus sampling mass.
        max_new_tokens: cap on generated tokens per completion.
        stop: strings that end a completion (not included in the text).
        n: completions per conversation.
        seed: base seed; completion ``j`` of a conversation is sampled from ``seed + j``, so
            the result does not depend on batch composition.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    n: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("max_new_tokens and n must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class Completion:
    """One generated completion."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"  # "stop" | "length"


@dataclass
class ChoiceScores:
    """Log-probabilities of each option, as the assistant's reply after a conversation."""

    logprobs: dict[str, float]
    prompt_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """A model behind one interface.

    Attributes:
        name: backend kind, e.g. ``"transformers"``.
        model_id: what the user asked for (HF id or path).
        model_revision: resolved revision or content hash of the weights, for provenance.
    """

    name: str = "base"
    model_id: str = ""
    model_revision: str | None = None
    # True if score_choices takes ``prefixes`` (one PrefixHint or None per conversation).
    reuses_prefixes: bool = False
    # False if a request's result can depend on the other requests of its batch (floating
    # point reductions shaped by the batch): the caller then re-sends a batch whole rather
    # than only its unanswered part, so a resumed run computes what an uninterrupted one did.
    batch_invariant: bool = True

    @abc.abstractmethod
    def generate(
        self, conversations: list[Conversation], params: SamplingParams
    ) -> list[list[Completion]]:
        """Return ``params.n`` completions for each conversation, in input order."""

    @abc.abstractmethod
    def score_choices(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[ChoiceScores]:
        """Log-probability of each choice string as the start of the assistant's reply.

        Backends with ``reuses_prefixes = True`` also take ``prefixes=`` (see
        :data:`PrefixHint`); callers pass it only to those, so this two-argument form stays
        enough for a backend of one's own.
        """

    def count_tokens(self, conversation: Conversation) -> int:
        """Prompt length in tokens after the chat template (used to sort and to guard context)."""
        return sum(len(m["content"]) for m in conversation) // 4

    @property
    def max_context(self) -> int | None:
        return None

    def describe(self) -> dict[str, Any]:
        """Provenance of this backend for records and cards."""
        return {"backend": self.name, "model": self.model_id, "revision": self.model_revision}

    def reset_prefix_cache(self) -> None:  # noqa: B027 - optional hook
        """Forget cached prompt prefixes and free their memory; results do not change."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free the model's memory."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
