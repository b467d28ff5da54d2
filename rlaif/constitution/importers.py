"""Importers for the public constitution formats.

* ``anthropic``: the Constitutional AI paper's supplementary JSON
  (anthropics/ConstitutionalHarmlessnessPaper): ``CritiqueRevisionInstructions.json`` (16
  critique/revision request pairs), ``RLMadisonInstructions.json`` (16 comparison principles)
  and ``CritiqueRevisionFewShotPrompts.json`` (few-shot transcripts).
* ``llm-swarm``: Hugging Face H4's machine-readable constitutions (huggingface/llm-swarm,
  ``examples/constitutional-ai/constitution_*.json``): ``constitutions[{critic, revision}]``
  plus ``system_chat`` few-shot conversations.

Each importer returns a plain mapping that :func:`rlaif.constitution.dump.to_yaml` writes and
:func:`rlaif.constitution.load_constitution` validates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rlaif.errors import ConfigError

FORMATS = ("anthropic", "llm-swarm")

_CAI_SOURCE = (
    "Bai et al. 2022, Constitutional AI: Harmlessness from AI Feedback (arXiv 2212.08073); "
    "supplementary prompts from github.com/anthropics/ConstitutionalHarmlessnessPaper"
)
_SWARM_SOURCE = (
    "Hugging Face H4 llm-swarm constitutional-ai example (github.com/huggingface/llm-swarm, MIT)"
)
_TURN = re.compile(r"\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):[ ]?")


def _read_json(path: Path) -> Any:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        # "\ud800" escapes decode to lone surrogates, which no YAML or UTF-8 file can hold.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return data
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except OSError as exc:  # a folder, no permission, ...
        raise ConfigError(f"cannot read file: {exc.strerror or exc}", file=path) from None
    except UnicodeDecodeError:
        raise ConfigError("file is not valid UTF-8", file=path) from None
    except UnicodeEncodeError:
        raise ConfigError(
            "text is not valid Unicode (a lone surrogate such as \\ud800)", file=path
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON: {exc.msg}", file=path, line=exc.lineno) from None
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit limit
        raise ConfigError(f"invalid JSON: {str(exc).split(':')[0]}", file=path) from None
    except RecursionError:
        raise ConfigError("invalid JSON: nesting too deep", file=path) from None


def _str(value: Any, path: Path, field: str) -> str:
    """A text field of an imported file, or a ConfigError naming it."""
    if not isinstance(value, str):
        raise ConfigError(f"must be text, got {type(value).__name__}", file=path, field=field)
    return value


def _title(text: str, limit: int = 72) -> str:
    """A short title from the first clause of a request."""
    first = re.split(r"(?<=[.?!])\s", text.strip(), maxsplit=1)[0].rstrip(".?!")
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."


def _strip_label(text: str, label: str) -> str:
    text = text.strip()
    if text.startswith(f"{label}:"):
        text = text[len(label) + 1 :]
    return text.strip()


def _parse_transcript(text: str, path: Path, index: int) -> dict[str, Any]:
    """Split a paper few-shot transcript into conversation, response, critique and revision."""
    parts = _TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    labels = [t[0] for t in turns]
    try:
        cr = labels.index("CritiqueRequest")
    except ValueError:
        raise ConfigError(
            "few-shot transcript has no CritiqueRequest", file=path, field=f"[{index}]"
        ) from None
    head, tail = turns[:cr], dict(turns[cr:])
    needed = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")
    if any(not tail.get(k) for k in needed) or len(head) < 2 or head[-1][0] != "Assistant":
        raise ConfigError(
            "few-shot transcript is not Human/Assistant turns followed by "
            "CritiqueRequest, Critique, RevisionRequest, Revision",
            file=path,
            field=f"[{index}]",
        )
    role = {"Human": "user", "Assistant": "assistant"}
    return {
        "conversation": [{"role": role[r], "content": c} for r, c in head[:-1]],
        "response": head[-1][1],
        "critique_request": tail["CritiqueRequest"],
        "critique": tail["Critique"],
        "revision_request": tail["RevisionRequest"],
        "revision": tail["Revision"],
    }


def import_anthropic(sources: list[Path]) -> dict[str, Any]:
    """Build a constitution mapping from the CAI paper's prompt files (any subset, any order)."""
    principles: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for path in map(Path, sources):
        data = _read_json(path)
        if isinstance(data, dict) and all(
            isinstance(v, dict) and "edit_request" in v for v in data.values()
        ):
            for key, value in sorted(data.items(), key=lambda kv: _natural(kv[0])):
                prompts = value.get("prompt") or []
                if not isinstance(prompts, list) or not prompts or not isinstance(prompts[0], str):
                    raise ConfigError("entry has no critique prompt", file=path, field=key)
                critique = _strip_label(
                    _strip_label(prompts[0], "CritiqueRequest").removesuffix("Critique:"),
                    "CritiqueRequest",
                )
                edit = _str(value["edit_request"], path, f"{key}.edit_request")
                revision = _strip_label(edit.strip().removesuffix("Revision:"), "RevisionRequest")
                principles.append(
                    {
                        "id": key,
                        "title": _title(critique),
                        "tags": ["harmlessness", "critique", "cai-paper"],
                        "critique": critique,
                        "revision": revision,
                    }
                )
        elif isinstance(data, list) and data and all(isinstance(s, str) for s in data):
            if all("CritiqueRequest:" in s for s in data):  # few-shot transcripts
                examples += [_parse_transcript(s, path, i) for i, s in enumerate(data)]
            else:  # RL comparison principles
                for i, text in enumerate(data):
                    question = text.strip().removesuffix("Options:").strip()
                    principles.append(
                        {
                            "id": f"rl{i}",
                            "title": _title(question.removeprefix("Please ")),
                            "tags": ["judge", "cai-paper"],
                            "judge": question,
                        }
                    )
        elif (
            isinstance(data, list)
            and data
            and all(isinstance(s, dict) and "prompt" in s for s in data)
        ):
            raise ConfigError(
                "this is a feedback-model few-shot file (prompt/corrects/incorrects); rlaif "
                "imports critique/revision few-shots (CritiqueRevisionFewShotPrompts.json)",
                file=path,
            )
        else:
            raise ConfigError("not a CAI paper prompt file this importer knows", file=path)
    if not principles:
        raise ConfigError(
            "no principles found: include CritiqueRevisionInstructions.json and/or "
            "RLMadisonInstructions.json",
            file=str(sources[0]) if sources else "<none>",
        )
    out: dict[str, Any] = {
        "name": "anthropic-cai",
        "version": "1.0.0",
        "description": "The Constitutional AI paper's 16 critique/revision principles and 16 "
        "RL-CAI comparison principles, imported verbatim.",
        "source": _CAI_SOURCE,
        "principles": principles,
    }
    if examples:
        out["examples"] = examples
    return out


