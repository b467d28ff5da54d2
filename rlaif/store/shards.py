"""Append-only, crash-safe storage of one stage's records as rolling JSONL shards.

Layout: ``run_dir/stages/<stage>/shard-00000.jsonl``, ``shard-00001.jsonl``, ... Each line is
one record (a JSON object with at least ``id`` and ``status``). Nothing is ever rewritten in
place; a resumed run appends only what is not done yet.

Resume policy (``retry_errors``):
    A record is *done* when its id has a record with status ``ok`` or ``skipped`` (and also
    ``error`` when ``retry_errors=False``). :meth:`StageStore.append` writes exactly the
    records whose id is not done and drops the rest, so re-running never duplicates work.
    With the default ``retry_errors=True`` an ``error`` record is therefore superseded by the
    next record for its id (a retried success, or a fresh error with a new reason); the old
    line stays on disk as history, and every read returns the newest record for an id.

Memory: runs reach ~1e6 records, and records carry model text, so records are not kept in
memory, nor is a per-record index: ``id -> (shard, byte offset, status)`` lives in
``index.sqlite`` in the stage folder (see :mod:`rlaif.store.index`), with a capped page cache,
and a record is read from disk with ``pread`` when asked for. Reopening a stage parses only
the lines the index does not cover yet. Use the batch queries (:meth:`StageStore.done_many`,
:meth:`StageStore.get_many`, :meth:`StageStore.status_many`, :meth:`StageStore.pending`)
to pay one query per batch instead of one per id.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from rlaif.errors import StoreError
from rlaif.store.atomic import fsync_dir
from rlaif.store.index import MAX_FILE_NUMBER, Index, Moved, log, pack, unpack
from rlaif.store.jsonl import JsonlAppender, decode_line, read_line_at
from rlaif.store.lock import FileLock
from rlaif.store.records import CODE, STATUSES, encode_record, record_problem

__all__ = ["DEFAULT_SHARD_SIZE", "INDEX_NAME", "STATUSES", "StageStore"]


DEFAULT_SHARD_SIZE = 10_000
INDEX_NAME = "index.sqlite"

_ERROR, _OK = CODE["error"], CODE["ok"]
_SHARD_RE = re.compile(r"^shard-(\d+)\.jsonl$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ITER_CHUNK = 512  # lines checked against the index per query while streaming
_T = TypeVar("_T")


class _Mismatch(Exception):
    """The index pointed at a line that is not the id's record (a damaged index)."""


def _loc_of(rid: str) -> Callable[[Index], int | None]:
    return lambda ix: ix.loc(rid)


def _key(record: dict[str, Any]) -> tuple[str, int]:
    return record["id"], CODE[record["status"]]


