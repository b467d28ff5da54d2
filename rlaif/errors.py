"""The project's own error types.

Every error a user can cause is an :class:`RlaifError` whose ``str()`` is one line that names
the file, line and field involved. The CLI prints that line and exits 2; it never shows a
traceback for these.
"""

from __future__ import annotations


class RlaifError(Exception):
    """Base class for errors the user can act on (bad input, missing model, ...)."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = " ".join(str(message).split())  # always one line
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = str(field) if field is not None else None
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = _printable(self.file)
            if self.line is not None:
                where += f":{self.line}"
        field = f"field '{_printable(self.field)}'" if self.field else ""
        parts = [p for p in (where, field) if p]
        prefix = ": ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class ConfigError(RlaifError):
    """A constitution, pipeline or template file is invalid."""


class DataError(RlaifError):
    """A prompt source or dataset file is unreadable or lacks what is needed."""


class ModelError(RlaifError):
    """A model cannot be found or loaded, or a backend is unavailable."""


class BackendError(RlaifError):
    """A backend failed while serving a request."""


class StoreError(RlaifError):
    """The record store cannot read or write its files."""


def _printable(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``), so a
    file or key name taken from user data cannot split the one-line message."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )
