"""A pipeline's prompts as a stream: memory bounded by one wave, not by the prompt set.

:func:`open_prompt_stream` opens a pipeline's ``prompts:`` section without keeping its prompts:
:meth:`PromptStream.scan` reads the source once to check every row and count the prompts (so
bad input still fails before any model runs), and every :meth:`PromptStream.waves` pass reads
it again, a wave at a time. What stays in memory is the rows left out (duplicates) and, while
:meth:`PromptStream.scan` runs, 8 bytes per prompt; never the prompts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rlaif.errors import DataError
from rlaif.sources import (
    DatasetSpec,
    PromptItem,
    _rows_csv,
    _rows_jsonl,
    _rows_table,
    dataset_spec,
    detect_format,
    file_revision,
    iter_prompts,
    resolve_dataset,
)

if TYPE_CHECKING:
    from rlaif.config.schema import PipelineConfig

__all__ = ["PromptStream", "open_prompt_stream"]


def _hash64(pid: str) -> int:
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class PromptStream:
    """The prompts of one source, read again on every pass.

    Attributes:
        source: the source's provenance (path or dataset, ``revision``, offset, limit).
        count: prompts kept (after :meth:`scan`).
        skipped: rows left out with a reason (after :meth:`scan`).
    """

    rows: Callable[[], Iterator[tuple[int, Any]]]
    file: str
    field: str
    id_field: str | None
    offset: int
    limit: int | None
    label_field: str | None
    source: dict[str, Any]
    count: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def _items(self) -> Iterator[PromptItem]:
        return iter_prompts(self.rows(), self.file, self.field, self.id_field, self.offset,
                            self.limit, self.label_field, dedup=False)  # type: ignore[return-value]  # fmt: skip

    def scan(self) -> PromptStream:
        """Read the whole source once: check every row, count prompts, note duplicates.

        Duplicates are found without a set of ids: an 8-byte hash per row goes into an array
        (8 bytes a prompt), rows whose hash repeats are read again to compare their ids, and
        every later row with an id seen before is left out (the first one is kept).

        Raises:
            DataError: a malformed row (file, line, column), or no prompt at all.
        """
        hashes = array("Q")
        for item in self._items():
            hashes.append(_hash64(item.id))
        if not hashes:
            raise DataError("no prompts found", file=self.file, field="prompts.path")
        h = np.frombuffer(hashes, dtype=np.uint64)
        values, counts = np.unique(h, return_counts=True)
        repeated = set(values[counts > 1].tolist())
        del h, values, counts
        skipped, seen = [], set()
        if repeated:
            for item in self._items():
                if _hash64(item.id) in repeated:
                    if item.id in seen:
                        skipped.append({"id": item.id, "row": item.row,
                                        "reason": "duplicate prompt"})  # fmt: skip
                    seen.add(item.id)
        self.count, self.skipped = len(hashes) - len(skipped), skipped
        return self

    def __iter__(self) -> Iterator[PromptItem]:
        """The prompts kept by :meth:`scan`, in source order (call :meth:`scan` first)."""
        left_out = {r["row"] for r in self.skipped}
        for item in self._items():
            if item.row not in left_out:
                yield item

    def waves(self, size: int) -> Iterator[list[PromptItem]]:
        """The prompts in source order, ``size`` at a time (the last wave may be shorter)."""
        wave: list[PromptItem] = []
        for item in self:
            wave.append(item)
            if len(wave) == size:
                yield wave
                wave = []
        if wave:
            yield wave


def open_prompt_stream(cfg: PipelineConfig) -> PromptStream:
    """The prompt stream of a pipeline's ``prompts:`` section (paths relative to the pipeline
    file), not yet scanned: the same prompts, in the same order, as
    :func:`rlaif.sources.read_prompt_set`."""
    p = cfg.prompts
    spec = dataset_spec(p, cfg.resolve_path)
    source: dict[str, Any] = {}
    if spec is None:
        path = cfg.resolve_path(p.path)
        if not path.exists():
            raise DataError("prompt source not found", file=path, field="prompts.path")
        fmt = detect_format(path) if p.format == "auto" else p.format
        source = {"path": p.path, "revision": file_revision(path), "offset": p.offset,
                  "limit": p.limit}  # fmt: skip
        if fmt != "dataset":
            rows = {
                "jsonl": lambda: _rows_jsonl(path),
                "csv": lambda: _rows_csv(path),
            }.get(fmt, lambda: _rows_table(path, fmt, p.split))
            return PromptStream(rows, str(path), p.field, p.id_field, p.offset, p.limit,
                                p.label_field, source)  # fmt: skip
        spec = DatasetSpec(str(path), str(path.resolve()), True, split=p.split)
    ds = resolve_dataset(spec)
    columns = list(dict.fromkeys(c for c in (p.field, p.id_field, p.label_field) if c))
    source = source or {**ds.provenance(), "offset": p.offset, "limit": p.limit}
    return PromptStream(lambda: ds.rows(p.offset, columns), ds.label, p.field, p.id_field, 0,
                        p.limit, p.label_field, source)  # fmt: skip
