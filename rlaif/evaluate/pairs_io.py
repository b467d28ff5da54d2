"""Readers for human-labelled comparisons, the input of ``rlaif judge audit``.

Three formats, all JSONL (one JSON object a line) or a JSON array of objects:

* ``hh``: HH-RLHF rows ``{"chosen": transcript, "rejected": transcript}``. A transcript is
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``; the turns both transcripts share are the prompt
  conversation, their final assistant replies the two responses, and the human label is
  ``chosen``. A row whose prefixes differ or whose final replies are identical is skipped with
  a reason (counted, never silently dropped).
* ``cai-mc``: the CAI paper's evals ``{"prompt", "corrects", "incorrects"}``. Two shapes:

  - option labels (``" (A)"``) that name option lines inside the prompt
    (``HarmfulVsEthical``, ``HarmfulnessClassification``) become an :class:`MCItem`, a direct
    multiple-choice question. The second order reverses the option texts under the same
    labels (for two options: a swap), so every pair of options is seen in both orders.
  - full responses (``RLMadisonFewShotPrompts.json``) become pairwise :class:`AuditPair` s,
    one per (correct, incorrect), with the conversation parsed from ``Human:``/``Assistant:``.
* ``rlaif``: rlaif's preference export, TRL's keys: ``prompt`` (messages or a string),
  ``chosen`` / ``rejected`` (one assistant message, or a string), optional ``margin``.

Broken input (unreadable file, bad JSON, a missing or mistyped column) raises
:class:`~rlaif.errors.DataError` naming the file, line and field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.errors import ConfigError, DataError
from rlaif.store import content_hash

FORMATS = ("hh", "cai-mc", "rlaif")

_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_LABEL = re.compile(r"\s*\(([A-Z])\)\s*")  # " (A)": an option label of a cai-mc eval
_OPTION_LINE = re.compile(r"(?P<head>\s*\((?P<letter>[A-Z])\)\s)(?P<text>.*)")


@dataclass(frozen=True)
class AuditPair:
    """Two responses to one conversation; a human preferred ``chosen``.

    Attributes:
        id: content hash of (conversation, chosen, rejected).
        source: ``"file:line"`` of the row it came from.
        conversation: chat messages, ending with a user message.
        chosen: the human-preferred response (the judge's x).
        rejected: the other response (y).
    """

    id: str
    source: str
    conversation: list[dict[str, str]]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice question whose options are lines of its prompt.

    The prompt is ``head + option lines + tail``; option ``i`` is shown as
    ``prefixes[i] + texts[i]``. :meth:`render` puts the texts in another order under the same
    labels.

    Attributes:
        id: content hash of (prompt, correct label).
        source: ``"file:line"``.
        labels: the option labels as scored, e.g. ``("(A)", "(B)")``.
        texts: the option texts in prompt order.
        correct: index of the human-correct option.
    """

    id: str
    source: str
    head: str
    prefixes: tuple[str, ...]
    texts: tuple[str, ...]
    tail: str
    labels: tuple[str, ...]
    correct: int

    def render(self, order: list[int]) -> str:
        """The prompt with option text ``order[k]`` shown at position ``k``."""
        lines = [p + self.texts[i] for p, i in zip(self.prefixes, order, strict=True)]
        return self.head + "\n".join(lines) + self.tail


@dataclass
class AuditData:
    """What a comparisons file holds: pairs, multiple-choice items, and skipped rows."""

    path: str
    format: str
    rows: int = 0
    pairs: list[AuditPair] = field(default_factory=list)
    mc_items: list[MCItem] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"}

    def skip_counts(self) -> dict[str, int]:
        """Skipped rows per reason."""
        out: dict[str, int] = {}
        for s in self.skipped:
            out[s["reason"]] = out.get(s["reason"], 0) + 1
        return out


class _Skip(Exception):
    """A row that is well-formed but cannot be audited; its reason is counted."""


# -- files ------------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int | None, str, dict[str, Any]]]:
    """(line, where, object) for each row; ``line`` is None inside a JSON array."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read comparisons file: {exc}", file=str(path)) from exc
    if not text.strip():
        raise DataError("comparisons file is empty", file=str(path))
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"bad JSON: {exc.msg}", file=str(path), line=exc.lineno) from exc
        for i, obj in enumerate(items):
            if not isinstance(obj, dict):
                raise DataError(f"item [{i}] is {type(obj).__name__}, not an object", file=path)
            yield None, f"{path.name}[{i}]", obj
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"bad JSON: {exc.msg}", file=str(path), line=n) from exc
        if not isinstance(obj, dict):
            raise DataError(f"row is {type(obj).__name__}, not an object", file=str(path), line=n)
        yield n, f"{path.name}:{n}", obj


def read_comparisons(path: str | Path, fmt: str, limit: int | None = None) -> AuditData:
    """Read a human-labelled comparisons file.

    Args:
        path: JSONL file (or a JSON array of objects).
        fmt: ``"hh"``, ``"cai-mc"`` or ``"rlaif"``.
        limit: read only the first ``limit`` rows (skipped rows count as read).

    Returns:
        The pairs, multiple-choice items and skipped rows.

    Raises:
        ConfigError: unknown format or a bad limit.
        DataError: unreadable file, bad JSON, a missing or mistyped column.
    """
    if fmt not in FORMATS:
        raise ConfigError(
            f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="format"
        )
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}", field="limit")
    path = Path(path)
    data = AuditData(str(path), fmt)
    for line, where, obj in _records(path):
        if limit is not None and data.rows >= limit:
            break
        data.rows += 1
        try:
            if fmt == "hh":
                data.pairs.append(_hh_row(obj, path, line, where))
            elif fmt == "rlaif":
                data.pairs.append(_rlaif_row(obj, path, line, where))
            else:
                pairs, item = _cai_row(obj, path, line, where)
                data.pairs.extend(pairs)
                if item is not None:
                    data.mc_items.append(item)
        except _Skip as why:
            data.skipped.append({"source": where, "reason": str(why)})
    if data.rows == 0:
        raise DataError("comparisons file has no rows", file=str(path))
    return data


def _bad(message: str, path: Path, line: int | None, where: str, field: str) -> DataError:
    """A row error: ``file:line: field 'x': message``; rows of a JSON array name their item."""
    return DataError(
        message if line else f"{where}: {message}", file=str(path), line=line, field=field
    )


def _field(
    obj: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    path: Path,
    line: int | None,
    where: str,
) -> Any:
    if key not in obj:
        raise _bad("missing column", path, line, where, key)
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _bad(f"expected {names}, got {type(value).__name__}", path, line, where, key)
    return value


def _pair(source: str, conversation: list[dict[str, str]], chosen: str, rejected: str) -> AuditPair:
    chosen, rejected = chosen.strip(), rejected.strip()
    if not chosen or not rejected:
        raise _Skip("empty response")
    if chosen == rejected:
        raise _Skip("identical responses")
    if not conversation or conversation[-1]["role"] != "user":
        raise _Skip("conversation does not end with a human turn")
    pid = content_hash([conversation, chosen, rejected])
    return AuditPair(pid, source, conversation, chosen, rejected)


# -- hh ---------------------------------------------------------------------------------------


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> ``[("user", "hi"), ("assistant", "hello")]``.

    Text before the first turn marker must be blank. Contents are stripped; a trailing
    ``"Assistant:"`` with nothing after it gives an empty assistant turn.

    Raises:
        ValueError: no turn markers, or text before the first one.
    """
    if not text.startswith("\n\n"):
        text = "\n\n" + text.lstrip()  # "Human: ..." at the very start is the same turn marker
    parts = _TURN.split(text)
    if len(parts) < 3:
        raise ValueError("no 'Human:' / 'Assistant:' turns")
    if parts[0].strip():
        raise ValueError("text before the first turn")
    return [(_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def _hh_row(obj: dict[str, Any], path: Path, line: int | None, where: str) -> AuditPair:
    chosen = _field(obj, "chosen", str, path, line, where)
    rejected = _field(obj, "rejected", str, path, line, where)
    try:
        a, b = parse_transcript(chosen), parse_transcript(rejected)
    except ValueError as exc:
        raise _Skip(f"unparseable transcript: {exc}") from exc
    if a[-1][0] != "assistant" or b[-1][0] != "assistant":
        raise _Skip("transcript does not end with an assistant turn")
    if a[:-1] != b[:-1]:
        raise _Skip("chosen and rejected prefixes differ")
    if a[-1][1] == b[-1][1]:
        raise _Skip("identical final replies")
    conversation = [{"role": r, "content": c} for r, c in a[:-1]]
    return _pair(where, conversation, a[-1][1], b[-1][1])


# -- rlaif ------------------------------------------------------------------------------------


def _messages(
    value: Any, key: str, path: Path, line: int | None, where: str
) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )
    if not ok or not value:
        raise _bad(
            "expected a string or a non-empty list of {role, content} messages",
            path,
            line,
            where,
            key,
        )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _rlaif_row(obj: dict[str, Any], path: Path, line: int | None, where: str) -> AuditPair:
    prompt = _messages(
        _field(obj, "prompt", (str, list), path, line, where), "prompt", path, line, where
    )
    replies = []
    for key in ("chosen", "rejected"):
        msgs = _messages(_field(obj, key, (str, list), path, line, where), key, path, line, where)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _bad("expected one assistant message", path, line, where, key)
        replies.append(msgs[0]["content"])
    if obj.get("margin") is not None and not isinstance(obj["margin"], (int, float)):
        raise _bad("margin must be a number", path, line, where, "margin")
    return _pair(where, prompt, replies[0], replies[1])


# -- cai-mc -----------------------------------------------------------------------------------


def _cai_row(
    obj: dict[str, Any], path: Path, line: int | None, where: str
) -> tuple[list[AuditPair], MCItem | None]:
    prompt = _field(obj, "prompt", str, path, line, where)
    answers = {}
    for key in ("corrects", "incorrects"):
        value = _field(obj, key, list, path, line, where)
        if not value or not all(isinstance(v, str) for v in value):
            raise _bad("expected a non-empty list of strings", path, line, where, key)
        answers[key] = value
    if all(_LABEL.fullmatch(v) for v in answers["corrects"] + answers["incorrects"]):
        return [], _mc_item(prompt, answers["corrects"], answers["incorrects"], where)
    try:
        turns = parse_transcript(prompt)
    except ValueError:
        turns = [("user", prompt.strip())]  # a bare question
    if turns and turns[-1] == ("assistant", ""):
        turns = turns[:-1]  # the prompt ends with "Assistant:" for the reply to follow
    conversation = [{"role": r, "content": c} for r, c in turns]
    pairs = []
    for c in answers["corrects"]:
        for r in answers["incorrects"]:
            pairs.append(_pair(where, conversation, c, r))
    return pairs, None


def _mc_item(prompt: str, corrects: list[str], incorrects: list[str], where: str) -> MCItem:
    if len(corrects) != 1:
        raise _Skip(f"{len(corrects)} correct options; a multiple-choice item needs exactly one")
    lines = prompt.split("\n")
    # The options are the LAST run of "(X) text" lines, so a conversation that happens to
    # contain such a line is not mistaken for the options.
    end = max((i for i, ln in enumerate(lines) if _OPTION_LINE.fullmatch(ln)), default=-1)
    if end < 0:
        raise _Skip("option labels given but no '(X) ...' option lines in the prompt")
    start = end
    while start > 0 and _OPTION_LINE.fullmatch(lines[start - 1]):
        start -= 1
    matches = [_OPTION_LINE.fullmatch(ln) for ln in lines[start : end + 1]]
    letters = [m.group("letter") for m in matches if m]
    wanted = sorted(_LABEL.fullmatch(v).group(1) for v in corrects + incorrects)  # type: ignore[union-attr]
    if sorted(letters) != wanted or len(set(letters)) != len(letters):
        raise _Skip(f"option lines {letters} do not match the answer labels {wanted}")
    head = "\n".join(lines[:start]) + ("\n" if start else "")
    tail = ("\n" if end + 1 < len(lines) else "") + "\n".join(lines[end + 1 :])
    correct = letters.index(_LABEL.fullmatch(corrects[0]).group(1))  # type: ignore[union-attr]
    return MCItem(
        id=content_hash([prompt, corrects[0]]),
        source=where,
        head=head,
        prefixes=tuple(m.group("head") for m in matches if m),
        texts=tuple(m.group("text") for m in matches if m),
        tail=tail,
        labels=tuple(f"({x})" for x in letters),
        correct=correct,
    )
