"""Where the built-in constitutions, templates and pipelines live.

In a source checkout (or an editable install) they are the top-level folders of the repo; in a
wheel they are packaged under ``rlaif/_data/``. Both layouts are looked up here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def resource_dir(kind: str) -> Path:
    """Return the folder of built-in ``constitutions``, ``prompts`` or ``pipelines``."""
    if kind not in ("constitutions", "prompts", "pipelines"):
        raise ValueError(f"unknown resource kind {kind!r}")
    for candidate in (_PKG / "_data" / kind, _PKG.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"built-in {kind} folder not found (looked in {_PKG / '_data'})")
