"""Prompt sources: JSONL, CSV, Parquet, ``datasets.load_from_disk`` folders, and datasets by
name (a Hugging Face Hub dataset or a local folder laid out as one, :mod:`rlaif.sources.hub`).

Each row becomes a :class:`PromptItem`: a stable id and a conversation that ends with a user
turn. The prompt column may hold plain text, a list of ``{role, content}`` messages, or an
HH-RLHF transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), whose last assistant reply is
dropped so the model answers the last human turn.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.errors import DataError
from rlaif.sources.hub import (
    DatasetSpec,
    ResolvedDataset,
    dataset_spec,
    file_revision,
    is_dataset_repo,
    resolve_dataset,
)
from rlaif.store.hashing import content_hash

if TYPE_CHECKING:
    from rlaif.config.schema import PipelineConfig

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
# A lone UTF-16 surrogate (JSON's "\\ud800") decodes to a str no file or tokenizer can encode;
# such a prompt would fail only when its record is written, so it is refused here.
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_LINE = 16 * 1024 * 1024  # a JSONL row larger than this is refused, not loaded


@dataclass(frozen=True)
class PromptItem:
    """One prompt: ``id`` is the source's id column, or a hash of the conversation."""

    id: str
    conversation: tuple[tuple[str, str], ...]
    row: int  # 1-based row (or line) in the source, for messages
    label: str | None = None  # the label column's value (harmful, safe, ...), for rule checks

    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.conversation]


