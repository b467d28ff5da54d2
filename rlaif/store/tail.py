"""Reading a JSONL file from a byte offset: what an index does not cover yet.

Split from :mod:`rlaif.store.index`: a reader that starts mid-file (at a line boundary an
index recorded) with the same torn-tail rules as :class:`~rlaif.store.jsonl.JsonlReader`, and
the few bytes an index keeps to notice that a file was replaced.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rlaif.errors import StoreError
from rlaif.store.jsonl import JsonlReader, TailPolicy

__all__ = ["TailReader", "signature"]

_SIG = 64  # bytes at each end of the covered prefix kept to notice a replaced file


class TailReader(JsonlReader):
    """A :class:`JsonlReader` that starts at byte ``start`` (line ``start_line + 1``).

    ``start`` must be a line boundary (an index's covered length); lines from ``stop`` on
    (a line boundary too) are not read. :attr:`end` and :attr:`lines` count from the start
    of the file.
    """

    def __init__(
        self,
        path: Path,
        *,
        start: int = 0,
        start_line: int = 0,
        tail: TailPolicy = "repair",
        validate: Callable[[Any], str | None] | None = None,
        stop: int | None = None,
    ) -> None:
        super().__init__(path, tail=tail, validate=validate)
        self.stop = stop
        self.start = self.end = start
        self.lines = start_line

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed in finally; generator body
        except FileNotFoundError:
            return
        bad: tuple[int, int, str] | None = None
        offset = self.start
        try:
            fh.seek(offset)
            for lineno, raw in enumerate(fh, start=self.lines + 1):
                if self.stop is not None and offset >= self.stop:
                    break
                value, problem = self._parse(raw)
                if problem is None and bad is not None:
                    raise StoreError(
                        f"corrupt record store line: {bad[2]}; fix or remove that line",
                        file=self.path,
                        line=bad[1],
                    )
                if problem is not None:
                    if bad is None:
                        bad = (offset, lineno, problem)
                else:
                    self.end = offset + len(raw)
                    self.lines += 1
                    yield offset, value
                offset += len(raw)
        finally:
            fh.close()
        if bad is not None:
            self._handle_tail(bad, offset)


def signature(path: Path, covered: int, fd: int | None = None) -> tuple[bytes, bytes, int, int]:
    """``(head, tail, mtime_ns, size)`` of a file whose first ``covered`` bytes are indexed
    (read through ``fd`` when given, an open descriptor of ``path``)."""
    if fd is None:
        with open(path, "rb") as fh:
            return signature(path, covered, fh.fileno())
    st = os.fstat(fd)
    n = min(_SIG, covered)
    return os.pread(fd, n, 0), os.pread(fd, n, covered - n), st.st_mtime_ns, st.st_size
