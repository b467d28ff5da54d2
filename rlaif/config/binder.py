"""The one YAML binder: loaded YAML (with line numbers) onto typed dataclasses.

Pipeline files (:mod:`rlaif.pipeline.load`) and training configs (:mod:`rlaif.train`) both go
through here. Unknown keys, wrong types and non-finite numbers are ConfigErrors that
name the file, the line and the dotted field; a ``--set key=value`` override is reported as
coming from ``--set``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlaif.errors import ConfigError
from rlaif.yamlio import LineDict, LineList, load_yaml, short_repr

T = TypeVar("T")

# Lone surrogates come from command-line bytes that are not UTF-8 (Python's surrogateescape).
_SURROGATE = re.compile("[\ud800-\udfff]")
# Values in one free-form section (backend options, export settings): enough for any real
# config, and a bound on what YAML aliases can expand to (a "billion laughs" file).
MAX_SECTION_VALUES = 10_000


def apply_override(raw: LineDict, item: str) -> None:
    """Apply one ``dotted.key=value`` override to loaded YAML, in place.

    The value is read as YAML (``3`` is a number, ``[a, b]`` a list), or kept as text when it
    is not YAML. Missing sections are created; ``train.0.name`` indexes into a list. The new
    key is marked as coming from the command line, so errors name ``--set``.

    Raises:
        ConfigError: not ``key=value``, invalid UTF-8, or a path through a non-section.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"expected key=value, got '{item[:80]}'", file="--set")
    if _SURROGATE.search(item):
        raise ConfigError("value is not valid UTF-8", file="--set", field=key[:80])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML: take it as text
        value = text
    parts = key.split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):  # stages.train.0.set.max_steps=3: index into a list
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"no item '{part}' in the list", file="--set", field=key)
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = LineDict()
            child.line, child.key_lines = 0, {}
            node[part] = child
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"'{part}' is not a section", file="--set", field=key)
        node = child
    if not isinstance(node, dict):
        raise ConfigError("set a field of a list item (e.g. train.0.name)", file="--set", field=key)
    node[parts[-1]] = value
    if isinstance(node, LineDict):
        node.key_lines[parts[-1]] = 0  # line 0 marks a command-line value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def bind(cls: type[T], raw: Any, f: str, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from loaded YAML, checking every key and type.

    Nested dataclasses are YAML sections; ``X | None`` accepts null; ``list[...]`` and
    ``dict[...]`` fields check their items (a free-form ``dict`` holds only JSON-like values).
    Fields with ``metadata={"internal": True}`` cannot be set from YAML.

    Args:
        cls: the dataclass.
        raw: the mapping from :func:`rlaif.yamlio.load_yaml` (line numbers are kept).
        f: the file name for errors.
        prefix: the dotted path of ``raw`` in its file, for errors (``"stages.judge."``).

    Raises:
        ConfigError: unknown key, wrong type or non-finite number, naming file, line and field.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"must be a mapping, got {type(raw).__name__}",
            file=f,
            line=getattr(raw, "line", None),
            field=prefix.rstrip(".") or None,
        )
    hints = typing.get_type_hints(cls)
    names = [fl.name for fl in dataclasses.fields(cls) if not fl.metadata.get("internal")]
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        line = _line(raw, key, f)
        if key not in names:
            raise ConfigError(
                f"unknown key '{key}' (allowed: {', '.join(names)})",
                file=line[0],
                line=line[1],
                field=name,
            )
        kwargs[key] = _convert(hints[key], value, line, name)
    return cls(**kwargs)


def _line(raw: Any, key: str, f: str) -> tuple[str, int | None]:
    if isinstance(raw, LineDict):
        n = raw.key_lines.get(str(key), raw.line)
        return ("--set", None) if n == 0 else (f, n)
    return (f, None)


