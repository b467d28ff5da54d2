"""Advisory file locks so two processes never write the same run (or stage) at once.

``fcntl.flock`` locks belong to the open file, so the kernel drops them when the holder exits
or is killed: a crashed run never leaves a stale lock behind, unlike pid files. The holder's
pid is written into the lock file only to make the error message useful.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from rlaif.errors import StoreError

__all__ = ["FileLock", "RunLock"]


class FileLock:
    """An exclusive, non-blocking ``flock`` on ``path``.

    Args:
        path: the lock file (created if missing).
        what: how to name the locked thing in the error, e.g. ``"run dir runs/x"``.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreError` naming the pid that holds it."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"{self.what} is in use by pid {holder}; wait for it to finish or stop it"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (idempotent). The file stays; deleting it would race a new holder."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):  # only the pid hint would be lost
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        # Closing the descriptor is what frees the lock; do it even if release() was skipped.
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None


class RunLock(FileLock):
    """Exclusive lock on a run directory (``run_dir/.lock``).

    Use as a context manager around everything that writes the run::

        with RunLock(run_dir):
            ...

    Raises:
        StoreError: ``run dir X is in use by pid N`` when another process holds it.
    """

    def __init__(self, run_dir: Path) -> None:
        run_dir = Path(run_dir)
        super().__init__(run_dir / ".lock", f"run dir {run_dir}")
        self.run_dir = run_dir

    def __enter__(self) -> RunLock:
        self.acquire()
        return self
