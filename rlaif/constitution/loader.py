"""Load a constitution YAML file: validate every field, resolve ``extends``, report errors.

Every problem becomes a :class:`ConfigError` with the file, the line and the field, so a user
can fix it without reading code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rlaif.constitution.checks import parse_check
from rlaif.constitution.model import EXAMPLE_FIELDS, Constitution, Contrast, Example, Principle
from rlaif.errors import ConfigError
from rlaif.resources import resource_dir
from rlaif.yamlio import LineDict, LineList, line_of, load_yaml, short_repr

TOP_FIELDS = (
    "name",
    "version",
    "description",
    "source",
    "extends",
    "remove",
    "principles",
    "examples",
)
REQUIRED_TOP = ("name", "version")
PRINCIPLE_KEYS = (
    "id", "title", "tags", "weight", "critique", "revision", "judge", "check", "contrast",
)  # fmt: skip
# semver 2.0.0, from semver.org
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
PRINCIPLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def builtin_names() -> list[str]:
    """Names of the constitutions that ship with rlaif."""
    return sorted(p.stem for p in resource_dir("constitutions").glob("*.yaml"))


def find_constitution(ref: str | Path, *, relative_to: Path | None = None) -> Path:
    """Turn a built-in name or a path into a file path.

    A path is taken relative to ``relative_to`` (the folder of the file that refers to it)
    when given. A bare name without a suffix is looked up among the built-in constitutions.
    """
    ref = str(ref)
    candidates = []
    as_path = Path(ref).expanduser()
    if relative_to is not None and not as_path.is_absolute():
        candidates.append(relative_to / as_path)
    candidates.append(as_path)
    for c in candidates:
        if c.is_file():
            return c
    if "/" not in ref and not ref.endswith((".yaml", ".yml")):
        builtin = resource_dir("constitutions") / f"{ref}.yaml"
        if builtin.is_file():
            return builtin
    names = ", ".join(builtin_names())
    raise FileNotFoundError(f"no constitution file or built-in named '{ref}' (built-ins: {names})")


def load_constitution(ref: str | Path) -> Constitution:
    """Load, validate and resolve a constitution by built-in name or path.

    Raises:
        ConfigError: any validation problem, with file, line and field.
    """
    try:
        path = find_constitution(ref)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc), file=str(ref)) from None
    return _load(path, chain=())


def _load(path: Path, chain: tuple[Path, ...]) -> Constitution:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise ConfigError(f"'extends' cycle: {cycle}", file=chain[-1], field="extends")
    raw = load_yaml(path)
    f = str(path)
    if raw is None:
        raise ConfigError("file is empty", file=f)
    if not isinstance(raw, LineDict):
        raise ConfigError(
            "top level must be a mapping with name, version, principles", file=f, line=1
        )
    for key in raw:
        if key not in TOP_FIELDS:
            raise ConfigError(
                f"unknown key '{key}' (allowed: {', '.join(TOP_FIELDS)})",
                file=f,
                line=raw.line_of(str(key)),
                field=str(key),
            )
    for key in REQUIRED_TOP:
        if key not in raw:
            raise ConfigError("missing required field", file=f, line=raw.line, field=key)
    name = _text(raw, "name", f)
    if isinstance(raw["version"], (int, float)):
        raise ConfigError(
            f"version {raw['version']!r} is not semantic versioning: write MAJOR.MINOR.PATCH "
            "as a string, e.g. '1.0.0'",
            file=f,
            line=raw.line_of("version"),
            field="version",
        )
    version = _text(raw, "version", f)
    if not SEMVER.match(version):
        raise ConfigError(
            f"version '{version}' is not semantic versioning (MAJOR.MINOR.PATCH, e.g. 1.0.0)",
            file=f,
            line=raw.line_of("version"),
            field="version",
        )
    description = _text(raw, "description", f, optional=True) or ""
    source = _text(raw, "source", f, optional=True)

    parent: Constitution | None = None
    if "extends" in raw:
        ref = _text(raw, "extends", f)
        try:
            parent_path = find_constitution(ref, relative_to=path.parent)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"parent not found: {exc}", file=f, line=raw.line_of("extends"), field="extends"
            ) from None
        parent = _load(parent_path, chain=(*chain, path))
    elif "remove" in raw:
        raise ConfigError(
            "'remove' needs 'extends' (there is no parent to remove principles from)",
            file=f,
            line=raw.line_of("remove"),
            field="remove",
        )

    principles: dict[str, Principle] = {p.id: p for p in parent.principles} if parent else {}
    removed = _remove(raw, principles, f)
    own = raw.get("principles", LineList())
    if "principles" in raw and not isinstance(own, list):
        raise ConfigError(
            "must be a list of principles",
            file=f,
            line=raw.line_of("principles"),
            field="principles",
        )
    seen: set[str] = set()
    for i, item in enumerate(own):
        where = f"principles[{i}]"
        if not isinstance(item, LineDict):
            raise ConfigError(
                "each principle must be a mapping", file=f, line=line_of(own, i), field=where
            )
        pid = _principle_id(item, f, where)
        if pid in seen:
            raise ConfigError(
                f"duplicate principle id '{pid}'", file=f, line=item.line_of("id"), field=where
            )
        if pid in removed:
            raise ConfigError(
                f"principle '{pid}' is both removed and redefined",
                file=f,
                line=item.line_of("id"),
                field=where,
            )
        seen.add(pid)
        principles[pid] = _principle(item, f, where, base=principles.get(pid))

    if not principles:
        raise ConfigError(
            "constitution has no principles",
            file=f,
            line=raw.line_of("principles"),
            field="principles",
        )
    # A child's examples replace its parent's; without its own it inherits them.
    examples = _examples(raw, f) if "examples" in raw else (parent.examples if parent else ())
    return Constitution(
        name=name,
        version=version,
        description=description,
        principles=tuple(principles.values()),
        examples=examples,
        source=source if source is not None else (parent.source if parent else None),
        path=f,
        parents=(parent.name, *parent.parents) if parent else (),
    )


def _text(d: LineDict, key: str, f: str, *, optional: bool = False, where: str = "") -> Any:
    value = d.get(key)
    field = f"{where}.{key}" if where else key
    if value is None:
        if optional:
            return None
        raise ConfigError("missing required field", file=f, line=d.line_of(key), field=field)
    if not isinstance(value, str):
        raise ConfigError(
            f"must be a string, got {type(value).__name__}",
            file=f,
            line=d.line_of(key),
            field=field,
        )
    value = value.strip()
    if not value:
        raise ConfigError("must not be empty", file=f, line=d.line_of(key), field=field)
    return value


def _principle_id(item: LineDict, f: str, where: str) -> str:
    if "id" not in item:
        raise ConfigError("missing required field", file=f, line=item.line, field=f"{where}.id")
    pid = item["id"]
    if not isinstance(pid, str) or not PRINCIPLE_ID.match(pid):
        raise ConfigError(
            "id must be a string of letters, digits, '-', '_' or '.'",
            file=f,
            line=item.line_of("id"),
            field=f"{where}.id",
        )
    return pid


def _principle(item: LineDict, f: str, where: str, base: Principle | None) -> Principle:
    pid = item["id"]
    where = f"{where}({pid})"
    for key in item:
        if key not in PRINCIPLE_KEYS:
            raise ConfigError(
                f"unknown key '{key}' (allowed: {', '.join(PRINCIPLE_KEYS)})",
                file=f,
                line=item.line_of(str(key)),
                field=f"{where}.{key}",
            )
    values = base.to_dict() if base else {"id": pid, "tags": [], "weight": 1.0}
    values["check"] = base.check if base else None
    values["contrast"] = base.contrast if base else None
    if base is None and "title" not in item:
        raise ConfigError("missing required field", file=f, line=item.line, field=f"{where}.title")
    for key in ("title", "critique", "revision", "judge"):
        if key in item:
            values[key] = _text(item, key, f, optional=key != "title", where=where)
    if "tags" in item:
        tags = item["tags"]
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
            raise ConfigError(
                "tags must be a list of non-empty strings",
                file=f,
                line=item.line_of("tags"),
                field=f"{where}.tags",
            )
        values["tags"] = [t.strip() for t in tags]
    if "weight" in item:
        w = item["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w > 0 and w < 1e9):
            raise ConfigError(
                f"weight must be a positive number, got {short_repr(w)}",
                file=f,
                line=item.line_of("weight"),
                field=f"{where}.weight",
            )
        values["weight"] = float(w)
    if "check" in item:  # `check: null` drops a parent's check, like `judge: null`
        raw = item["check"]
        values["check"] = (
            None
            if raw is None
            else parse_check(raw, f"{where}.check", file=f, line=item.line_of("check"))
        )
    if "contrast" in item:  # `contrast: null` drops a parent's pair
        values["contrast"] = _contrast(item, f, f"{where}.contrast")
    has_c, has_r = values.get("critique") is not None, values.get("revision") is not None
    if has_c != has_r:
        missing = "revision" if has_c else "critique"
        raise ConfigError(
            "critique and revision go together: add the missing one or drop both",
            file=f,
            line=item.line,
            field=f"{where}.{missing}",
        )
    if not has_c and values.get("judge") is None and values["check"] is values["contrast"] is None:
        raise ConfigError(
            "principle needs critique + revision, a judge question, a check, a contrast, or "
            "several of them",
            file=f,
            line=item.line,
            field=where,
        )
    values["tags"] = tuple(values["tags"])
    return Principle(**values)


def _contrast(item: LineDict, f: str, where: str) -> Contrast | None:
    raw, line = item["contrast"], item.line_of("contrast")
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"positive", "negative"}:
        got = sorted(raw) if isinstance(raw, dict) else short_repr(raw)
        raise ConfigError(
            f"contrast must be a mapping with exactly 'positive' and 'negative', got {got}",
            file=f, line=line, field=where,
        )  # fmt: skip
    texts = {}
    for key in ("positive", "negative"):
        v = raw[key]
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(
                f"must be non-empty text, got {short_repr(v)}",
                file=f, line=line_of(raw, key) or line, field=f"{where}.{key}",
            )  # fmt: skip
        texts[key] = v.strip()
    if texts["positive"] == texts["negative"]:
        raise ConfigError("positive and negative are the same text", file=f, line=line, field=where)
    return Contrast(**texts)


def _remove(raw: LineDict, principles: dict[str, Principle], f: str) -> set[str]:
    if "remove" not in raw:
        return set()
    ids = raw["remove"]
    line = raw.line_of("remove")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError("must be a list of principle ids", file=f, line=line, field="remove")
    for i, pid in enumerate(ids):
        if pid not in principles:
            raise ConfigError(
                f"cannot remove '{pid}': the parent has no such principle",
                file=f,
                line=line_of(ids, i, line),
                field=f"remove[{i}]",
            )
        del principles[pid]
    return set(ids)


def _examples(raw: LineDict, f: str) -> tuple[Example, ...]:
    items = raw["examples"]
    if not isinstance(items, list):
        raise ConfigError(
            "must be a list of examples", file=f, line=raw.line_of("examples"), field="examples"
        )
    out = []
    for i, ex in enumerate(items):
        where = f"examples[{i}]"
        if not isinstance(ex, LineDict):
            raise ConfigError(
                "each example must be a mapping", file=f, line=line_of(items, i), field=where
            )
        allowed = ("prompt", *EXAMPLE_FIELDS)
        for key in ex:
            if key not in allowed:
                raise ConfigError(
                    f"unknown key '{key}' (allowed: {', '.join(allowed)})",
                    file=f,
                    line=ex.line_of(str(key)),
                    field=f"{where}.{key}",
                )
        if ("prompt" in ex) == ("conversation" in ex):
            raise ConfigError(
                "give exactly one of 'prompt' (a user message) or 'conversation' (a list of turns)",
                file=f,
                line=ex.line,
                field=where,
            )
        if "prompt" in ex:
            conversation: tuple[tuple[str, str], ...] = (
                ("user", _text(ex, "prompt", f, where=where)),
            )
        else:
            conversation = _conversation(ex, f, where)
        texts = {k: _text(ex, k, f, where=where) for k in EXAMPLE_FIELDS[1:]}
        out.append(Example(conversation=conversation, **texts))
    return tuple(out)


def _conversation(ex: LineDict, f: str, where: str) -> tuple[tuple[str, str], ...]:
    turns = ex["conversation"]
    field = f"{where}.conversation"
    if not isinstance(turns, list) or not turns:
        raise ConfigError(
            "must be a non-empty list of {role, content} turns",
            file=f,
            line=ex.line_of("conversation"),
            field=field,
        )
    out = []
    for j, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or set(turn) != {"role", "content"}
            or turn["role"] not in ("system", "user", "assistant")
            or not isinstance(turn["content"], str)
        ):
            raise ConfigError(
                "each turn must be {role: system|user|assistant, content: text}",
                file=f,
                line=line_of(turns, j),
                field=f"{field}[{j}]",
            )
        out.append((turn["role"], turn["content"].strip()))
    if out[-1][0] != "user":
        raise ConfigError(
            "the conversation must end with a user turn (the response follows it)",
            file=f,
            line=line_of(turns, len(turns) - 1),
            field=field,
        )
    return tuple(out)
