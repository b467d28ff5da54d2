"""Crash-safe JSON-lines files: append a batch with one fsync, read back with torn-tail repair.

Both the stage shards and the call cache are built on these two pieces.

Why a torn tail is safe to cut: a batch is written with ``write`` calls and then made durable
with one ``fsync``; only after ``fsync`` returns does anyone treat the batch as committed. A
process killed (or a machine losing power) in between leaves at most the *end* of the file
incomplete: a line without its newline, or garbage such as the zero bytes some filesystems
show for blocks whose data never reached disk. Cutting the file back to its last complete,
valid line loses only an uncommitted batch. Anything invalid *followed by* a valid line cannot
come from a crash, so it is reported as corruption instead of being silently dropped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from rlaif.errors import StoreError
from rlaif.store.atomic import fsync_dir
from rlaif.store.jsonenc import compact_encoder, encode_str

log = logging.getLogger("rlaif.store")

TailPolicy = Literal["repair", "ignore", "error"]

# Indirection so tests can simulate short writes and ENOSPC without touching os.write globally.
_os_write = os.write
_os_fsync = os.fsync

_READ_CHUNK = 1 << 16

# One encoder, built once (json.dumps with options builds a new encoder on every call).
# No check for circular references (records are trees built from JSON data; the check costs
# a tenth of the encoding): a cycle ends in RecursionError, which callers report like a
# value that is not JSON.
_encode = compact_encoder(sort_keys=False)


def encode_line(obj: Any) -> bytes:
    """One JSONL line (UTF-8, compact, newline-terminated).

    Raises:
        ValueError: for NaN / Infinity, text that is not valid Unicode, or a value that
            contains itself.
        TypeError: for values that are not JSON.
    """
    try:
        return (_encode(obj) + "\n").encode("utf-8")
    except RecursionError:
        raise ValueError("the value contains itself (a circular reference)") from None


def encode_keyed_line(key: str, value: Any) -> bytes:
    """``encode_line({"key": key, "value": value})``, written without the dict (a call cache
    writes one per model request). Raises as :func:`encode_line` does."""
    try:
        return f'{{"key":{encode_str(key)},"value":{_encode(value)}}}\n'.encode()
    except RecursionError:
        raise ValueError("the value contains itself (a circular reference)") from None


def decode_line(raw: bytes) -> Any:
    """Parse one JSONL line (decoding first skips json's encoding sniffing)."""
    return json.loads(raw.decode("utf-8"))


def write_failure(path: Path, exc: OSError) -> StoreError:
    """The one-line error for a failed batch write."""
    reason = exc.strerror or os.strerror(exc.errno or errno.EIO)
    return StoreError(
        f"cannot write {path}: {reason}; records up to the previous batch are safe; "
        "free space and re-run to resume"
    )


class JsonlReader:
    """Iterate the complete, valid lines of a JSONL file, handling a torn tail.

    Yields ``(offset, value)`` for each line, where ``offset`` is the line's byte offset.
    After iteration, :attr:`end` is the byte length of the valid prefix and :attr:`lines` the
    number of valid lines.

    Args:
        path: the file; a missing file reads as empty.
        tail: what to do with an invalid tail: ``"repair"`` truncates the file to :attr:`end`
            (logged once), ``"ignore"`` leaves the file alone (read-only users), ``"error"``
            raises (a file that should never have been the last one written).
        validate: optional check on each parsed value; returns a problem description or
            ``None``. A line that fails it counts as invalid, like bad JSON.
    """

    def __init__(
        self,
        path: Path,
        *,
        tail: TailPolicy = "repair",
        validate: Callable[[Any], str | None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.tail = tail
        self.validate = validate
        self.end = 0
        self.lines = 0
        self.repaired = False

    def _parse(self, raw: bytes) -> tuple[Any, str | None]:
        if not raw.endswith(b"\n"):
            return None, "incomplete line (no newline)"
        try:
            value = decode_line(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return None, f"invalid JSON ({exc})"
        problem = self.validate(value) if self.validate else None
        return value, problem

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed in finally; generator body
        except FileNotFoundError:
            return
        bad: tuple[int, int, str] | None = None  # (offset, line number, problem) of 1st bad
        offset = 0
        try:
            for lineno, raw in enumerate(fh, start=1):
                value, problem = self._parse(raw)
                if problem is None and bad is not None:
                    # A valid line after a bad one: not a crash artefact, real corruption.
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

    def _handle_tail(self, bad: tuple[int, int, str], size: int) -> None:
        start, lineno, problem = bad
        if self.tail == "error":
            raise StoreError(
                f"corrupt record store line: {problem}; fix or remove that line",
                file=self.path,
                line=lineno,
            )
        if self.tail == "ignore":
            log.debug("%s:%d: ignoring torn tail (%s)", self.path, lineno, problem)
            return
        try:
            os.truncate(self.path, start)
        except OSError as exc:
            raise StoreError(
                f"cannot repair torn tail: {exc.strerror}", file=self.path, line=lineno
            ) from exc
        self.repaired = True
        log.warning(
            "%s:%d: removed %d bytes of an unfinished write (%s); the batch it belonged to "
            "was never committed and will be redone",
            self.path,
            lineno,
            size - start,
            problem,
        )


class JsonlAppender:
    """Appends batches of lines to one file; each batch ends with a single fsync.

    The file descriptor is unbuffered (``os.write``), so a failed write leaves nothing
    hidden in a Python buffer to resurface later.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        existed = self.path.exists()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        try:
            self.fd: int | None = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise write_failure(self.path, exc) from exc
        if not existed:
            fsync_dir(self.path.parent)  # so the new file's name survives a power cut

    @property
    def size(self) -> int:
        """Current file size in bytes."""
        assert self.fd is not None
        return os.fstat(self.fd).st_size

    def append(self, blob: bytes) -> int:
        """Write ``blob`` (whole lines) and fsync it.

        Returns:
            The byte offset at which ``blob`` starts.

        Raises:
            StoreError: on any OSError (e.g. ENOSPC); the file is first truncated back to its
                size before this call, so it holds only complete lines.
        """
        if self.fd is None:
            raise StoreError(f"{self.path} is closed")
        start = os.fstat(self.fd).st_size
        try:
            view = memoryview(blob)
            while view:
                written = _os_write(self.fd, view)
                view = view[written:]
            _os_fsync(self.fd)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                # Cannot cut it back now; the torn tail is repaired on the next open.
                log.warning("%s: could not truncate a failed write", self.path)
            raise write_failure(self.path, exc) from exc
        return start

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_line_at(fd: int, offset: int) -> bytes:
    """Read the line starting at ``offset`` from an open descriptor (no shared file position)."""
    parts: list[bytes] = []
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            parts.append(chunk[: newline + 1])
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)