def parse_hh(text: str) -> list[tuple[str, str]]:
    """Split an HH-RLHF transcript into (role, content) turns."""
    parts = _HH_TURN.split(text if text.startswith("\n\n") else "\n\n" + text)
    role = {"Human": "user", "Assistant": "assistant"}
    return [(role[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def to_conversation(value: Any, where: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """Turn a prompt cell into a conversation ending with a user turn."""
    if isinstance(value, str):
        if "\n\nHuman:" in value or value.startswith("Human:"):
            turns = parse_hh(value)
            while turns and turns[-1][0] == "assistant":
                turns.pop()
        else:
            turns = [("user", value.strip())]
    elif isinstance(value, (list, tuple)):
        turns = []
        for m in value:
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("content"), str)
                or m.get("role") not in ("system", "user", "assistant")
            ):
                raise DataError(
                    "messages must be {role, content} with role system/user/assistant", **where
                )
            turns.append((m["role"], m["content"]))
        while turns and turns[-1][0] == "assistant":
            turns.pop()
    else:
        raise DataError(
            f"prompt must be text or a list of messages, got {type(value).__name__}", **where
        )
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise DataError("prompt is empty or has no user turn", **where)
    if any(_SURROGATE.search(c) for _, c in turns):
        raise DataError("prompt is not valid Unicode (a lone surrogate such as \\ud800)", **where)
    return tuple(turns)


def _open(path: Path, **kwargs: Any) -> Any:
    try:
        return path.open(**kwargs)
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", file=path) from None


def _rows_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with _open(path, mode="rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if len(raw) > _MAX_LINE:
                raise DataError(f"line longer than {_MAX_LINE} bytes", file=path, line=n)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("line is not valid UTF-8", file=path, line=n) from None
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON: {exc.msg}", file=path, line=n) from None
            except ValueError as exc:  # e.g. an integer past Python's 4300-digit limit
                msg = str(exc).split(":")[0]
                raise DataError(f"invalid JSON: {msg}", file=path, line=n) from None
            except RecursionError:
                raise DataError("invalid JSON: nesting too deep", file=path, line=n) from None
            yield n, value


def _rows_csv(path: Path) -> Iterator[tuple[int, Any]]:
    reader = None
    try:
        with _open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError:
        raise DataError("file is not valid UTF-8", file=path) from None
    except csv.Error as exc:
        line = reader.line_num if reader is not None and reader.line_num else None
        raise DataError(f"invalid CSV: {exc}", file=path, line=line) from None


def _rows_table(path: Path, fmt: str, split: str | None) -> Iterator[tuple[int, Any]]:
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            rows = table.to_pylist()
        else:
            import datasets

            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split is None:
                    split = "train" if "train" in ds else next(iter(ds))
                if split not in ds:
                    raise DataError(
                        f"no split '{split}' (has: {', '.join(ds)})",
                        file=path,
                        field="prompts.split",
                    )
                ds = ds[split]
            rows = iter(ds)
        # Rows of a save_to_disk folder are read lazily, so a damaged shard fails here.
        yield from enumerate(rows, start=1)
    except DataError:
        raise
    except Exception as exc:  # pyarrow / datasets raise many types for a bad file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read {fmt} data: {first}", file=path) from None


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "dataset" if is_dataset_repo(path) else "disk"
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(
        suffix, "jsonl"
    )


@dataclass
class PromptSet:
    """Prompts read from a source, the rows left out, and where they came from.

    Attributes:
        items: the prompts, in source order.
        skipped: rows left out with a reason (duplicates), so every input is accounted for.
        source: the source's provenance: a prompt file's ``path``, or a dataset's name,
            config and split; and the ``revision`` read: the Hub commit, or
            ``sha256:<hash>`` of the file or of a local folder's data files.
    """

    items: list[PromptItem]
    skipped: list[dict[str, Any]]
    source: dict[str, Any]


def read_prompts(
    path: Path,
    *,
    fmt: str = "auto",
    field: str = "prompt",
    id_field: str | None = None,
    split: str | None = None,
    offset: int = 0,
    limit: int | None = None,
    label_field: str | None = None,
) -> tuple[list[PromptItem], list[dict[str, Any]]]:
    """Read prompts and return ``(items, skipped)``.

    ``skipped`` lists rows left out with a reason (duplicates), so every input is accounted
    for. Malformed rows raise :class:`DataError` naming file, line and column; so does a row
    without a ``label_field`` value, when one is named. A folder that is not a
    ``save_to_disk`` folder but has a README, a ``data/`` folder or data files is read as a
    dataset repository (:mod:`rlaif.sources.hub`).
    """
    if not path.exists():
        raise DataError("prompt source not found", file=path, field="prompts.path")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "dataset":
        spec = DatasetSpec(str(path), str(path.resolve()), True, split=split)
        found = read_dataset(resolve_dataset(spec), field=field, id_field=id_field,
                             offset=offset, limit=limit, label_field=label_field)  # fmt: skip
        return found.items, found.skipped
    if fmt == "jsonl":
        rows = _rows_jsonl(path)
    elif fmt == "csv":
        rows = _rows_csv(path)
    else:
        rows = _rows_table(path, fmt, split)
    return _collect(rows, str(path), field, id_field, offset, limit, label_field)


def read_dataset(
    ds: ResolvedDataset,
    *,
    field: str = "prompt",
    id_field: str | None = None,
    offset: int = 0,
    limit: int | None = None,
    label_field: str | None = None,
) -> PromptSet:
    """Read prompts from a dataset (see :func:`read_prompts`); only the rows up to ``offset``
    plus ``limit`` are read, and with ``streaming`` nothing else is loaded."""
    columns = list(dict.fromkeys(c for c in (field, id_field, label_field) if c))
    rows = ds.rows(offset, columns)
    items, skipped = _collect(rows, ds.label, field, id_field, 0, limit, label_field)
    return PromptSet(items, skipped, {**ds.provenance(), "offset": offset, "limit": limit})


def iter_prompts(
    rows: Iterator[tuple[int, Any]],
    file: str,
    field: str,
    id_field: str | None,
    offset: int,
    limit: int | None,
    label_field: str | None,
    *,
    dedup: bool = True,
) -> Iterator[PromptItem | dict[str, Any]]:
    """Rows to prompt items, one at a time: the first ``offset`` rows left out, at most
    ``limit`` rows taken (duplicates count), each row checked; a duplicate id is yielded as a
    skipped row ``{"id", "row", "reason"}``. Memory: one 16-byte digest per id seen (none
    with ``dedup=False``, which yields every row as an item)."""
    seen: set[bytes] = set()
    taken = 0
    index = -1
    for line, row in rows:
        index += 1
        if index < offset:
            continue
        if limit is not None and taken >= limit:
            break
        taken += 1
        where = {"file": file, "line": line, "field": field}
        if not isinstance(row, dict):
            raise DataError("row is not an object", file=file, line=line)
        if field not in row:
            cols = ", ".join(map(str, row)) or "none"
            raise DataError(f"no column '{field}' (columns: {cols}); set prompts.field", **where)
        conversation = to_conversation(row[field], where)
        if id_field:
            if row.get(id_field) in (None, ""):
                raise DataError(
                    f"empty id column '{id_field}'", file=file, line=line, field=id_field
                )
            pid = str(row[id_field])
            if _SURROGATE.search(pid):
                raise DataError("id is not valid Unicode (a lone surrogate such as \\ud800)",
                                file=file, line=line, field=id_field)  # fmt: skip
        else:
            pid = content_hash([list(t) for t in conversation])[:16]
        if dedup:
            digest = hashlib.blake2b(pid.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                yield {"id": pid, "row": line, "reason": "duplicate prompt"}
                continue
            seen.add(digest)
        label = None
        if label_field:
            if row.get(label_field) in (None, ""):
                raise DataError(f"empty label column '{label_field}'", file=file, line=line,
                                field=label_field)  # fmt: skip
            label = str(row[label_field])
            if _SURROGATE.search(label):
                raise DataError("label is not valid Unicode (a lone surrogate such as \\ud800)",
                                file=file, line=line, field=label_field)  # fmt: skip
        yield PromptItem(id=pid, conversation=conversation, row=line, label=label)


def _collect(
    rows: Iterator[tuple[int, Any]],
    file: str,
    field: str,
    id_field: str | None,
    offset: int,
    limit: int | None,
    label_field: str | None,
) -> tuple[list[PromptItem], list[dict[str, Any]]]:
    """Rows to prompt items: the first ``offset`` rows left out, at most ``limit`` rows
    taken (duplicates count), each row checked."""
    items: list[PromptItem] = []
    skipped: list[dict[str, Any]] = []
    for entry in iter_prompts(rows, file, field, id_field, offset, limit, label_field):
        (items if isinstance(entry, PromptItem) else skipped).append(entry)
    if not items:
        raise DataError("no prompts found", file=file, field="prompts.path")
    return items, skipped


def read_prompt_set(cfg: PipelineConfig) -> PromptSet:
    """The prompts of a pipeline's ``prompts:`` section (paths relative to the pipeline
    file), with their source's provenance."""
    p = cfg.prompts
    spec = dataset_spec(p, cfg.resolve_path)
    if spec is not None:
        return read_dataset(resolve_dataset(spec), field=p.field, id_field=p.id_field,
                            offset=p.offset, limit=p.limit, label_field=p.label_field)  # fmt: skip
    path = cfg.resolve_path(p.path)
    items, skipped = read_prompts(
        path,
        fmt=p.format,
        field=p.field,
        id_field=p.id_field,
        split=p.split,
        offset=p.offset,
        limit=p.limit,
        label_field=p.label_field,
    )
    source = {"path": p.path, "revision": file_revision(path), "offset": p.offset, "limit": p.limit}
    return PromptSet(items, skipped, source)


def read_pipeline_prompts(cfg: PipelineConfig) -> tuple[list[PromptItem], list[dict[str, Any]]]:
    """:func:`read_prompts` over a pipeline's ``prompts:`` section (its path relative to the
    pipeline file)."""
    found = read_prompt_set(cfg)
    return found.items, found.skipped


def check_prompt_source(cfg: PipelineConfig) -> None:
    """Check a pipeline's ``prompts:`` section without reading prompts: for a dataset, that
    its options fit, and that the dataset, config and split exist (a Hub name is resolved,
    or found in the datasets cache).

    Raises:
        DataError: naming the field (``prompts.dataset``, ``prompts.split``, ...).
    """
    spec = dataset_spec(cfg.prompts, cfg.resolve_path)
    if spec is not None:
        resolve_dataset(spec)


def dataset_provenance(cfg: PipelineConfig) -> dict[str, Any] | None:
    """A ``prompts:`` dataset's provenance (with its resolved revision), without reading
    prompts; None for a prompt file."""
    spec = dataset_spec(cfg.prompts, cfg.resolve_path)
    return None if spec is None else resolve_dataset(spec).provenance()
