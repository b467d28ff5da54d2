"""A persistent cache of model calls: cache key -> result, as one append-only JSONL file.

Each line is ``{"key": ..., "value": ...}``. The pipeline asks the cache before calling a model
and stores every new result, so re-running a finished pipeline makes zero model calls, and a
crashed run loses at most the batch that was being written (repaired like a stage shard).

``key -> byte offset`` lives in an SQLite index beside the file (``calls.index.sqlite`` for
``calls.jsonl``, see :mod:`rlaif.store.index`), not in memory; values (model text) are read
back with ``pread`` on a hit. The file is ``flock``-ed while it is repaired or appended to and
while the index is written, so several runs may share one cache file: lines never interleave,
and each sees its own entries plus those the others had written when it opened it (and,
through the shared index, those they flushed since: index rows are buffered up to
:data:`rlaif.store.index.FLUSH` entries and written at close; before each append a process
indexes whatever others appended, so no key is written twice). A key written twice keeps its first
value (identical calls give identical results, so later copies add nothing). Ask for a batch
with :meth:`CallCache.get_many` / :meth:`CallCache.contains_many`: one query per batch.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from rlaif.errors import StoreError
from rlaif.store.atomic import fsync_dir
from rlaif.store.hashing import CanonicalJSONError, canonical_json
from rlaif.store.index import Index, pack, unpack
from rlaif.store.jsonl import JsonlAppender, decode_line, encode_keyed_line, read_line_at

__all__ = ["CallCache"]

_T = TypeVar("_T")
_MISSING = object()


class _Mismatch(Exception):
    """The index pointed at a line that is not the key's entry (a damaged index)."""


def _entry_problem(value: Any) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("key"), str) or "value" not in value:
        return "expected an object with a string 'key' and a 'value'"
    return None


