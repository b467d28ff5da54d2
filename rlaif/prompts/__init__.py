"""Sandboxed Jinja2 prompt templates rendered to chat messages.

``PromptBook().render("critique", conversation=..., response=..., principle=..., examples=[])``
returns a :class:`RenderedPrompt`: the chat messages and the sha256 of the template that made
them. See :mod:`rlaif.prompts.book` for lookup and hashing, :mod:`rlaif.prompts.sandbox` for
how templates produce messages.
"""

from rlaif.prompts.book import PromptBook, RenderedPrompt

__all__ = ["PromptBook", "RenderedPrompt"]
