"""A persistent cache of model calls: cache key -> result, as one append-only JSONL file.

Each line is ``{"key": ..., "value": ...}``. The pipeline asks the cache before calling a model
and stores every new result, so re-running a finished pipeline makes zero model calls, and a
crashed run loses at most the batch that was being written (repaired like a stage shard).

Only ``key -> byte offset`` is kept in memory; values (model text) are read back with
``pread`` on a hit. The file is ``flock``-ed while it is repaired or appended to, so several
runs may share one cache file: each sees the entries that existed when it opened it plus its
own, and lines never interleave. A key written twice keeps its first value (identical calls
give identical results, so later copies add nothing).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlaif.errors import StoreError
from rlaif.store.atomic import fsync_dir
from rlaif.store.hashing import CanonicalJSONError, canonical_json
from rlaif.store.jsonl import (
    JsonlAppender,
    JsonlReader,
    decode_line,
    encode_line,
    read_line_at,
)

__all__ = ["CallCache"]

_MISSING = object()


def _entry_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("key"), str) or "value" not in value:
        return "expected an object with a string 'key' and a 'value'"
    return None


class CallCache:
    """Cache of model-call results keyed by :func:`rlaif.store.hashing.cache_key`.

    Args:
        path: the cache file (created with its folder on first write).

    Attributes:
        hits: lookups answered from the cache.
        misses: lookups that found nothing.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        self._index: dict[str, int] = {}
        self._writer: JsonlAppender | None = None
        self._read_fd: int | None = None
        self.load()

    @contextmanager
    def _flocked(self) -> Iterator[int]:
        """Hold an exclusive lock on the cache file itself for a repair or an append."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        if not existed:
            fsync_dir(self.path.parent)  # so the new file's name survives a power cut
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing releases the lock

    def load(self) -> None:
        """(Re)read the file, repairing a torn tail left by a crash."""
        self.close()
        self._index.clear()
        if not self.path.exists():
            return
        with self._flocked():
            for offset, entry in JsonlReader(self.path, tail="repair", validate=_entry_problem):
                self._index.setdefault(entry["key"], offset)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached (does not count as a hit or a miss)."""
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def get(self, key: str, default: Any = None) -> Any:
        """The cached value for ``key`` (counted as a hit), else ``default`` (a miss)."""
        offset = self._index.get(key)
        if offset is None:
            self.misses += 1
            return default
        if self._read_fd is None:
            self._read_fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        entry = decode_line(read_line_at(self._read_fd, offset))
        self.hits += 1
        return entry["value"]

    def put_many(self, items: Mapping[str, Any]) -> int:
        """Durably store new entries with one fsync; keys already cached are skipped.

        Args:
            items: cache key -> JSON value (no NaN / Infinity).

        Returns:
            The number of entries written.

        Raises:
            StoreError: for a value that is not JSON (nothing written) or a failed write
                (the file keeps only complete lines; earlier entries stay readable).
        """
        lines: list[tuple[str, bytes]] = []
        for key, value in items.items():
            if not isinstance(key, str) or not key:
                raise StoreError(f"cache key must be a non-empty string, got {key!r}")
            if key in self._index:
                continue
            entry = {"key": key, "value": value}
            try:
                data = encode_line(entry)
            except (ValueError, TypeError) as exc:
                try:
                    canonical_json(value)  # re-walk to name the offending path
                except CanonicalJSONError as located:
                    raise StoreError(f"cache value for {key}: {located.message}") from exc
                raise StoreError(f"cache value for {key} is not JSON: {exc}") from exc
            lines.append((key, data))
        if not lines:
            return 0
        with self._flocked():
            if self._writer is None:
                self._writer = JsonlAppender(self.path)
            offset = self._writer.append(b"".join(data for _, data in lines))
        for key, data in lines:
            self._index.setdefault(key, offset)
            offset += len(data)
        return len(lines)

    def put(self, key: str, value: Any) -> None:
        """Store one entry (one fsync); prefer :meth:`put_many` for batches."""
        self.put_many({key: value})

    @property
    def stats(self) -> dict[str, int]:
        """``{"entries", "hits", "misses"}`` for logs and the manifest."""
        return {"entries": len(self._index), "hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        """Close open files (idempotent); the cache can still be used and reopens them."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
