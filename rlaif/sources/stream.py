"""A pipeline's prompts as a stream: memory bounded by one wave, not by the prompt set.

:func:`open_prompt_stream` opens a pipeline's ``prompts:`` section without keeping its prompts:
:meth:`PromptStream.scan` reads the source once to check every row and count the prompts (so
bad input still fails before any model runs), and every :meth:`PromptStream.waves` pass reads
it again, a wave at a time. What stays in memory is one 16-byte digest per prompt id during a
pass (to find duplicates) and the rows left out (duplicates), never the prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

    def _entries(self) -> Iterator[PromptItem | dict[str, Any]]:
        return iter_prompts(self.rows(), self.file, self.field, self.id_field, self.offset,
                            self.limit, self.label_field)  # fmt: skip

    def scan(self) -> PromptStream:
        """Read the whole source once: check every row, count prompts, note duplicates.

        Raises:
            DataError: a malformed row (file, line, column), or no prompt at all.
        """
        count, skipped = 0, []
        for entry in self._entries():
            if isinstance(entry, PromptItem):
                count += 1
            else:
                skipped.append(entry)
        if not count:
            raise DataError("no prompts found", file=self.file, field="prompts.path")
        self.count, self.skipped = count, skipped
        return self

    def __iter__(self) -> Iterator[PromptItem]:
        for entry in self._entries():
            if isinstance(entry, PromptItem):
                yield entry

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
