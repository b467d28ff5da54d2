"""What the in-process backends (transformers, vLLM) share: chat-template conventions and
provenance of a model loaded from a local folder."""

from __future__ import annotations

from typing import Any

from rlaif.backends.base import Backend, Conversation
from rlaif.errors import BackendError


def prompt_ids(tokenizer: Any, conversation: Conversation) -> list[int]:
    """Token ids of ``conversation`` rendered by the chat template, ready for the reply.

    A conversation that ends with an assistant message is continued: the reply starts inside
    that message (no end-of-turn after it, no new assistant header), as RLCD's assistant-turn
    affix needs (:mod:`rlaif.stages.contrast`).
    """
    go_on = bool(conversation) and conversation[-1].get("role") == "assistant"
    text = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=not go_on, continue_final_message=go_on,
        tokenize=False,
    )  # fmt: skip
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def choice_ids(tokenizer: Any, choice: str) -> list[int]:
    """Token ids of a choice string as the start of the assistant's reply."""
    return list(tokenizer(choice, add_special_tokens=False)["input_ids"])


class LocalModelBackend(Backend):
    """A backend over a model resolved to a local folder (``self.resolved``) with an HF
    tokenizer (``self.tokenizer``); subclasses set ``dtype``, ``device`` and ``_max_context``."""

    resolved: Any
    tokenizer: Any
    dtype: Any = None
    device: Any = None
    _max_context: int | None = None

    def _prompts(self, conversations: list[Conversation], reserve: int) -> list[list[int]]:
        """Tokenized prompts; raise for the first one that leaves fewer than ``reserve`` tokens
        of context (the caller isolates that request)."""
        out = []
        for i, conversation in enumerate(conversations):
            try:
                ids = prompt_ids(self.tokenizer, conversation)
            except Exception as exc:  # a template error is the request's fault
                msg = " ".join(str(exc).split())[:160]
                raise BackendError(f"request {i}: chat template failed: {msg}") from exc
            if self._max_context is not None and len(ids) + reserve > self._max_context:
                raise BackendError(
                    f"request {i}: prompt has {len(ids)} tokens, which with {reserve} more "
                    f"exceeds the model context of {self._max_context}"
                )
            out.append(ids)
        return out

    def count_tokens(self, conversation: Conversation) -> int:
        """Prompt length in tokens after the chat template (generation prompt included)."""
        return len(prompt_ids(self.tokenizer, conversation))

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def describe(self) -> dict[str, Any]:
        """Provenance: backend, model id, revision, where it came from, dtype and device."""
        return {
            "backend": self.name,
            "model": self.model_id,
            "revision": self.model_revision,
            "source": self.resolved.source,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
        }
