"""Whole-file writes that readers see complete or not at all: the one way rlaif replaces a file.

:func:`write_atomic` writes to a temporary sibling with a name no other writer can pick (process
id plus a random part), flushes and fsyncs it, renames it over the target with ``os.replace``
(atomic on POSIX and Windows), then fsyncs the folder so the rename itself survives a power
cut. A failure removes the temporary file and leaves the old file as it was; what a killed
writer left behind is removed by the next write (:func:`remove_stale`).
:func:`swap_in` does the same for a folder (or a file written by a library) built next to its
final place, a dataset export: everything under it is fsynced, then it replaces the old one.

Appends are another matter: :mod:`rlaif.store.jsonl` appends batches with one fsync each.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the data fsync still holds
    finally:
        os.close(fd)


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of ``path`` that no other process or thread will also pick."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def remove_stale(path: Path) -> None:
    """Remove what killed writers left next to ``path``: :func:`temp_sibling` files and
    folders whose process is gone. A live writer's (this process included) are kept."""
    prefix = f".{path.name}."
    for p in path.parent.glob(glob.escape(prefix) + "*"):
        parts = p.name[len(prefix) :].split("-")  # tag, pid, random part
        if len(parts) != 3 or not parts[1].isdigit() or _alive(int(parts[1])):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def write_atomic(
    path: str | Path,
    data: str | bytes | Iterable[str],
    *,
    check: Callable[[Path], Any] | None = None,
) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8) in one atomic step.

    Args:
        path: the file to write; its folder is created when missing.
        data: the whole new content, or its text in pieces (written as they come, so a large
            file never sits in memory whole).
        check: called with the written temporary file before it replaces ``path`` (e.g. to
            validate a constitution by loading it); whatever it raises leaves ``path`` untouched.

    Returns:
        ``path``.

    Raises:
        OSError: the file cannot be written (the old content is kept).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as fh:
            if isinstance(data, (str, bytes)):
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            else:
                for piece in data:
                    fh.write(piece.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> Path:
    """:func:`write_atomic` of ``json.dumps(data, **dumps)`` plus a final newline."""
    return write_atomic(path, json.dumps(data, **dumps) + "\n")


def fsync_tree(root: Path) -> None:
    """Make every file and folder under ``root`` durable (pyarrow, ``datasets`` and matplotlib
    write without fsync); a plain file is fsynced alone."""
    if root.is_file():
        with open(root, "rb+") as fh:
            os.fsync(fh.fileno())
        return
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
    for folder in sorted({p.parent for p in root.rglob("*")} | {root}):
        fsync_dir(folder)


def swap_in(staging: Path, final: Path) -> None:
    """Replace the folder or file ``final`` by ``staging`` (a sibling built in full
    beforehand), so readers see the old version or the new one, never a half-written one."""
    fsync_tree(staging)
    old = temp_sibling(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    fsync_dir(final.parent)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
