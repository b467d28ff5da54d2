"""The Jinja2 sandbox that turns a template into chat messages.

A template never prints a prompt as one string for something to split later. It calls
``{% call message("user") %}...{% endcall %}`` once per chat message; the call hands the rendered
block to a Python function that appends ``(role, text)`` to a list owned by that one render.
Because messages are collected as structure, no text inside a value - a user's prompt, a model's
response, a principle - can start, end or split a message, whatever role markers it contains, and
values are only ever printed, never compiled, so Jinja syntax inside them stays literal text.

Everything here raises Jinja's own exceptions; :mod:`rlaif.prompts.book` turns them into
:class:`rlaif.errors.ConfigError` with the template's file and line.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jinja2 import BaseLoader, StrictUndefined, Template, TemplateNotFound
from jinja2.exceptions import TemplateRuntimeError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")

# Names a template cannot receive as data: they are the sandbox's own globals.
RESERVED_NAMES = frozenset({"message"})


class _Collector:
    """The messages of one render, in order."""

    def __init__(self) -> None:
        self.messages: list[dict[str, str]] = []
        self.open_role: str | None = None


# A context variable rather than a render argument: macros imported without ``with context``
# and renders on other threads each still reach the list of *their own* render.
_current: contextvars.ContextVar[_Collector | None] = contextvars.ContextVar(
    "rlaif_prompt_collector", default=None
)

# Leading lines that hold only spaces/tabs; the template's indentation and blank lines around a
# message body are layout, not content. Leading spaces on the first real line are kept.
_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*(?:\r\n|\r|\n))+")


def strip_body(text: str) -> str:
    """Drop the blank lines before a message body and all whitespace after it."""
    return _LEADING_BLANK_LINES.sub("", text).rstrip()


def _message(role: object, caller: Callable[[], str] | None = None) -> str:
    """Collect one chat message; exposed to templates as ``message``.

    Jinja passes the body of ``{% call message("user") %}...{% endcall %}`` as ``caller``.
    The function prints nothing itself: the message goes to the current render's list.
    """
    collector = _current.get()
    if collector is None:  # only reachable if a template object escapes PromptBook.render
        raise TemplateRuntimeError("message() used outside PromptBook.render")
    if caller is None:
        raise TemplateRuntimeError(
            'message() must be used as a block: {% call message("user") %}...{% endcall %}'
        )
    if not isinstance(role, str) or role not in ROLES:
        raise TemplateRuntimeError(f"message role {role!r} is not one of {', '.join(ROLES)}")
    if collector.open_role is not None:
        raise TemplateRuntimeError(
            f"message({role!r}) is nested inside message({collector.open_role!r});"
            " close one block before opening the next"
        )
    collector.open_role = role
    try:
        body = caller()
    finally:
        collector.open_role = None
    collector.messages.append({"role": role, "content": strip_body(str(body))})
    return ""


def _refuse_none(value: Any) -> Any:
    """Fail on ``{{ x }}`` where x is None, instead of writing the word "None" into a prompt."""
    if value is None:
        raise UndefinedError(
            "a {{ ... }} expression printed None; guard optional values with"
            " {% if ... %} or give a default with `or`"
        )
    return value


class SnapshotLoader(BaseLoader):
    """Serves template sources that were read (and hashed) once, so that what renders is
    exactly what was hashed. Maps a template file name to ``(source, path)``."""

    def __init__(self, sources: Mapping[str, tuple[str, Path]]) -> None:
        self._sources = dict(sources)

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Callable[[], bool]]:
        if template not in self._sources:
            raise TemplateNotFound(template)
        source, path = self._sources[template]
        return source, str(path), lambda: True

    def list_templates(self) -> list[str]:
        return sorted(self._sources)


def make_environment(loader: BaseLoader | None = None) -> ImmutableSandboxedEnvironment:
    """The one environment configuration every template renders under.

    Immutable sandbox (no attribute starting with ``_``, no mutation of lists or dicts passed
    in), strict undefined (a missing variable is an error, never an empty string), no
    autoescaping (prompts are not HTML), and block tags that leave no stray whitespace.
    """
    env = ImmutableSandboxedEnvironment(
        loader=loader,
        undefined=StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        finalize=_refuse_none,
        auto_reload=False,  # sources come from a snapshot that never changes
    )
    env.globals["message"] = _message
    return env


def collect_messages(template: Template, context: Mapping[str, Any]) -> list[dict[str, str]]:
    """Render ``template`` and return the chat messages its ``message`` blocks produced.

    Raises:
        TemplateRuntimeError: text outside message blocks, or no message at all.
        jinja2.TemplateError: anything the template itself raised (undefined, sandbox, ...).
    """
    collector = _Collector()
    token = _current.set(collector)
    try:
        outside = template.render(**context)
    finally:
        _current.reset(token)
    stray = outside.strip()
    if stray:
        excerpt = stray if len(stray) <= 60 else stray[:57] + "..."
        raise TemplateRuntimeError(
            f"text outside {{% call message(...) %}} blocks: {excerpt!r}; put every"
            " piece of prompt text inside a message block"
        )
    if not collector.messages:
        raise TemplateRuntimeError("the template produced no messages")
    return collector.messages