def import_llm_swarm(sources: list[Path]) -> dict[str, Any]:
    """Build a constitution mapping from llm-swarm JSON files (principles from all, in order)."""
    principles: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for path in map(Path, sources):
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("constitutions"), list):
            raise ConfigError(
                "expected an object with a 'constitutions' list", file=path, field="constitutions"
            )
        for i, item in enumerate(data["constitutions"]):
            if not isinstance(item, dict) or not {"critic", "revision"} <= set(item):
                raise ConfigError(
                    "each entry needs 'critic' and 'revision'",
                    file=path,
                    field=f"constitutions[{i}]",
                )
            critic = _str(item["critic"], path, f"constitutions[{i}].critic")
            revision = _str(item["revision"], path, f"constitutions[{i}].revision")
            principles.append(
                {
                    "id": f"{path.stem.replace('_', '-')}-{i}",
                    "title": _title(critic),
                    "tags": ["critique", "llm-swarm"],
                    "critique": critic.strip(),
                    "revision": revision.strip(),
                }
            )
        chats = data.get("system_chat") or []
        if not isinstance(chats, list):
            raise ConfigError("must be a list of chats", file=path, field="system_chat")
        for j, chat in enumerate(chats):
            ok = isinstance(chat, list) and all(isinstance(m, dict) for m in chat)
            roles = [m.get("role") for m in chat] if ok else []
            if roles != ["user", "assistant"] * 3:
                raise ConfigError(
                    "few-shot chat must be 6 turns: user, assistant (x3)",
                    file=path,
                    field=f"system_chat[{j}]",
                )
            c = [_str(m.get("content"), path, f"system_chat[{j}].content").strip() for m in chat]
            examples.append(
                {
                    "prompt": c[0],
                    "response": c[1],
                    "critique_request": c[2],
                    "critique": c[3],
                    "revision_request": c[4],
                    "revision": c[5],
                }
            )
    if not principles:
        raise ConfigError("no principles found", file=str(sources[0]) if sources else "<none>")
    out: dict[str, Any] = {
        "name": "llm-swarm-cai",
        "version": "1.0.0",
        "description": "Critique/revision pairs from Hugging Face H4's llm-swarm "
        "constitutional-ai example.",
        "source": _SWARM_SOURCE,
        "principles": principles,
    }
    if examples:
        out["examples"] = examples
    return out


def import_constitution(fmt: str, sources: list[Path]) -> dict[str, Any]:
    """Dispatch on the format name (``anthropic`` or ``llm-swarm``)."""
    if fmt == "anthropic":
        return import_anthropic(sources)
    if fmt == "llm-swarm":
        return import_llm_swarm(sources)
    raise ConfigError(f"unknown import format '{fmt}' (choose from {', '.join(FORMATS)})")


def _natural(key: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(\d+)$", key)
    return (m.group(1), int(m.group(2))) if m else (key, -1)
