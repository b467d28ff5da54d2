"""The run manifest: what happened to every input, per stage, in one small JSON file.

``run_dir/manifest.json`` holds, for each stage, how many records ended ``ok`` / ``error`` /
``skipped``, why (a counter of reason strings with a few example ids each), and optionally how
many inputs the stage was expected to account for. With that, every input prompt is either
kept, filtered with a reason, or failed with a reason, and a gap shows up as ``unaccounted``.

The counts are derived data: :meth:`Manifest.from_store` recomputes them from the shards at
any time, so a manifest lost in a crash costs nothing. It is written atomically (temp file,
fsync, ``os.replace``) so readers never see half a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlaif.errors import StoreError
from rlaif.store.atomic import write_atomic
from rlaif.store.shards import StageStore

__all__ = ["MANIFEST_NAME", "Manifest", "StageSummary"]

MANIFEST_NAME = "manifest.json"
_MAX_EXAMPLES = 3
# Reasons are meant to be categories ("parse failure"), but one embedding model output would
# make a million distinct strings; cap them so the manifest stays small.
_MAX_REASONS = 100
_MAX_REASON_CHARS = 200
_OTHER = "(other reasons)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class StageSummary:
    """Counts for one stage.

    Attributes:
        ok / error / skipped: records by status (newest record per id).
        reasons: ``status -> reason -> {"count": n, "examples": [ids]}`` for error / skipped.
        expected: how many inputs this stage had to account for, if the runner said so.
    """

    ok: int = 0
    error: int = 0
    skipped: int = 0
    reasons: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    expected: int | None = None

    @property
    def total(self) -> int:
        """Records of any status."""
        return self.ok + self.error + self.skipped

    @property
    def unaccounted(self) -> int:
        """Expected inputs with no record (0 when nothing was expected)."""
        return 0 if self.expected is None else max(0, self.expected - self.total)

    def add(self, record: dict[str, Any]) -> None:
        """Count one record (its ``status``, and ``reason`` unless ok)."""
        status = record["status"]
        setattr(self, status, getattr(self, status) + 1)
        if status != "ok":
            self.add_reason(record)

    def add_reason(self, record: dict[str, Any]) -> None:
        """Count the ``reason`` of a record that is not ok (its status is counted apart)."""
        status = record["status"]
        reason = " ".join(str(record.get("reason") or "(no reason)").split())
        reason = reason[:_MAX_REASON_CHARS]
        by_reason = self.reasons.setdefault(status, {})
        if reason not in by_reason and len(by_reason) >= _MAX_REASONS:
            reason = _OTHER
        slot = by_reason.setdefault(reason, {"count": 0, "examples": []})
        slot["count"] += 1
        if len(slot["examples"]) < _MAX_EXAMPLES:
            slot["examples"].append(record["id"])

    def to_dict(self) -> dict[str, Any]:
        """JSON form (with ``total`` and ``unaccounted`` spelled out for readers)."""
        return {
            "total": self.total,
            "ok": self.ok,
            "error": self.error,
            "skipped": self.skipped,
            "expected": self.expected,
            "unaccounted": self.unaccounted,
            "reasons": self.reasons,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageSummary:
        """Inverse of :meth:`to_dict` (derived keys are ignored)."""
        return cls(
            ok=int(data.get("ok", 0)),
            error=int(data.get("error", 0)),
            skipped=int(data.get("skipped", 0)),
            reasons=dict(data.get("reasons") or {}),
            expected=data.get("expected"),
        )


@dataclass
class Manifest:
    """Per-run accounting and provenance.

    Attributes:
        stages: stage name -> :class:`StageSummary`.
        info: free-form provenance and config (constitution, models, package version, ...).
        started_at: ISO-8601 UTC time the run first started (kept across resumes).
        finished_at: when it last finished; ``None`` while running or after a crash.
    """

    stages: dict[str, StageSummary] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None

    def start(self) -> None:
        """Mark the run as started (the first start time is kept on resume)."""
        self.started_at = self.started_at or _now()
        self.finished_at = None

    def finish(self) -> None:
        """Mark the run as finished now."""
        self.finished_at = _now()

    def set_expected(self, stage: str, n_inputs: int) -> None:
        """Record that ``stage`` must account for ``n_inputs`` inputs."""
        self.stages.setdefault(stage, StageSummary()).expected = int(n_inputs)

    def problems(self) -> list[str]:
        """One line per stage whose records do not account for all of its inputs."""
        return [
            f"stage '{name}': {s.unaccounted} of {s.expected} inputs have no record"
            for name, s in self.stages.items()
            if s.unaccounted
        ]

    @classmethod
    def from_store(
        cls,
        run_dir: Path,
        *,
        stages: list[str] | None = None,
        base: Manifest | None = None,
    ) -> Manifest:
        """Recount every stage from its shards (read-only; safe while a run writes).

        Args:
            run_dir: the run directory.
            stages: stage names to count; default: every folder under ``run_dir/stages``.
            base: a manifest whose ``info``, timestamps and ``expected`` counts are kept.

        Returns:
            A new manifest; counts come only from the shards (their indexes' counters, and
            the records that are not ok for the reasons). Cost is one pass over the indexes,
            so call it at stage or run boundaries, not per batch.
        """
        run_dir = Path(run_dir)
        explicit = stages is not None
        if stages is None:
            root = run_dir / "stages"
            stages = (
                sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != ".")
                if root.is_dir()
                else []
            )
        out = cls(
            info=dict(base.info) if base else {},
            started_at=base.started_at if base else None,
            finished_at=base.finished_at if base else None,
        )
        for name in stages:
            summary = StageSummary()
            if base and name in base.stages:
                summary.expected = base.stages[name].expected
            with StageStore(run_dir, name, readonly=True) as store:
                counts = store.counts()  # kept in the index
                summary.ok, summary.error = counts["ok"], counts["error"]
                summary.skipped = counts["skipped"]
                for record in store.not_ok():  # only these are read
                    summary.add_reason(record)
            out.stages[name] = summary
        for name, old in (base.stages if base else {}).items():
            if name in out.stages:
                continue
            # Not recounted: keep the old counts if the caller limited the recount, else the
            # stage has no shards yet and only its expectation carries over.
            out.stages[name] = old if explicit else StageSummary(expected=old.expected)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form, stable key order for diffs."""
        return {
            "version": 1,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": _now(),
            "stages": {name: s.to_dict() for name, s in self.stages.items()},
            "problems": self.problems(),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Inverse of :meth:`to_dict`."""
        return cls(
            stages={k: StageSummary.from_dict(v) for k, v in (data.get("stages") or {}).items()},
            info=dict(data.get("info") or {}),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
        )

    def write(self, run_dir: Path) -> Path:
        """Atomically write ``run_dir/manifest.json``; returns its path."""
        run_dir = Path(run_dir)
        path = run_dir / MANIFEST_NAME
        try:
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"manifest info is not JSON: {exc}", file=path, field="info") from exc
        try:
            write_atomic(path, text + "\n")
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
        return path

    @classmethod
    def load(cls, run_dir: Path) -> Manifest | None:
        """Read ``run_dir/manifest.json``; ``None`` if there is none yet."""
        path = Path(run_dir) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise StoreError(
                f"invalid manifest JSON: {exc.msg}; delete it to recount from the shards",
                file=path,
                line=exc.lineno,
            ) from exc
        if not isinstance(data, dict):
            raise StoreError("manifest must be a JSON object", file=path)
        return cls.from_dict(data)
