"""The wave ledger: which waves of which stage a run has finished, so that a re-run or a resume
skips them without rendering a request or reading a record of theirs.

The runner takes prompts in waves of :data:`WAVE`, in source order. When every record of a
wave is on disk, the stage writes one ledger entry for it, keyed by the stage, the wave's
index and a *fingerprint*: a hash of everything that decides the stage's records (the prompt
source and its revision, how it is read, the models, templates, constitution, seed, the data
stages' settings and the rlaif version). Anything that changes the records changes the
fingerprint, and the stage then checks that wave record by record, as before. An entry that
counts errors is not trusted when the run retries errors.

Entries live in ``run_dir/waves/`` as a stage store of their own (append-only, fsynced, the
newest entry per key wins), next to the stages and never counted among them. An entry may
carry data: the judge stage keeps each wave's export records in its entry, which is what the
preference export reads back (:class:`WaveRecords`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlaif.sources import PromptItem
from rlaif.sources.stream import PromptStream
from rlaif.store import StageStore, content_hash, record_id
from rlaif.store.atomic import write_atomic

WAVE = 512  # prompts per wave: bounds memory, keeps batches full
LEDGER_DIR = "waves"

__all__ = [
    "LEDGER_DIR",
    "WAVE",
    "ExportMark",
    "LazyWaves",
    "Ledger",
    "WaveRecords",
    "fingerprint",
    "pack",
]


def fingerprint(*parts: Any) -> str:
    """The fingerprint of a stage's work from what decides it (JSON values)."""
    return content_hash(["waves", WAVE, *parts])[:32]


class Ledger:
    """The finished waves of one run directory (one writer: the run holding the run lock)."""

    def __init__(self, run_dir: Path) -> None:
        self.store = StageStore(Path(run_dir) / LEDGER_DIR, "ledger", retry_errors=True)

    @staticmethod
    def key(stage: str, fp: str, index: int) -> str:
        return record_id("wave", {"stage": stage, "fingerprint": fp, "wave": index})

    def finished(
        self, stage: str, fp: str, index: int, *, retry_errors: bool = False
    ) -> dict[str, Any] | None:
        """The entry of a finished wave, or ``None`` when the wave must be (re)checked: never
        written, or written with failed records and the run retries errors."""
        entry = self.store.get(self.key(stage, fp, index))
        if entry is None or (retry_errors and entry["status"] != "ok"):
            return None
        return entry

    def finish(self, stage: str, fp: str, index: int, *, errors: int = 0, **data: Any) -> None:
        """Record wave ``index`` of ``stage`` as finished (one fsynced line). A wave with
        failed records is written as an ``error`` entry, which a later entry supersedes."""
        entry = {"id": self.key(stage, fp, index), "status": "ok", "stage": stage,
                 "wave": index, "errors": errors, **data}  # fmt: skip
        if errors:
            entry.update(status="error", reason=f"{errors} records of the wave failed")
        self.store.append([entry])

    def close(self) -> None:
        self.store.close()


class ExportMark:
    """Whether the preference export on disk is the one a stage's ``waves`` finished waves
    (ledger fingerprint ``stage_fp``) and the export ``settings`` (a dataclass) make: the
    ledger keeps the written export's statistics, and a marker file in ``export/`` says which
    export is there (removed while one is written, so an export cut short is written again)."""

    STAGE = "export-preferences"  # the ledger stage whose entry holds a written export's stats
    MARKER = ".fingerprint.preferences"

    def __init__(
        self, ledger: Ledger, run_dir: Path, stage_fp: str, waves: int, settings: Any
    ) -> None:
        self.ledger = ledger
        self.fp = content_hash([stage_fp, waves, dataclasses.asdict(settings)])
        self.marker = Path(run_dir) / "export" / self.MARKER

    def done(self) -> dict[str, Any] | None:
        """The ledger entry of this export when it is the one on disk, else ``None``."""
        entry = self.ledger.finished(self.STAGE, self.fp, 0)
        if entry is None or not self.marker.is_file():
            return None
        return entry if self.marker.read_text(encoding="utf-8") == self.fp else None

    def start(self) -> None:
        self.marker.unlink(missing_ok=True)

    def finish(self, **data: Any) -> None:
        self.ledger.finish(self.STAGE, self.fp, 0, **data)
        write_atomic(self.marker, self.fp)


class LazyWaves:
    """The waves of a prompt stream, read forward only when a stage needs one."""

    def __init__(self, prompts: PromptStream, size: int = WAVE) -> None:
        self._it = prompts.waves(size)
        self._next = 0

    def get(self, index: int) -> list[PromptItem]:
        """Wave ``index``; waves before it that were never asked for are read and dropped."""
        if index < self._next:
            raise ValueError(f"wave {index} was already read (waves are read forward only)")
        wave: list[PromptItem] = []
        while self._next <= index:
            wave = next(self._it)
            self._next += 1
        return wave


def pack(records: list[dict[str, Any]], stored: dict[str, dict[str, Any]]) -> list[Any]:
    """A wave's export records for its ledger entry: a record that is in the judge store
    (``stored``: id -> record) is kept as its id, with its status and reason when the
    selection changed them; any other record (skipped prompts, ensembles) is kept whole."""
    out: list[Any] = []
    for rec in records:
        base = stored.get(rec["id"])
        if (
            base is None
            or {**base, "status": rec["status"]}
            | ({"reason": rec["reason"]} if "reason" in rec else {})
            != rec
        ):
            out.append(rec)
            continue
        ref: dict[str, Any] = {"ref": rec["id"]}
        if rec["status"] != base["status"] or rec.get("reason") != base.get("reason"):
            ref.update(status=rec["status"], reason=rec.get("reason"))
        out.append(ref)
    return out


# References read with one query: a small bound on the records held at a time.
_READ_AHEAD = 256


class WaveRecords:
    """Records kept in the ledger entries of a stage's waves, in wave order: re-iterable,
    one wave in memory at a time (what the preference export reads). References
    (:func:`pack`) are read from ``store``."""

    def __init__(self, ledger: Ledger, stage: str, fp: str, waves: int, store: StageStore) -> None:
        self.ledger, self.stage, self.fp, self.waves = ledger, stage, fp, waves
        self.store = store

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for w in range(self.waves):
            entry = self.ledger.finished(self.stage, self.fp, w)
            if entry is None:
                raise RuntimeError(f"{self.stage} wave {w} is not finished")
            records = entry.get("records", [])
            stored: dict[str, dict[str, Any]] = {}
            for n, rec in enumerate(records):
                if "ref" not in rec:
                    yield rec
                    continue
                if rec["ref"] not in stored:  # the next references, read with one query
                    ahead = records[n : n + _READ_AHEAD]
                    stored = self.store.get_many(r["ref"] for r in ahead if "ref" in r)
                base = stored.get(rec["ref"])
                if base is None:
                    raise RuntimeError(f"{self.stage} wave {w}: record {rec['ref']} is gone")
                if "status" in rec:
                    base = {**base, "status": rec["status"]}
                    base.pop("reason", None)
                    if rec.get("reason") is not None:
                        base["reason"] = rec["reason"]
                yield base
