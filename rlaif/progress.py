"""Progress lines for long stages: done/total, rate, tokens/s and ETA, fit for a TTY or CI log.

On a terminal one line is redrawn in place (``\\r``) at most every 0.5 s. Anywhere else (CI
logs, files, pipes) a plain line is printed every 5 s or at each 10 % step, whichever comes
first, so logs stay short but show that the run is alive. A resumed stage starts at
``initial``: that work shows as done, and rates and the ETA count only new work.

Only the standard library is used.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "format_duration", "format_rate"]


def format_duration(seconds: float | None) -> str:
    """``12s``, ``4m05s``, ``3h07m``, or ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(rate: float) -> str:
    """A rate with precision that suits its size: ``1234``, ``56.7``, ``0.42``."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    return f"{rate:.2f}"


class Progress:
    """Report progress of ``total`` units of work.

    Args:
        total: units to do in all (including ``initial``); ``None`` or 0 if unknown.
        desc: what is being done, e.g. the stage name.
        unit: plural name of a unit.
        stream: where to write; default ``sys.stderr`` (looked up at creation).
        initial: units already done before this run (resumed work).
        quiet: print nothing at all.
        tty: force terminal (``True``) or log (``False``) style; default: ``stream.isatty()``.
        interval: seconds between redraws / lines; default 0.5 on a TTY, 5 otherwise.
        clock: time source (seconds), replaceable in tests.

    Example::

        with Progress(len(prompts), "judge", initial=len(done)) as bar:
            for batch in batches:
                ...
                bar.update(len(batch), tokens=n_tokens)
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "items",
        stream: TextIO | None = None,
        *,
        initial: int = 0,
        quiet: bool = False,
        tty: bool | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total or None
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.initial = initial
        self.n = initial
        self.tokens = 0
        self.quiet = quiet
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.interval = interval if interval is not None else (0.5 if tty else 5.0)
        self._clock = clock
        self._start = clock()
        self._last_draw = self._start
        self._last_step = self._step()
        self._width = 0  # length of the last in-place line, to blank out leftovers
        self._closed = False
        self._lock = threading.Lock()
        if self.tty:
            self._emit(self.format())
        elif initial:
            self._emit(f"{self.format()} (resuming)")

    # -- numbers --------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        """Seconds since this progress started."""
        return max(0.0, self._clock() - self._start)

    @property
    def rate(self) -> float | None:
        """New units per second (resumed units excluded); ``None`` before any time passed."""
        elapsed = self.elapsed
        return (self.n - self.initial) / elapsed if elapsed > 0 else None

    @property
    def token_rate(self) -> float | None:
        """Tokens per second, or ``None`` when no tokens were reported."""
        elapsed = self.elapsed
        return self.tokens / elapsed if self.tokens and elapsed > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; ``None`` if the total or rate is unknown."""
        rate = self.rate
        if self.total is None or not rate:
            return None
        return max(0, self.total - self.n) / rate

    def _step(self) -> int:
        """Index of the 10 % step reached (0..10); -1 without a total."""
        return -1 if self.total is None else min(10, self.n * 10 // self.total)

    # -- text -----------------------------------------------------------------------------

    def _count(self) -> str:
        if self.total is None:
            return f"{self.n} {self.unit}"
        pct = 100.0 * self.n / self.total
        return f"{self.n}/{self.total} {self.unit} ({pct:.1f}%)"

    def _rates(self) -> list[str]:
        parts = []
        if self.rate is not None and self.n > self.initial:
            parts.append(f"{format_rate(self.rate)} {self.unit}/s")
        if self.token_rate is not None:
            parts.append(f"{format_rate(self.token_rate)} tok/s")
        return parts

    def format(self) -> str:
        """The current progress line (without ``\\r`` or newline)."""
        parts = [f"{self.desc}: {self._count()}", *self._rates()]
        if self.total is not None:
            parts.append(f"ETA {format_duration(self.eta)}")
        return " | ".join(parts)

    def summary(self) -> str:
        """The final line: what was done, in how long, how fast."""
        complete = self.total is None or self.n >= self.total
        verb = "done" if complete else "stopped"
        parts = [f"{self.desc}: {self._count()} {verb} in {format_duration(self.elapsed)}"]
        parts += self._rates()
        if self.initial:
            parts.append(f"{self.initial} resumed")
        return " | ".join(parts)

    # -- output ---------------------------------------------------------------------------

    def _emit(self, line: str, *, final: bool = False) -> None:
        if self.quiet:
            return
        try:
            if self.tty:
                columns = shutil.get_terminal_size((100, 20)).columns - 1
                line = line[:columns]
                pad = " " * max(0, self._width - len(line))
                self._width = len(line)
                self.stream.write(f"\r{line}{pad}" + ("\n" if final else ""))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            # A closed or broken stream must never stop the work it reports on.
            self.quiet = True

    def update(self, n: int = 1, tokens: int = 0) -> None:
        """Count ``n`` more units done (and ``tokens`` generated); redraw if it is time."""
        with self._lock:
            self.n += n
            self.tokens += tokens
            if self.quiet or self._closed:
                return
            now = self._clock()
            due = now - self._last_draw >= self.interval
            step = self._step()
            if not self.tty and step > self._last_step:
                due = True  # a new 10 % step in a log
            if due:
                self._last_draw = now
                self._last_step = step
                self._emit(self.format())

    def close(self) -> None:
        """Print the summary line (once)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._emit(self.summary(), final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