def _key(entry: dict[str, Any]) -> tuple[str, int]:
    return entry["key"], 0


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
        self.index_path = self.path.with_name(self.path.stem + ".index.sqlite")
        self.hits = 0
        self.misses = 0
        self._ix: Index | None = None
        self._known_end = self._known_lines = 0  # see _sync
        self._writer: JsonlAppender | None = None
        self._read_fd: int | None = None
        self.load()

    @contextmanager
    def _flocked(self) -> Iterator[int]:
        """Hold an exclusive lock on the cache file itself for a repair, an append or an
        index rebuild."""
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
        """(Re)open the index and catch it up with the file, repairing a torn tail."""
        self.close()
        if self.path.exists():
            with self._flocked():
                self._sync(None)

    def _sync(self, reason: str | None, fd: int | None = None) -> bool:
        """Under the flock: (re)open the index if needed, rebuild it when it cannot be used
        (or ``reason`` says so), and index the file's tail (after writing what this object
        buffered). ``fd``, the flock's descriptor, allows a fast path when nobody else wrote:
        everything before :attr:`_known_end` is in the index or in this object's buffer.
        Returns whether it was taken (nothing changed since this object last looked)."""
        try:
            if self._ix is not None and reason is None:
                try:
                    if os.stat(self._ix.path).st_ino != self._ix.inode:  # type: ignore[arg-type]
                        reason = "replaced by another process"
                except FileNotFoundError:
                    reason = "removed by another process"
                if reason is not None:
                    self._ix.close()
                    self._ix = None
                elif fd is not None and os.fstat(fd).st_size == self._known_end:
                    return True
            if self._ix is None:
                self._ix = Index(self.index_path, "cache", buffered=True)
                reason = reason or self._ix.open()
            self._ix.flush()  # our rows and coverage first: then only others' lines are new
            reason = reason or self._ix.stale({0: self.path})
            if reason is not None:
                self._ix.reset(reason, quiet=self.path.stat().st_size == 0)
            reader = self._ix.catch_up(
                0, self.path, tail="repair", validate=_entry_problem, key=_key, newest=False
            )
            self._known_end, self._known_lines = reader.end, reader.lines
            return False
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use the index: {exc}", file=self.index_path) from exc

    def _q(self, fn: Callable[[Index], _T], empty: _T) -> _T:
        """Run an index query; a damaged index is rebuilt from the file and asked again."""
        if self._ix is None:
            if not self.path.exists():
                return empty
            with self._flocked():
                self._sync(None)
        assert self._ix is not None
        try:
            return fn(self._ix)
        except (sqlite3.DatabaseError, _Mismatch) as exc:
            with self._flocked():
                self._sync(f"unreadable: {exc}")
            try:
                return fn(self._ix)
            except _Mismatch as again:
                raise StoreError(f"cache file does not match its rebuilt index: {again}") from again

    def _read(self, key: str, loc: int) -> Any:
        _, offset, _ = unpack(loc)
        if self._read_fd is None:
            self._read_fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            entry = decode_line(read_line_at(self._read_fd, offset))
        except ValueError as exc:
            raise _Mismatch(f"no entry for {key} at byte {offset}") from exc
        if not isinstance(entry, dict) or entry.get("key") != key:
            raise _Mismatch(f"no entry for {key} at byte {offset}")
        return entry["value"]

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached (does not count as a hit or a miss)."""
        if not isinstance(key, str):
            return False
        return self._q(lambda ix: ix.loc(key), None) is not None

    def contains_many(self, keys: Iterable[str]) -> set[str]:
        """The keys among ``keys`` that are cached (not counted as hits or misses)."""
        keys = list(keys)
        return set(self._q(lambda ix: ix.locs(keys), {}))

    def __len__(self) -> int:
        """Entries in the cache (a counter kept in the index)."""
        self._flush()  # exact even when another process indexed some of our entries
        return self._q(lambda ix: ix.counts()[0], 0)

    def _flush(self) -> None:
        """Write the buffered index rows (under the flock, like every index write)."""
        if self._ix is not None and self._ix.dirty:
            with self._flocked():
                try:
                    self._ix.flush()
                except (sqlite3.Error, OSError):
                    self._ix.close()  # the rows are in the file: caught up at the next use
                    self._ix = None

    def get(self, key: str, default: Any = None) -> Any:
        """The cached value for ``key`` (counted as a hit), else ``default`` (a miss)."""

        def fetch(ix: Index) -> Any:
            loc = ix.loc(key)
            return _MISSING if loc is None else self._read(key, loc)

        try:  # the common case without the retry wrapper; a damaged index goes through _q
            value = fetch(self._ix) if self._ix is not None else self._q(fetch, _MISSING)
        except (sqlite3.DatabaseError, _Mismatch):
            value = self._q(fetch, _MISSING)
        if value is _MISSING:
            self.misses += 1
            return default
        self.hits += 1
        return value

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """``key -> value`` for the cached keys among ``keys``: one index query per batch.

        Each distinct key counts as one hit or one miss, as with :meth:`get`.
        """
        keys = list(dict.fromkeys(keys))

        def fetch(ix: Index) -> dict[str, Any]:
            found = sorted((loc, key) for key, loc in ix.locs(keys).items())
            return {key: self._read(key, loc) for loc, key in found}

        values = self._q(fetch, {})
        self.hits += len(values)
        self.misses += len(keys) - len(values)
        return {key: values[key] for key in keys if key in values}

    def put_many(self, items: Mapping[str, Any], *, looked_up: bool = False) -> int:
        """Durably store new entries with one fsync; keys already cached are skipped.

        Args:
            items: cache key -> JSON value (no NaN / Infinity).
            looked_up: the caller asked :meth:`get_many` for these keys and got none of them,
                and this object has written none of them since: the index is not asked
                again. Entries another process appended meanwhile are still found (the
                file's end is checked under the lock).

        Returns:
            The number of entries written.

        Raises:
            StoreError: for a value that is not JSON (nothing written) or a failed write
                (the file keeps only complete lines; earlier entries stay readable).
        """
        for key in items:
            if not isinstance(key, str) or not key:
                raise StoreError(f"cache key must be a non-empty string, got {key!r}")
        cached = set() if looked_up else self.contains_many(items)
        lines: list[tuple[str, bytes]] = []
        for key, value in items.items():
            if key in cached:
                continue
            try:
                data = encode_keyed_line(key, value)
            except (ValueError, TypeError) as exc:
                try:
                    canonical_json(value)  # re-walk to name the offending path
                except CanonicalJSONError as located:
                    raise StoreError(f"cache value for {key}: {located.message}") from exc
                raise StoreError(f"cache value for {key} is not JSON: {exc}") from exc
            lines.append((key, data))
        if not lines:
            return 0
        with self._flocked() as fd:
            if not self._sync(None, fd):  # another process appended meanwhile: ask again
                assert self._ix is not None
                present = self._ix.locs(key for key, _ in lines)
                lines = [(key, data) for key, data in lines if key not in present]
            assert self._ix is not None
            if not lines:
                return 0
            if self._writer is None:
                self._writer = JsonlAppender(self.path)
            offset = self._writer.append(b"".join(data for _, data in lines))
            entries = []
            for key, data in lines:
                entries.append((key, pack(0, offset, 0)))
                offset += len(data)
            self._known_end, self._known_lines = offset, self._known_lines + len(lines)
            try:  # buffered: written in one sorted transaction every FLUSH entries
                self._ix.apply(entries, newest=False, prior={})
                self._ix.set_coverage(0, self.path, offset, self._known_lines)
            except (sqlite3.Error, OSError) as exc:
                self._ix.close()
                self._ix = None  # reopened and caught up from the file on the next use
                raise StoreError(
                    f"entries were written but the index could not be updated ({exc}); "
                    "they are kept and indexed on the next use",
                    file=self.index_path,
                ) from exc
        return len(lines)

    def put(self, key: str, value: Any) -> None:
        """Store one entry (one fsync); prefer :meth:`put_many` for batches."""
        self.put_many({key: value})

    @property
    def stats(self) -> dict[str, int]:
        """``{"entries", "hits", "misses"}`` for logs and the manifest."""
        return {"entries": len(self), "hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        """Close open files and the index (idempotent); the cache can still be used and
        reopens them."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None
        self._flush()
        if self._ix is not None:
            self._ix.close()
            self._ix = None

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
