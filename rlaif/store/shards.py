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
memory. The store keeps an index ``id -> (shard, byte offset, status)`` packed into one int
(roughly 150 bytes per id with the dict overhead, ~150 MB at a million records) and reads a
record from disk with ``pread`` when asked for it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
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
from rlaif.store.lock import FileLock

__all__ = ["DEFAULT_SHARD_SIZE", "STATUSES", "StageStore"]

STATUSES = ("ok", "error", "skipped")
DEFAULT_SHARD_SIZE = 10_000

_CODE = {s: i for i, s in enumerate(STATUSES)}
_OK, _ERROR, _SKIPPED = (_CODE[s] for s in STATUSES)
_OFFSET_BITS = 40  # 1 TiB per shard; a 10k-record shard is nowhere near
_SHARD_RE = re.compile(r"^shard-(\d+)\.jsonl$")
_STAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _pack(shard: int, offset: int, code: int) -> int:
    return (((shard << _OFFSET_BITS) | offset) << 2) | code


def _unpack(value: int) -> tuple[int, int, int]:
    code = value & 3
    rest = value >> 2
    return rest >> _OFFSET_BITS, rest & ((1 << _OFFSET_BITS) - 1), code


def _record_problem(value: Any) -> str | None:
    """Why a parsed line is not a record (``None`` if it is one)."""
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    rid = value.get("id")
    if not isinstance(rid, str) or not rid:
        return "record has no string 'id'"
    if value.get("status") not in _CODE:
        return f"record {rid} has status {value.get('status')!r}, expected one of {STATUSES}"
    return None


