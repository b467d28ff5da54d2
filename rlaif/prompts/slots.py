"""Rendering a template once for many values of the variables it only prints.

The judge renders one template per pair and order, with everything the same but the two
responses. When a template only *prints* a variable inside a message block (``{{ response_a }}``
under ``{% call message(...) %}``, possibly inside ``if`` or ``for`` whose conditions do not use
it), the variable's value cannot change which messages exist, their roles or any other text: the
messages are the same text with the value spliced in where it was printed. So the template is
rendered once with a marker in place of each such variable and the markers are replaced by each
set of values, which gives the messages the template would render, character for character
(message bodies are stripped again afterwards, as ``message`` strips them).

Which variables qualify is read from the templates' syntax trees (every file the template
loads): a variable qualifies when every use of it is a plain ``{{ name }}`` whose enclosing
tags, up to the nearest ``message`` call, are only ``if`` and ``for`` bodies; it is never
assigned, never a loop variable or macro parameter; and the template does not define its own
``message``. Anything else (a filter, a test, an attribute, a ``set``, a macro) renders the
ordinary way, so templates lose nothing.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence

from jinja2 import nodes

from rlaif.prompts.sandbox import strip_body

# Markers: private-use characters around a per-process random token, so neither a template nor
# any value rendered into it can contain one (values never see the token).
_TOKEN = secrets.token_hex(8)
# The tags a printed variable may sit in between its ``{{ }}`` and its ``message`` block.
_TRANSPARENT = (nodes.Output, nodes.If, nodes.For)


def marker(k: int) -> str:
    """The text printed in place of the ``k``-th slot variable."""
    return f"\ue000{_TOKEN}:{k}\ue001"


def _is_message_call(node: nodes.Node) -> bool:
    call = getattr(node, "call", None)
    return (
        isinstance(node, nodes.CallBlock)
        and isinstance(call, nodes.Call)
        and isinstance(call.node, nodes.Name)
        and call.node.name == "message"
    )


def _defines_message(node: nodes.Node) -> bool:
    """Whether ``node`` gives the name ``message`` a value of the template's own."""
    if isinstance(node, nodes.Macro):
        return node.name == "message"
    if isinstance(node, nodes.FromImport):
        return any((n[1] if isinstance(n, tuple) else n) == "message" for n in node.names)
    if isinstance(node, nodes.Import):
        return node.target == "message"
    return False


def plain_names(trees: Iterable[nodes.Template]) -> frozenset[str]:
    """The variables that every template in ``trees`` only prints inside message blocks."""
    plain: set[str] = set()
    spoiled: set[str] = set()
    for tree in trees:
        stack: list[tuple[nodes.Node, tuple[nodes.Node, ...]]] = [(tree, ())]
        while stack:
            node, above = stack.pop()
            if _defines_message(node):
                return frozenset()
            if isinstance(node, nodes.Name):
                if node.ctx != "load":
                    if node.name == "message":
                        return frozenset()
                    spoiled.add(node.name)
                elif _printed_in_message(above):
                    plain.add(node.name)
                else:
                    spoiled.add(node.name)
            inner = (*above, node)
            stack.extend((child, inner) for child in node.iter_child_nodes())
    return frozenset(plain - spoiled)


def _printed_in_message(above: Sequence[nodes.Node]) -> bool:
    """Whether a name whose ancestors (outermost first) are ``above`` is printed as it is,
    with only ``if``/``for`` bodies between it and a ``message`` block."""
    if not above or not isinstance(above[-1], nodes.Output):
        return False
    for node in reversed(above):
        if _is_message_call(node):
            return True
        if not isinstance(node, _TRANSPARENT):
            return False
    return False


class SlotMessages:
    """Messages rendered with markers, ready to take each set of slot values.

    Args:
        messages: what the template rendered with ``marker(k)`` for ``names[k]``.
        names: the slot variables, in marker order.
    """

    def __init__(self, messages: list[dict[str, str]], names: Sequence[str]) -> None:
        self.names = list(names)
        split, index = _splitter(len(names))
        # Per message: its role, its text as pieces (an int piece is a slot), and whether the
        # body must be stripped again: only when nothing but blank space comes before the first
        # slot or after the last can stripping reach into a value.
        self.parts: list[tuple[str, list[str | int], bool]] = []
        for m in messages:
            cut = split.split(m["content"])
            pieces = [index[p] if i % 2 else p for i, p in enumerate(cut) if p]
            edge = len(cut) > 1 and (not cut[0].strip(" \t\r\n") or not cut[-1].strip())
            self.parts.append((m["role"], pieces, edge))

    def fill(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        """The messages the template renders with ``values`` for the slot variables."""
        vals = [values[n] for n in self.names]
        out = []
        for role, pieces, edge in self.parts:
            if len(pieces) == 1 and type(pieces[0]) is str:
                content = pieces[0]
            else:
                content = "".join([p if type(p) is str else vals[p] for p in pieces])
                if edge:
                    content = strip_body(content)
            out.append({"role": role, "content": content})
        return out


@functools.cache
def _splitter(n: int) -> tuple[re.Pattern[str], dict[str, int]]:
    """The pattern that splits rendered text at the markers of ``n`` slots, and marker ->
    slot number."""
    pattern = re.compile("(" + "|".join(re.escape(marker(k)) for k in range(n)) + ")")
    return pattern, {marker(k): k for k in range(n)}
