"""What a finished training step or evaluation leaves behind, and how a re-run recognises it.

A step's folder gets ``done.json`` last, atomically, holding the step's hash: a content hash of
its settings and of its inputs (data files, the models it starts from). A later run whose hash
matches skips the step without loading anything.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlaif.store import content_hash
from rlaif.store.atomic import write_json_atomic

DONE = "done.json"


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def data_hash(path: Path) -> str | None:
    """A content hash of a data file or folder (None when it does not exist).

    A ``save_to_disk`` folder is rewritten by every export with a fresh ``state.json``
    fingerprint, and a trainer reading it leaves ``cache-*.arrow`` files of its ``map`` calls
    beside the data, so only the data and schema files count; the rows decide, not the write
    or the reader.
    """
    if path.is_file():
        return file_hash(path)
    if not path.is_dir():
        return None
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name != "state.json"
        and not p.name.startswith(".")
        and not (p.name.startswith("cache-") and p.suffix == ".arrow")
    )
    return content_hash([[str(p.relative_to(path)), file_hash(p)] for p in files])


def model_identity(
    model: str, revision: str | None, upstream: dict[str, str], backend: str = ""
) -> Any:
    """A trained step's model is known by that step's hash; any other by its revision."""
    if model in upstream:
        return {"step": upstream[model]}
    if backend == "fake":  # no weights to resolve
        return {"model": model, "backend": backend}
    from rlaif.backends import resolve_model

    return {"model": model, "revision": resolve_model(model, revision=revision).revision}


def clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path: Path, data: Any) -> None:
    """``done.json`` and ``summary.json``: sorted keys, non-finite numbers as null, atomic."""
    write_json_atomic(path, clean(data), indent=1, sort_keys=True, allow_nan=False)


def read_done(folder: Path, name: str = DONE) -> dict[str, Any] | None:
    """The ``done.json`` (or another JSON file ``name``) of a step or of the evaluation, or
    None (missing or unreadable)."""
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