def _convert(tp: Any, value: Any, where: tuple[str, int | None], name: str) -> Any:
    f, line = where
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, name)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return bind(tp, value, f, f"{name}.")
    bad = ConfigError(
        f"must be {_type_name(tp)}, got {type(value).__name__} {short_repr(value)}"[:200],
        file=f,
        line=line,
        field=name,
    )
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            return [value]
        if not isinstance(value, list):
            raise bad
        return [_convert(item_tp, v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _check_plain(value, where, name)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number, got {value!r}"[:200], **_at(where, name))
        return number
    if tp is str:
        if isinstance(value, (dict, list, set, bytes)) or value is None:
            raise bad
        return str(value)
    return value


def _at(where: tuple[str, int | None], name: str) -> dict[str, Any]:
    return {"file": where[0], "line": where[1], "field": name}


def _check_plain(value: dict, where: tuple[str, int | None], name: str) -> None:
    """A free-form section goes into the manifest and the dataset card as JSON: only text,
    finite numbers, booleans, null, lists and mappings with text keys, and a bounded number of
    values (YAML aliases could otherwise expand one line into billions)."""
    stack: list[tuple[Any, str]] = [(value, name)]
    seen = 0
    while stack:
        v, path = stack.pop()
        seen += 1
        if seen > MAX_SECTION_VALUES:
            raise ConfigError(
                f"more than {MAX_SECTION_VALUES} values (do YAML aliases expand here?)",
                **_at(where, name),
            )
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ConfigError(f"key {k!r} must be text", **_at(where, path))
                stack.append((x, f"{path}.{k}"))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"must be a finite number, got {v!r}", **_at(where, path))
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise ConfigError(
                f"must be text, a number, true/false, a list or a mapping, got {type(v).__name__}",
                **_at(where, path),
            )


def locate(raw: Any, dotted: str, f: str) -> tuple[str, int | None]:
    """File and line of a dotted field whose parts may be list items (``train[0].name``);
    ``("--set", None)`` for a value from the command line."""
    node, line = raw, None
    for part in re.split(r"\.|(?=\[)", dotted):
        index = re.fullmatch(r"\[(\d+)\]", part)
        if index and isinstance(node, LineList) and int(index[1]) < len(node):
            line, node = node.line_of(int(index[1])), node[int(index[1])]
        elif isinstance(node, LineDict) and part in node:
            line, node = node.key_lines.get(part, node.line), node[part]
        else:
            break
    return ("--set", None) if line == 0 else (f, line)


def load_config(path: str | Path | None, cls: type[T], overrides: list[str] | None) -> T:
    """Read a YAML file onto the dataclass ``cls`` and apply ``key=value`` overrides.

    Unknown keys and wrong types are rejected with the file, line and dotted field (an
    override is reported as coming from ``--set``). ``path=None`` starts from the defaults.
    When ``cls`` has a ``check()`` method it is called, and the :class:`ConfigError` it
    raises (with ``field`` set) gets the file and line of that field.

    Args:
        path: the YAML file, or None.
        cls: the config dataclass (nested dataclasses become YAML sections).
        overrides: ``["lora.enabled=true", "max_steps=3", ...]``.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unreadable or invalid file, unknown key, wrong type.
    """
    where = str(path) if path is not None else "--set"
    if path is None:
        raw: Any = LineDict()
        raw.line, raw.key_lines = 0, {}
    else:
        raw = load_yaml(path)
        if raw is None:  # an empty file is all defaults
            raw = LineDict()
            raw.line, raw.key_lines = 1, {}
        if not isinstance(raw, LineDict):
            raise ConfigError("top level must be a mapping", file=where, line=1)
    for item in overrides or []:
        apply_override(raw, item)
    _floats_from_text(cls, raw)
    cfg = bind(cls, raw, where, "")
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as exc:
            file, line = locate(raw, exc.field or "", where)
            raise ConfigError(exc.message, file=file, line=line, field=exc.field) from None
    return cfg


def _floats_from_text(cls: type, raw: Any) -> None:
    """Read ``1e-5`` as a number in float fields.

    YAML 1.1 (PyYAML) only resolves exponents written with a dot (``1.0e-5``), so the way
    everyone writes a learning rate arrives as a string.
    """
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        tp = hints.get(str(key))
        args = set(typing.get_args(tp)) - {type(None)} if typing.get_args(tp) else {tp}
        if float in args and isinstance(value, str):
            with contextlib.suppress(ValueError):
                raw[key] = float(value.strip())
        elif len(args) == 1 and dataclasses.is_dataclass(next(iter(args))):
            _floats_from_text(next(iter(args)), value)
