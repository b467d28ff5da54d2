"""A persisted index beside JSONL files: ``id -> newest (or first) line``, in SQLite.

Why: keeping ``id -> offset`` in a Python dict costs ~150-200 bytes per id and makes every open
parse every line; a million-prompt run has millions of records and tens of millions of cache
entries. An SQLite file beside the JSONL keeps memory bounded (a capped page cache, no
per-record Python objects) and a reopen reads only what the index does not cover yet.

The JSONL stays the source of truth. For every file the index stores how many bytes it covers
(plus the first and last bytes of that prefix and the file's mtime, to notice a replaced
file). At open only the tail beyond that is parsed, so a crash between the JSONL fsync and the
index update loses nothing. Applying a line is idempotent (an id keeps the largest location,
or the smallest for first-wins), so re-indexing a line already indexed changes nothing, and
counters live in the same transactions as the rows. An index that is missing, unreadable,
of another version or claims bytes the files do not hold is rebuilt from the JSONL.

Locations pack ``(file number, byte offset, status code)`` into one integer, so ordering
locations orders lines in file order and "newest wins" is ``max``.

Writers buffer rows (see :class:`Index`) and write them in rare, large transactions, so
the index may lag its JSONL by up to :data:`FLUSH` ids plus a batch; a lost buffer is
caught up from the JSONL tail. The journal is SQLite's rollback journal, not WAL: a
read-only user then creates no file at all (WAL readers create ``-wal`` / ``-shm``), and no
reader holds a lock for long, so a writer is never kept waiting. A read-only user reads the
coverage and counters in one short transaction and indexes the tail it finds into a private
scratch table; afterwards it notices any location past what it loaded (a concurrent writer)
and then builds a private index of what it loaded, in a temporary file, as it does when
the index itself is unusable.

SQL text holds constants and ``?`` placeholders only: nothing user-controlled is put into
SQL text, ids travel as parameters.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from rlaif.store.jsonl import TailPolicy
from rlaif.store.tail import TailReader, signature

log = logging.getLogger("rlaif.store")

__all__ = ["CHUNK", "FLUSH", "Index", "Moved", "TailReader", "pack", "unpack"]

SCHEMA_VERSION = 1
CHUNK = 500  # ids per query (SQLite's variable limit is 32766; small IN lists plan well)
_CACHE_KIB = 8192  # page cache of the index; the scratch schema gets a quarter
FLUSH = 32_768  # a buffered writer's pending ids (~6 MB) before one sorted transaction
_OFFSET_BITS = 38  # 256 GiB per file
MAX_FILE_NUMBER = (1 << (62 - _OFFSET_BITS - 2)) - 1


class Moved(Exception):
    """A read-only user's query met a location past what it loaded (a writer is at work)."""


def pack(number: int, offset: int, code: int) -> int:
    """One sortable integer for a line: file number, byte offset, status code (0-3)."""
    return (((number << _OFFSET_BITS) | offset) << 2) | code


def unpack(loc: int) -> tuple[int, int, int]:
    """``(file number, byte offset, code)`` of a :func:`pack` result."""
    rest = loc >> 2
    return rest >> _OFFSET_BITS, rest & ((1 << _OFFSET_BITS) - 1), loc & 3


def _uri(path: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(str(path.absolute()))}?mode={mode}"


