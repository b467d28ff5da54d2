"""Safe YAML loading that remembers where each value came from.

Only :class:`yaml.SafeLoader` is used (a subclass that adds line numbers), so YAML tags that
construct Python objects are refused exactly as ``yaml.safe_load`` refuses them.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from rlaif.errors import ConfigError


class LineDict(dict):
    """A mapping from YAML that knows its own line and the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):
    """A sequence from YAML that knows the line of each item (1-based)."""

    line: int = 0
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


# A lone UTF-16 surrogate (from a "\\ud800" escape) is not text: no file, tokenizer or JSON
# writer downstream can encode it, so it is refused where it is read.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _LineLoader(yaml.SafeLoader):
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # The safe constructors raise plain ValueError for values they cannot build (an int
        # past Python's 4300-digit limit, a date like 2024-02-30): give those the node's line.
        try:
            value = super().construct_object(node, deep=deep)
        except ValueError as exc:
            raise ConfigError(
                f"invalid value: {' '.join(str(exc).split(';')[0].split())[:120]}",
                line=node.start_mark.line + 1,
            ) from None
        if isinstance(value, str) and _SURROGATE.search(value):
            raise ConfigError(
                "text is not valid Unicode (a lone surrogate such as \\ud800)",
                line=node.start_mark.line + 1,
            )
        return value


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise ConfigError(
                "mapping keys must be plain scalars", line=key_node.start_mark.line + 1
            )
        if key in out:
            raise ConfigError(
                f"duplicate key '{key}'", line=key_node.start_mark.line + 1, field=str(key)
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[str(key)] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def load_yaml(path: str | Path, text: str | None = None) -> Any:
    """Parse a YAML file safely, with line numbers on mappings and lists.

    Args:
        path: the file (used for reading when ``text`` is None, and in error messages).
        text: the document itself, if already read.

    Raises:
        ConfigError: unreadable file, bad encoding, or a YAML syntax error (with its line).
    """
    path = Path(path)
    if text is None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ConfigError("file not found", file=path) from None
        except OSError as exc:
            raise ConfigError(f"cannot read file: {exc.strerror or exc}", file=path) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise ConfigError("file is not valid UTF-8", file=path, line=line) from None
    try:
        return yaml.load(text, Loader=_LineLoader)  # _LineLoader is a SafeLoader subclass
    except ConfigError as exc:
        exc.file = str(path)
        raise ConfigError(exc.message, file=path, line=exc.line, field=exc.field) from None
    except yaml.reader.ReaderError as exc:  # a control character such as NUL in the text
        line = text[: exc.position].count("\n") + 1
        raise ConfigError(
            f"invalid YAML: character {exc.character!r} is not allowed", file=path, line=line
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=path, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=path) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nesting too deep", file=path) from None


def line_of(container: Any, key: Any, default: int | None = None) -> int | None:
    """Line of ``key`` (a mapping key or list index) in a loaded container, if known."""
    if isinstance(container, LineDict):
        return container.line_of(str(key))
    if isinstance(container, LineList) and isinstance(key, int):
        return container.line_of(key)
    return getattr(container, "line", default) or default


class _ShortRepr(reprlib.Repr):
    """reprlib with LineDict / LineList treated as dict / list (reprlib would fall back to a
    full ``repr`` for subclasses, which for a YAML alias bomb never finishes)."""

    def repr1(self, x: Any, level: int) -> str:
        if isinstance(x, dict):
            return self.repr_dict(x, level)
        if isinstance(x, list):
            return self.repr_list(x, level)
        return super().repr1(x, level)


_SHORT = _ShortRepr()
_SHORT.maxstring = _SHORT.maxother = 80


def short_repr(value: Any) -> str:
    """A bounded ``repr`` of a loaded value, for error messages."""
    return _SHORT.repr(value)