def _encode(record: Any, position: int) -> tuple[str, int, bytes]:
    """Validate one record for writing; return ``(id, status code, line bytes)``."""
    where = f"record #{position}"
    if not isinstance(record, dict):
        raise StoreError(f"{where}: expected a dict, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        raise StoreError(f"{where}: needs a non-empty string id", field="id")
    if record.get("status") not in _CODE:
        raise StoreError(
            f"{where} ({rid}): status {record.get('status')!r} is not one of {STATUSES}",
            field="status",
        )
    rid, status = record["id"], record["status"]
    if status != "ok":
        reason = record.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            # Every input must be accountable: a non-ok record without a reason is not.
            raise StoreError(f"{where} ({rid}): status '{status}' needs a reason", field="reason")
    try:
        data = encode_line(record)
    except (ValueError, TypeError) as exc:
        try:
            canonical_json(record)  # re-walk to name the offending path
        except CanonicalJSONError as located:
            raise StoreError(f"record {rid}: {located.message}") from exc
        raise StoreError(f"record {rid} cannot be written as JSON: {exc}") from exc
    return rid, _CODE[status], data


class StageStore:
    """The records of one stage of one run.

    Args:
        run_dir: the run directory.
        stage: stage name (letters, digits, ``_ . -``); it names the folder.
        shard_size: records per shard file before rolling to the next one.
        retry_errors: whether ``error`` records are redone on resume (see module docs).
        readonly: open for reading only: nothing is created, repaired, locked or written.
            Use it to read a stage while another process (or object) writes it; it sees the
            records committed when it was loaded (call :meth:`load` to refresh).

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
        self._index: dict[str, int] = {}
        self._shards: list[Path] = []
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

    def _shard_files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        found = []
        for p in self.path.iterdir():
            m = _SHARD_RE.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def load(self) -> None:
        """(Re)read all shards and rebuild the index, repairing a torn last line."""
        self._close_files()
        self._index.clear()
        self._shards = self._shard_files()
        self._ends = []
        self._last_lines = 0
        for i, shard in enumerate(self._shards):
            last = i == len(self._shards) - 1
            # Only the last shard can hold an unfinished batch: a shard is fsynced before the
            # next one is created, so a torn line anywhere else is corruption.
            tail = ("ignore" if self.readonly else "repair") if last else "error"
            reader = JsonlReader(shard, tail=tail, validate=_record_problem)
            for offset, record in reader:
                # Newest line wins; append() only ever writes lines that may supersede.
                self._index[record["id"]] = _pack(i, offset, _CODE[record["status"]])
            self._ends.append(reader.end)
            if last:
                self._last_lines = reader.lines

    def _read_fd(self, shard: int) -> int:
        fd = self._read_fds.get(shard)
        if fd is None:
            fd = os.open(self._shards[shard], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            self._read_fds[shard] = fd
        return fd

    # -- queries ------------------------------------------------------------------------

    def _done(self, code: int) -> bool:
        return code != _ERROR or not self.retry_errors

    def __len__(self) -> int:
        """Number of distinct ids with a record (any status)."""
        return len(self._index)

    def __contains__(self, rid: object) -> bool:
        """Whether ``rid`` has a record of any status (see :meth:`is_done` for resume)."""
        return rid in self._index

    def status_of(self, rid: str) -> str | None:
        """Status of the newest record for ``rid``, or ``None``."""
        value = self._index.get(rid)
        return None if value is None else STATUSES[value & 3]

    def is_done(self, rid: str) -> bool:
        """Whether ``rid`` needs no more work under the resume policy."""
        value = self._index.get(rid)
        return value is not None and self._done(value & 3)

    def done_ids(self) -> set[str]:
        """Ids that need no more work: ok / skipped, plus error when ``retry_errors=False``."""
        return {rid for rid, value in self._index.items() if self._done(value & 3)}

    def pending(self, ids: Iterable[str]) -> list[str]:
        """The ids from ``ids`` that still need work, in order, without repeats."""
        seen: set[str] = set()
        out = []
        for rid in ids:
            if rid not in seen and not self.is_done(rid):
                seen.add(rid)
                out.append(rid)
        return out

    def counts(self) -> dict[str, int]:
        """Number of ids per status of their newest record."""
        c = Counter(value & 3 for value in self._index.values())
        return {s: c.get(_CODE[s], 0) for s in STATUSES}

    def get(self, rid: str) -> dict[str, Any] | None:
        """The newest record for ``rid``, read from disk, or ``None``."""
        value = self._index.get(rid)
        if value is None:
            return None
        shard, offset, _ = _unpack(value)
        return decode_line(read_line_at(self._read_fd(shard), offset))

    def iter_records(
        self, *, status: str | None = None, all_versions: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Records in file order (shard by shard, line by line).

        Args:
            status: only records with this status.
            all_versions: also yield superseded records (history), not just the newest.
        """
        if status is not None and status not in _CODE:
            raise StoreError(f"unknown status {status!r}, expected one of {STATUSES}")
        for i, shard in enumerate(self._shards):
            end = self._ends[i]
            offset = 0
            with open(shard, "rb") as fh:
                for raw in fh:
                    if offset >= end:
                        break  # lines past the end were not committed when we loaded
                    record = decode_line(raw)
                    code = _CODE[record["status"]]
                    here = offset
                    offset += len(raw)
                    if status is not None and record["status"] != status:
                        continue
                    if all_versions or self._index.get(record["id"]) == _pack(i, here, code):
                        yield record

    # -- writing ------------------------------------------------------------------------

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Durably append a batch: write every new line, then one fsync (per shard touched).

        Records whose id is already done are dropped (see the module's resume policy), as
        are repeats of an id within the batch. The whole batch is validated before anything
        is written.

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
        batch: list[tuple[str, int, bytes]] = []
        accepted: dict[str, int] = {}
        for position, record in enumerate(records):
            rid, code, data = _encode(record, position)
            prior = accepted.get(rid, self._index.get(rid))
            if prior is not None and self._done(prior & 3):
                continue
            accepted[rid] = code
            batch.append((rid, code, data))
        written = 0
        while written < len(batch):
            if self._writer is None or self._last_lines >= self.shard_size:
                self._open_writer()
            take = min(len(batch) - written, self.shard_size - self._last_lines)
            part = batch[written : written + take]
            assert self._writer is not None
            offset = self._writer.append(b"".join(data for _, _, data in part))
            shard = len(self._shards) - 1
            for rid, code, data in part:
                self._index[rid] = _pack(shard, offset, code)
                offset += len(data)
            self._ends[shard] = offset
            self._last_lines += take
            written += take
        return written

    def _open_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        new = not self._shards or self._last_lines >= self.shard_size
        if new:
            number = 0
            if self._shards:
                number = int(_SHARD_RE.match(self._shards[-1].name).group(1)) + 1
            path = self.path / f"shard-{number:05d}.jsonl"
        else:
            path = self._shards[-1]
        writer = JsonlAppender(path)  # may raise (e.g. ENOSPC); state is untouched then
        if new:
            self._shards.append(path)
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
        """Close files and release the stage lock (idempotent)."""
        self._close_files()
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

    def __repr__(self) -> str:
        return f"StageStore({str(self.run_dir)!r}, {self.stage!r}, records={len(self)})"