class Index:
    """One index file (schema ``ix``) on one SQLite connection, plus private scratch (``main``).

    Args:
        path: the index file, or ``None`` for a private index in a temporary file.
        kind: what it indexes (``"stage"`` / ``"cache"``); an index of another kind is rebuilt.
        readonly: never write the file; see the module docs.
        buffered: keep up to :data:`FLUSH` updated ids in memory and write them in one
            sorted transaction (random ids make each small transaction rewrite a page per
            id). The buffer is looked at first by this object's queries; other processes
            see the rows at :meth:`flush`, and a lost buffer is caught up from the JSONL.
    """

    def __init__(
        self, path: Path | None, kind: str, *, readonly: bool = False, buffered: bool = False
    ) -> None:
        self.path = path
        self.kind = kind
        self.readonly = readonly
        self.buffered = buffered and not readonly
        self.private = path is None
        self.inode: int | None = None
        self._tail_rows = 0  # read-only: ids of the tail, in main.recs
        self._delta = [0, 0, 0, 0]  # count changes not in ix.counts (tail or buffer)
        self._pending: dict[str, int] = {}  # buffered: winning locations not written yet
        self._covering: dict[int, tuple[Path, int, int]] = {}  # buffered: n -> coverage
        self._newest = True  # buffered: how the pending ids were chosen
        self._frozen: list[int] | None = None  # read-only: the counters when loaded
        self.horizon: Callable[[int], bool] | None = None  # read-only: is a location new?
        self.conn = sqlite3.connect(
            "", isolation_level=None, check_same_thread=False, uri=True, timeout=60
        )
        self.conn.execute(f"PRAGMA main.cache_size=-{_CACHE_KIB // 4}")
        self._cur = self.conn.cursor()  # reused by single lookups (the hot path)

    # -- opening ------------------------------------------------------------------------

    def open(self) -> str | None:
        """Attach the index file; return why it cannot be used (``None`` when it can).

        ``"no index"`` means there is none yet; :meth:`reset` then makes an empty one (a
        private one when read-only). Read-only, a read transaction starts here and lasts
        until :meth:`release`.
        """
        if self.path is None or not self.path.exists() or self.path.stat().st_size == 0:
            return "no index"
        c = self.conn
        try:
            c.execute(
                "ATTACH DATABASE ? AS ix", (_uri(self.path, "ro" if self.readonly else "rw"),)
            )
            c.execute(f"PRAGMA ix.cache_size=-{_CACHE_KIB}")
            if self.readonly:
                c.execute("CREATE TABLE main.recs(id TEXT PRIMARY KEY, loc INT) WITHOUT ROWID")
                c.execute("BEGIN")
            else:
                self._pragmas()
            row = c.execute("SELECT v FROM ix.meta WHERE k='schema'").fetchone()
            c.execute("SELECT count(*) FROM ix.counts").fetchone()
            self.inode = os.stat(self.path).st_ino
        except (sqlite3.Error, OSError) as exc:
            return f"unreadable: {exc}"
        if row is None or row[0] != f"{self.kind}/{SCHEMA_VERSION}":
            return f"of another kind or version: {row[0] if row else 'none'}"
        return None

    def _pragmas(self) -> None:
        self.conn.execute("PRAGMA ix.journal_mode=DELETE")
        self.conn.execute("PRAGMA ix.synchronous=NORMAL")

    def _create(self) -> None:
        c = self.conn
        self._pragmas()
        c.execute("BEGIN IMMEDIATE")
        c.execute("CREATE TABLE ix.meta(k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID")
        c.execute("INSERT INTO ix.meta VALUES('schema', ?)", (f"{self.kind}/{SCHEMA_VERSION}",))
        c.execute(
            "CREATE TABLE ix.files(n INTEGER PRIMARY KEY, covered INT NOT NULL, "
            "lines INT NOT NULL, head BLOB, tail BLOB, mtime INT)"
        )
        c.execute("CREATE TABLE ix.recs(id TEXT PRIMARY KEY, loc INT NOT NULL) WITHOUT ROWID")
        c.execute("CREATE TABLE ix.counts(code INTEGER PRIMARY KEY, n INT NOT NULL)")
        c.executemany("INSERT INTO ix.counts VALUES(?, 0)", [(i,) for i in range(4)])
        c.execute("COMMIT")
        if not self.private and self.path is not None:
            self.inode = os.stat(self.path).st_ino

    def _attach_private(self) -> None:
        self.private = True
        self.conn.execute("ATTACH DATABASE '' AS ix")
        self.conn.execute(f"PRAGMA ix.cache_size=-{_CACHE_KIB}")
        self._create()

    def reset(self, reason: str, *, quiet: bool = False) -> None:
        """Start an empty index because the old one cannot be used (logged as one line)."""
        if not quiet and reason == "no index":
            log.info("%s: no index yet; building it from the JSONL", self.path)
        elif not quiet:
            log.warning("%s: index %s; rebuilding it from the JSONL", self.path, reason)
        self._delta = [0, 0, 0, 0]
        self._tail_rows = 0
        self._frozen = self.horizon = None
        self._pending.clear()
        self._covering.clear()
        c = self.conn
        with contextlib.suppress(sqlite3.Error):
            c.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            c.execute("DROP TABLE IF EXISTS main.recs")
        with contextlib.suppress(sqlite3.Error):
            c.execute("DETACH DATABASE ix")
        if self.readonly or self.path is None:
            self._attach_private()
            if self.readonly:
                c.execute("BEGIN")
            return
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")
        c.execute("ATTACH DATABASE ? AS ix", (_uri(self.path, "rwc"),))
        c.execute(f"PRAGMA ix.cache_size=-{_CACHE_KIB}")
        self._create()

    @property
    def dirty(self) -> bool:
        """Whether a buffered writer holds rows or coverage not written yet."""
        return bool(self._pending or self._covering)

    @property
    def overlay(self) -> bool:
        """Whether a read-only user keeps tail rows beside a real index."""
        return self.readonly and not self.private

    def release(self, horizon: Callable[[int], bool] | None) -> None:
        """Read-only: end the loading transaction, keeping the counters it saw; from now on
        a location for which ``horizon`` is true raises :class:`Moved`."""
        if self.readonly and self.conn.in_transaction:
            self._frozen = self.counts()
            self.conn.execute("COMMIT")
            self.horizon = None if self.private else horizon

    # -- coverage -----------------------------------------------------------------------

    def coverage(self) -> dict[int, tuple[int, int, bytes, bytes, int]]:
        """``n -> (covered, lines, head, tail, mtime)`` for every file the index covers."""
        rows = self.conn.execute("SELECT n, covered, lines, head, tail, mtime FROM ix.files")
        return {r[0]: tuple(r[1:]) for r in rows}  # type: ignore[misc]

    def stale(self, files: dict[int, Path]) -> str | None:
        """Why the coverage does not match ``files`` (number -> path), or ``None``."""
        for n, (covered, _, head, tail, mtime) in self.coverage().items():
            path = files.get(n)
            if path is None:
                return f"covers file #{n}, which is gone"
            try:
                h, t, m, size = signature(path, covered)
            except OSError as exc:
                return f"cannot read {path.name} ({exc.strerror})"
            if covered > size:
                return f"claims {covered} bytes of {path.name}, which has {size}"
            if (h, t) != (head, tail) or (covered == size and m != mtime):
                return f"{path.name} was replaced or edited"
        return None

    def covered(self, n: int) -> tuple[int, int] | None:
        """``(bytes, lines)`` of file ``n`` that the index covers (``None``: not yet seen)."""
        return self.conn.execute("SELECT covered, lines FROM ix.files WHERE n=?", (n,)).fetchone()

    def set_coverage(
        self, n: int, path: Path, covered: int, lines: int, fd: int | None = None
    ) -> None:
        """Record that the first ``covered`` bytes (``lines`` lines) of ``path`` are indexed."""
        if self.readonly:
            return
        if self.buffered:
            self._covering[n] = (path, covered, lines)
            return
        head, tail, mtime, _ = signature(path, covered, fd)
        self.conn.execute(
            "INSERT OR REPLACE INTO ix.files VALUES(?, ?, ?, ?, ?, ?)",
            (n, covered, lines, head, tail, mtime),
        )

    # -- transactions -------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """One write transaction (a no-op inside a read-only user's snapshot or when
        buffered: :meth:`flush` writes its own)."""
        if self.readonly or self.buffered:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- queries ------------------------------------------------------------------------

    def _in(self, table: str, ids: list[str]) -> Iterator[tuple[str, int]]:
        for i in range(0, len(ids), CHUNK):
            part = ids[i : i + CHUNK]
            marks = ",".join("?" * len(part))  # placeholders only; ids are parameters
            yield from self.conn.execute(f"SELECT id, loc FROM {table} WHERE id IN ({marks})", part)

    def locs(self, ids: Iterable[str]) -> dict[str, int]:
        """``id -> location`` of the ids that have one (one query per :data:`CHUNK` ids)."""
        ids = list(dict.fromkeys(ids))
        if self._pending:
            pending = self._pending
            found = {rid: pending[rid] for rid in ids if rid in pending}
            found.update(self._in("ix.recs", [rid for rid in ids if rid not in pending]))
            return found
        found = dict(self._in("ix.recs", ids))
        if self._tail_rows:
            for rid, loc in self._in("main.recs", ids):
                if loc > found.get(rid, -1):
                    found[rid] = loc
        if self.horizon is not None and any(map(self.horizon, found.values())):
            raise Moved("a location past what was loaded")
        return found

    def loc(self, rid: str) -> int | None:
        """The location of one id, or ``None``."""
        if rid in self._pending:
            return self._pending[rid]
        row = self._cur.execute("SELECT loc FROM ix.recs WHERE id=?", (rid,)).fetchone()
        loc = None if row is None else row[0]
        if self._tail_rows:
            more = self.conn.execute("SELECT loc FROM main.recs WHERE id=?", (rid,)).fetchone()
            if more is not None and (loc is None or more[0] > loc):
                loc = more[0]
        if loc is not None and self.horizon is not None and self.horizon(loc):
            raise Moved(rid)
        return loc

    def scan(self) -> Iterator[tuple[str, int]]:
        """Every ``(id, location)``, in id order."""
        self.flush()
        for rid, loc in self._scan():
            if self.horizon is not None and self.horizon(loc):
                raise Moved(rid)
            yield rid, loc

    def _scan(self) -> Iterator[tuple[str, int]]:
        if not self._tail_rows:
            yield from self.conn.execute("SELECT id, loc FROM ix.recs")
            return
        yield from self.conn.execute(
            "SELECT b.id, max(b.loc, coalesce(t.loc, -1)) FROM ix.recs b "
            "LEFT JOIN main.recs t ON t.id = b.id "
            "UNION ALL SELECT t.id, t.loc FROM main.recs t "
            "WHERE NOT EXISTS (SELECT 1 FROM ix.recs b WHERE b.id = t.id)"
        )

    def counts(self) -> list[int]:
        """Ids per status code (4 counters, kept in the index; nothing is scanned)."""
        if self._frozen is not None:
            return list(self._frozen)
        out = [0, 0, 0, 0]
        for code, n in self.conn.execute("SELECT code, n FROM ix.counts"):
            out[code] = n + self._delta[code]
        return out

    # -- updates ------------------------------------------------------------------------

    def apply(
        self, entries: list[tuple[str, int]], *, newest: bool, prior: dict[str, int] | None = None
    ) -> None:
        """Index lines (``(id, location)`` in file order) inside the current transaction.

        An id keeps its largest location (``newest``) or its smallest (first wins), so
        applying a line twice is harmless; counters move with the winning line's code.
        ``prior`` is :meth:`locs` of the ids when the caller just asked for it.
        """
        if not entries:
            return
        if prior is None:
            prior = self.locs(rid for rid, _ in entries)
        changed: dict[str, int] = {}
        delta = [0, 0, 0, 0]
        for rid, loc in entries:
            old = changed.get(rid, prior.get(rid))
            if old is not None and (loc <= old if newest else loc >= old):
                continue
            if old is not None:
                delta[old & 3] -= 1
            delta[loc & 3] += 1
            changed[rid] = loc
        if not changed:
            return
        if self.buffered:
            self._newest = newest
            self._pending.update(changed)
            self._delta = [a + b for a, b in zip(self._delta, delta, strict=True)]
            if len(self._pending) >= FLUSH:
                self.flush()
            return
        table = "main.recs" if self.overlay else "ix.recs"
        self.conn.executemany(
            f"INSERT INTO {table}(id, loc) VALUES(?, ?) "
            "ON CONFLICT(id) DO UPDATE SET loc = excluded.loc",
            changed.items(),
        )
        if self.overlay:
            self._tail_rows += len(changed)
            self._delta = [a + b for a, b in zip(self._delta, delta, strict=True)]
        else:
            self._add_counts(delta)

    def _add_counts(self, delta: list[int]) -> None:
        self.conn.executemany(
            "UPDATE ix.counts SET n = n + ? WHERE code = ?",
            [(d, code) for code, d in enumerate(delta) if d],
        )

    def flush(self) -> None:
        """Write a buffered writer's pending ids, counters and coverage in one transaction.

        The ids are applied again against what the file holds now (in key order, so each
        page is written once), so rows another process indexed meanwhile are not counted
        twice. If this fails the buffer is gone; callers catch up from the JSONL.
        """
        if not self.buffered or not self.dirty:
            return
        pending = self._pending  # ids are unique: sorting them orders the items
        items, covering = [(i, pending[i]) for i in sorted(pending)], list(self._covering.items())
        self._pending.clear()
        self._covering.clear()
        self._delta = [0, 0, 0, 0]
        self.buffered = False  # write through while flushing
        try:
            with self.writing():
                self.apply(items, newest=self._newest)
                for n, (path, covered, lines) in covering:
                    self.set_coverage(n, path, covered, lines)
        finally:
            self.buffered = True

    def catch_up(
        self,
        n: int,
        path: Path,
        *,
        tail: TailPolicy,
        validate: Callable[[Any], str | None],
        key: Callable[[Any], tuple[str, int]],
        newest: bool,
        batch: int = 4096,
        stop: int | None = None,
    ) -> TailReader:
        """Index the lines of file ``n`` beyond what the index covers; return the reader.

        Commits every ``batch`` lines (or every :data:`FLUSH` ids when buffered) with the
        coverage reached, so a long rebuild that is interrupted keeps its progress. Memory:
        one batch.
        """
        cov = self.covered(n)
        covered, lines = cov if cov is not None else (0, 0)
        reader = TailReader(
            path, start=covered, start_line=lines, tail=tail, validate=validate, stop=stop
        )
        entries: list[tuple[str, int]] = []
        for offset, value in reader:
            rid, code = key(value)
            entries.append((rid, pack(n, offset, code)))
            if len(entries) >= batch:
                with self.writing():
                    self.apply(entries, newest=newest)
                    self.set_coverage(n, path, reader.end, reader.lines)
                entries = []
        if entries or cov is None or reader.end != covered or reader.repaired:
            with self.writing():
                self.apply(entries, newest=newest)
                self.set_coverage(n, path, reader.end, reader.lines)
        self.flush()  # a rebuilt or caught-up index is on disk before it is relied on
        return reader

    def close(self) -> None:
        """Write what is buffered and close the connection. A buffer that cannot be written
        is caught up from the JSONL at the next open."""
        try:
            self.flush()
        except (sqlite3.Error, OSError) as exc:
            log.warning(
                "%s: index not updated at close (%s); caught up at the next open", self.path, exc
            )
        with contextlib.suppress(sqlite3.Error):
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
