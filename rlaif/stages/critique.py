"""SL-CAI critique and revision: what each step asks the model, and the trace it leaves.

Pure functions over prompts and model outputs; the pipeline runner owns batching, caching,
storage and resume. For each prompt: an initial response, then for each round a principle
drawn from the constitution (seeded, by weight), a critique of the current response under that
principle, and a revision that becomes the current response.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from rlaif.backends.base import Conversation, SamplingParams
from rlaif.calls.caller import GenRequest
from rlaif.constitution import Constitution, Principle
from rlaif.prompts import PromptBook
from rlaif.store import content_hash

# Small models often echo the label they were asked for; it is not part of the answer.
_LABEL = re.compile(
    r"^\s*(?:\*\*)?(?:revision|revised response|rewritten response|critique)"
    r"(?:\*\*)?\s*:\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class CritiqueContext:
    """What every critique-and-revise request of a run shares."""

    constitution: Constitution
    book: PromptBook
    system: str | None
    few_shot: int
    seed: int

    def examples(self) -> list[dict[str, Any]]:
        # Always the first k examples: a constant prefix lets prefix caches hit.
        return [e.to_dict() for e in self.constitution.examples[: self.few_shot]]


def principle_for(ctx: CritiqueContext, prompt_id: str, round_: int) -> Principle:
    """The principle for one prompt and round: seeded by (seed, prompt, round), so it does not
    depend on batch order or on which other prompts are in the run."""
    seed = int(content_hash([ctx.seed, prompt_id, round_])[:16], 16)
    return ctx.constitution.sample_principles(1, random.Random(seed))[0]


def respond_request(
    ctx: CritiqueContext, conversation: Conversation, params: SamplingParams
) -> GenRequest:
    r = ctx.book.render("respond", conversation=conversation, system=ctx.system)
    return GenRequest(r.messages, params, r.template_hash)


def critique_request(
    ctx: CritiqueContext,
    conversation: Conversation,
    response: str,
    principle: Principle,
    params: SamplingParams,
) -> GenRequest:
    r = ctx.book.render(
        "critique",
        conversation=conversation,
        response=response,
        principle=principle.to_dict(),
        examples=ctx.examples(),
        system=ctx.system,
    )
    return GenRequest(r.messages, params, r.template_hash)


def revise_request(
    ctx: CritiqueContext,
    conversation: Conversation,
    response: str,
    principle: Principle,
    critique: str,
    params: SamplingParams,
) -> GenRequest:
    r = ctx.book.render(
        "revise",
        conversation=conversation,
        response=response,
        principle=principle.to_dict(),
        critique=critique,
        examples=ctx.examples(),
        system=ctx.system,
    )
    return GenRequest(r.messages, params, r.template_hash)


def clean(text: str) -> str:
    """Model output as an answer: trimmed, without an echoed ``Revision:`` style label."""
    return _LABEL.sub("", text.strip(), count=1).strip()


def template_hashes(book: PromptBook) -> dict[str, str]:
    return {name: book.template_hash(name) for name in ("respond", "critique", "revise")}