class StageStore:
    """The records of one stage of one run.

    Args:
        run_dir: the run directory.
        stage: stage name (letters, digits, ``_ . -``); it names the folder.
        shard_size: records per shard file before rolling to the next one.
        retry_errors: whether ``error`` records are redone on resume (see module docs).
        readonly: open for reading only: no shard is created, repaired, locked or written, nor
            the index. Use it to read a stage while another process (or object) writes it; it
            sees the records committed when it was loaded (call :meth:`load` to refresh).

    A store object is not thread-safe; one thread appends (one process, via the stage lock).

    Raises:
        StoreError: when the stage is open for writing elsewhere, or a shard is corrupt.
    """

    def __init__(
        self,
        run_dir: Path,
        stage: str,
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        retry_errors: bool = True,
        readonly: bool = False,
    ) -> None:
        if not isinstance(stage, str) or not _STAGE_RE.match(stage):
            raise StoreError(f"invalid stage name {stage!r}", field="stage")
        if shard_size < 1:
            raise StoreError(f"shard_size must be >= 1, got {shard_size}", field="shard_size")
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.path = self.run_dir / "stages" / stage
        self.shard_size = shard_size
        self.retry_errors = retry_errors
        self.readonly = readonly
        self._ix: Index | None = None
        self._stale = False  # an index write failed: recover from the JSONL before use
        self._memo: tuple[str, int | None] | None = None  # the last single lookup
        self._shards: list[Path] = []
        self._nums: list[int] = []  # shard numbers (from the file names), in order
        self._pos: dict[int, int] = {}  # shard number -> position in _shards
        self._ends: list[int] = []  # bytes of committed lines per shard
        self._last_lines = 0  # lines (all versions) in the last shard, for rolling
        self._writer: JsonlAppender | None = None
        self._read_fds: dict[int, int] = {}
        self._lock: FileLock | None = None
        if not readonly:
            # One writer per stage: two writers would each miss the other's ids and duplicate.
            self._lock = FileLock(self.path / ".lock", f"stage '{stage}' of run dir {self.run_dir}")
            if not self.path.exists():
                self.path.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.path.parent)
            self._lock.acquire()
        try:
            self.load()
        except BaseException:
            self.close()
            raise

    # -- reading the disk ---------------------------------------------------------------

    def _shard_files(self) -> list[tuple[int, Path]]:
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                if int(m.group(1)) > MAX_FILE_NUMBER:
                    raise StoreError("shard number too large", file=p)
                found.append((int(m.group(1)), p))
        return sorted(found)

    def load(self) -> None:
        """(Re)open the index and index what it does not cover yet, repairing a torn last line.

        A missing, stale or unreadable index is rebuilt from the shards (one log line).
        """
        self._close_files()
        found = self._shard_files()
        self._nums = [n for n, _ in found]
        self._shards = [p for _, p in found]
        self._pos = {n: i for i, n in enumerate(self._nums)}
        self._attach(self.readonly)

    def _attach(
        self, readonly: bool, reason: str | None = None, upto: list[int] | None = None
    ) -> None:
        """Open the index (rebuilt when unusable or ``reason`` says so), then index every
        shard's lines beyond its coverage (up to ``upto`` bytes per shard) and note the
        committed ends."""
        if self._ix is not None:
            self._ix.close()
        self._memo = None
        ix = self._ix = Index(
            self.path / INDEX_NAME, "stage", readonly=readonly, buffered=not readonly
        )
        try:
            files = dict(zip(self._nums, self._shards, strict=True))
            reason = reason or ix.open() or ix.stale(files)
            if reason is not None:
                ix.reset(reason, quiet=not self._shards or upto is not None)
            self._ends, self._last_lines = [], 0
            for i, (n, shard) in enumerate(files.items()):
                last = i == len(files) - 1
                # Only the last shard can hold an unfinished batch: a shard is fsynced before
                # the next one is created, so a torn line anywhere else is corruption.
                tail = ("ignore" if readonly else "repair") if last else "error"
                stop = None if upto is None else upto[i]
                reader = ix.catch_up(
                    n, shard, tail=tail, validate=record_problem, key=_key, newest=True, stop=stop
                )
                self._ends.append(reader.end)
                self._last_lines = reader.lines
            ix.release(self._beyond)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot use the index: {exc}", file=self.path / INDEX_NAME) from exc
        self._stale = False

    def _beyond(self, loc: int) -> bool:
        """Whether a location is past what this (read-only) store loaded."""
        number, offset, _ = unpack(loc)
        i = self._pos.get(number)
        return i is None or offset >= self._ends[i]

    def _q(self, fn: Callable[[Index], _T]) -> _T:
        """Run an index query; a damaged index is rebuilt from the shards and asked again."""
        if self._ix is None:  # closed: queries still work, on a read-only view
            self._attach(True)
        if self._stale:
            self._attach(self.readonly, "behind after a failed index write")
        assert self._ix is not None
        try:
            return fn(self._ix)
        except Moved:
            # A writer moved on since we loaded: index privately what we loaded, as before.
            log.info("%s: written since it was loaded; indexing the loaded part", self.path)
            self._attach(True, "moved on", upto=list(self._ends))
            return fn(self._ix)
        except (sqlite3.DatabaseError, _Mismatch) as exc:
            self._attach(self._ix.readonly, f"unreadable: {exc}")
            try:
                return fn(self._ix)
            except _Mismatch as again:
                raise StoreError(f"shard does not match its rebuilt index: {again}") from again

    def _read_fd(self, shard: int) -> int:
        fd = self._read_fds.get(shard)
        if fd is None:
            fd = os.open(self._shards[shard], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._read_fds[shard] = fd
        return fd

    def _read(self, rid: str, loc: int) -> dict[str, Any]:
        number, offset, _ = unpack(loc)
        try:
            raw = read_line_at(self._read_fd(self._pos[number]), offset)
            record = decode_line(raw)
        except (KeyError, ValueError) as exc:
            raise _Mismatch(f"no record of {rid} at shard {number} byte {offset}") from exc
        if not isinstance(record, dict) or record.get("id") != rid:
            raise _Mismatch(f"no record of {rid} at shard {number} byte {offset}")
        return record

    # -- queries ------------------------------------------------------------------------

    def _done(self, code: int) -> bool:
        return code != _ERROR or not self.retry_errors

    def _loc(self, rid: object) -> int | None:
        if not isinstance(rid, str):
            return None
        if self._memo is not None and self._memo[0] == rid:
            return self._memo[1]  # callers often ask is_done(rid), then get(rid)
        ix = self._ix
        try:  # the common case without the retry wrapper; a damaged index goes through _q
            loc = ix.loc(rid) if ix is not None and not self._stale else self._q(_loc_of(rid))
        except (sqlite3.DatabaseError, Moved):
            loc = self._q(_loc_of(rid))
        self._memo = (rid, loc)
        return loc

    def __len__(self) -> int:
        """Number of distinct ids with a record (any status); kept in the index, not counted."""
        return sum(self._q(lambda ix: ix.counts()))

    def __contains__(self, rid: object) -> bool:
        """Whether ``rid`` has a record of any status (see :meth:`is_done` for resume)."""
        return self._loc(rid) is not None

    def status_of(self, rid: str) -> str | None:
        """Status of the newest record for ``rid``, or ``None``."""
        return None if (loc := self._loc(rid)) is None else STATUSES[loc & 3]

    def is_done(self, rid: str) -> bool:
        """Whether ``rid`` needs no more work under the resume policy."""
        return (loc := self._loc(rid)) is not None and self._done(loc & 3)

    def status_many(self, ids: Iterable[str]) -> dict[str, str]:
        """``id -> status`` of the newest record, for the ids that have one (batched)."""
        ids = list(ids)
        return {rid: STATUSES[loc & 3] for rid, loc in self._q(lambda ix: ix.locs(ids)).items()}

    def done_many(self, ids: Iterable[str]) -> set[str]:
        """The ids among ``ids`` that need no more work (batch form of :meth:`is_done`)."""
        ids = list(ids)
        return {rid for rid, loc in self._q(lambda ix: ix.locs(ids)).items() if self._done(loc & 3)}

    def done_ids(self) -> set[str]:
        """Ids that need no more work: ok / skipped, plus error when ``retry_errors=False``."""
        return self._q(lambda ix: {rid for rid, loc in ix.scan() if self._done(loc & 3)})

    def pending(self, ids: Iterable[str]) -> list[str]:
        """The ids from ``ids`` that still need work, in order, without repeats."""
        done = self.done_many(unique := list(dict.fromkeys(ids)))
        return [rid for rid in unique if rid not in done]

    def counts(self) -> dict[str, int]:
        """Number of ids per status of their newest record (counters kept in the index)."""
        c = self._q(lambda ix: ix.counts())
        return {s: c[CODE[s]] for s in STATUSES}

    def get(self, rid: str) -> dict[str, Any] | None:
        """The newest record for ``rid``, read from disk, or ``None``."""

        def fetch(ix: Index) -> dict[str, Any] | None:
            loc = ix.loc(rid)
            return None if loc is None else self._read(rid, loc)

        loc = self._loc(rid)
        if loc is None:
            return None
        with contextlib.suppress(_Mismatch):
            return self._read(rid, loc)
        self._memo = None
        return self._q(fetch)  # rebuilds the index, then asks again

    def get_many(self, ids: Iterable[str], *, done_only: bool = False) -> dict[str, dict[str, Any]]:
        """``id -> newest record`` for the ids among ``ids`` that have one.

        One index query per :data:`~rlaif.store.index.CHUNK` ids; records are read in file
        order. With ``done_only``, only records that need no more work (``is_done``).
        """
        ids = list(ids)

        def fetch(ix: Index) -> dict[str, dict[str, Any]]:
            locs = ix.locs(ids)
            want = sorted(
                (loc, rid) for rid, loc in locs.items() if not done_only or self._done(loc & 3)
            )
            found = {rid: self._read(rid, loc) for loc, rid in want}
            return {rid: found[rid] for rid in dict.fromkeys(ids) if rid in found}

        return self._q(fetch)

    def iter_records(
        self, *, status: str | None = None, all_versions: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Records in file order (shard by shard, line by line), streamed from disk.

        Args:
            status: only records with this status.
            all_versions: also yield superseded records (history), not just the newest.
        """
        if status is not None and status not in CODE:
            raise StoreError(f"unknown status {status!r}, expected one of {STATUSES}")
        for i, shard in enumerate(self._shards):
            end, number = self._ends[i], self._nums[i]
            offset = 0
            chunk: list[tuple[int, dict[str, Any]]] = []
            with open(shard, "rb") as fh:
                for raw in fh:
                    if offset >= end:
                        break  # lines past the end were not committed when we loaded
                    record = decode_line(raw)
                    here = offset
                    offset += len(raw)
                    if status is not None and record["status"] != status:
                        continue
                    if all_versions:
                        yield record
                        continue
                    chunk.append((pack(number, here, CODE[record["status"]]), record))
                    if len(chunk) >= _ITER_CHUNK:
                        yield from self._newest(chunk)
                        chunk = []
            yield from self._newest(chunk)

    def not_ok(self) -> Iterator[dict[str, Any]]:
        """The newest record of every id that is not ok, in file order: the index finds them,
        so only they are read (a run's errors and skips, not all its records)."""
        found = sorted(self._q(lambda ix: [(loc, r) for r, loc in ix.scan() if loc & 3 != _OK]))
        for start in range(0, len(found), _ITER_CHUNK):
            yield from self.get_many(r for _, r in found[start : start + _ITER_CHUNK]).values()

    def _newest(self, chunk: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The records of ``chunk`` (location, record) that are their id's newest."""
        if not chunk:
            return []
        locs = self._q(lambda ix: ix.locs(r["id"] for _, r in chunk))
        return [r for loc, r in chunk if locs.get(r["id"]) == loc]

    # -- writing ------------------------------------------------------------------------

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Durably append a batch: write every new line, then one fsync (per shard touched).

        Records whose id is already done are dropped (see the module's resume policy), as
        are repeats of an id within the batch. The whole batch is validated before anything
        is written. The index is updated after the fsync (one transaction per shard touched).

        Args:
            records: dicts with a string ``id``, ``status`` in ``ok|error|skipped`` and, unless
                ok, a non-empty ``reason``. Must be JSON (no NaN / Infinity).

        Returns:
            The number of records written.

        Raises:
            StoreError: for an invalid record (nothing written) or a failed write; after a
                failed write the shard holds only complete lines and the index is unchanged
                for the failed part.
        """
        if self.readonly:
            raise StoreError(f"stage '{self.stage}' was opened read-only", file=self.path)
        encoded = [encode_record(record, position) for position, record in enumerate(records)]
        self._memo = None
        prior = self._q(lambda ix: ix.locs(rid for rid, _, _ in encoded))
        batch: list[tuple[str, int, bytes]] = []
        accepted: dict[str, int] = {}
        for rid, code, data in encoded:
            before = accepted.get(rid)
            if before is None and rid in prior:
                before = prior[rid] & 3
            if before is not None and self._done(before):
                continue
            accepted[rid] = code
            batch.append((rid, code, data))
        written = 0
        while written < len(batch):
            if self._writer is None or self._last_lines >= self.shard_size:
                self._open_writer()
            take = min(len(batch) - written, self.shard_size - self._last_lines)
            part = batch[written : written + take]
            assert self._writer is not None and self._ix is not None
            offset = self._writer.append(b"".join(data for _, _, data in part))
            shard = len(self._shards) - 1
            number = self._nums[shard]
            entries = []
            for rid, code, data in part:
                entries.append((rid, pack(number, offset, code)))
                offset += len(data)
            self._ends[shard] = offset
            self._last_lines += take
            written += take
            try:
                with self._ix.writing():
                    self._ix.apply(entries, newest=True, prior=prior)
                    prior.update(entries)  # a later part of the batch may repeat an id
                    self._ix.set_coverage(number, self._shards[shard], offset, self._last_lines)
            except (sqlite3.Error, OSError) as exc:
                # The lines are durable; the index catches up from them before the next use.
                self._stale = True
                raise StoreError(
                    f"records were written but the index could not be updated ({exc}); "
                    "they are kept and indexed on the next use",
                    file=self.path / INDEX_NAME,
                ) from exc
        return written

    def _open_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        new = not self._shards or self._last_lines >= self.shard_size
        if new:
            number = self._nums[-1] + 1 if self._nums else 0
            path = self.path / f"shard-{number:05d}.jsonl"
        else:
            number, path = self._nums[-1], self._shards[-1]
        writer = JsonlAppender(path)  # may raise (e.g. ENOSPC); state is untouched then
        if new:
            self._shards.append(path)
            self._nums.append(number)
            self._pos[number] = len(self._shards) - 1
            self._ends.append(0)
            self._last_lines = 0
        elif writer.size != self._ends[-1]:
            writer.close()
            # Someone else appended since load(); our offsets would be wrong.
            raise StoreError(
                "shard changed on disk since it was loaded (another writer?)", file=path
            )
        self._writer = writer

    # -- lifecycle ----------------------------------------------------------------------

    def shard_paths(self) -> list[Path]:
        """The shard files, in order."""
        return list(self._shards)

    def _close_files(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()

    def close(self) -> None:
        """Close files and the index, and release the stage lock (idempotent)."""
        self._close_files()
        if self._ix is not None:
            self._ix.close()
            self._ix = None
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> StageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Best effort for stores never closed; the lock's own __del__ frees the lock.
        with contextlib.suppress(Exception):
            self._close_files()
            if self._ix is not None:
                self._ix.close()

    def __repr__(self) -> str:
        return f"StageStore({str(self.run_dir)!r}, {self.stage!r}, records={len(self)})"
