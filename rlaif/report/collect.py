"""Read what a run directory holds, for the report: manifest, stage records, exports, training
and evaluation outputs. Read-only: nothing under the run directory is created or changed.

Layout read (every part optional, each section of the report says "not run" without it)::

    manifest.json                         run summary, counts per stage, export statistics
    stages/<stage>/shard-*.jsonl          records (critique-N, judge, judge-2, ...)
    export/preferences/<variant>/...      kept preference rows (jsonl, parquet or disk)
    train/<step>/{curves.jsonl, metrics.json}
    eval/{eval.json, responses.jsonl}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.errors import DataError
from rlaif.store import Manifest, StageStore

CRITIQUE_STAGE = re.compile(r"^critique-(\d+)$")
JUDGE_STAGE = re.compile(r"^judge(?:-(\d+))?$")
TRACE_STAGE = "critique_revise"
PREFERENCE_VARIANTS = ("conversational", "text")
SPLITS = ("train", "test")


@dataclass
class TrainStep:
    """One training step's outputs: ``train/<name>/``."""

    name: str
    path: Path
    curves: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] | None = None


@dataclass
class EvalData:
    """``eval/eval.json`` and its ``responses.jsonl`` rows (empty when absent)."""

    path: Path
    report: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)


def read_json(path: Path) -> Any:
    """A JSON file's content.

    Raises:
        DataError: unreadable or not JSON, naming the file and line.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        msg = getattr(exc, "msg", exc)
        raise DataError(f"not valid JSON: {msg}", file=str(path), line=line) from None


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSONL file, one a line (blank lines skipped).

    Raises:
        DataError: a line that is not a JSON object, naming the file and line.
    """
    try:
        fh = path.open(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"not valid JSON: {exc.msg}", file=str(path), line=n) from None
            if not isinstance(obj, dict):
                raise DataError("expected a JSON object", file=str(path), line=n)
            yield obj


def load_manifest(run_dir: Path) -> dict[str, Any] | None:
    """``manifest.json`` as JSON, recounted from the shards when the file is missing (a run
    that crashed before writing it), or None when there is neither."""
    path = run_dir / "manifest.json"
    if path.is_file():
        data = read_json(path)
        if not isinstance(data, dict):
            raise DataError("manifest must be a JSON object", file=str(path))
        return data
    if stage_names(run_dir):
        return Manifest.from_store(run_dir).to_dict()
    return None


def stage_names(run_dir: Path) -> list[str]:
    """Stage folders under ``stages/``, sorted."""
    root = run_dir / "stages"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def iter_stage(run_dir: Path, stage: str) -> Iterator[dict[str, Any]]:
    """The newest record of every id of one stage, in file order (read-only, lock-free, so a
    report can be made while the run still writes)."""
    with StageStore(run_dir, stage, readonly=True) as store:
        yield from store.iter_records()


def critique_stages(names: list[str]) -> list[tuple[int, str]]:
    """(round, stage) of the ``critique-N`` stages, by round."""
    found = [(int(m.group(1)), n) for n in names if (m := CRITIQUE_STAGE.match(n))]
    return sorted(found)


def judge_stages(names: list[str]) -> list[str]:
    """``judge``, ``judge-2``, ... in model order."""
    found = [(int(m.group(1) or 1), n) for n in names if (m := JUDGE_STAGE.match(n))]
    return [n for _, n in sorted(found)]


def preference_rows(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The kept preference rows of both splits and where they came from, or ([], None).

    Reads the first variant and format present: JSONL, then Parquet, then a ``save_to_disk``
    folder (the export writes the same rows in every format it was asked for).
    """
    root = run_dir / "export" / "preferences"
    for variant in PREFERENCE_VARIANTS:
        folder = root / variant
        if all((folder / f"{s}.jsonl").is_file() for s in SPLITS):
            rows = [r for s in SPLITS for r in iter_jsonl(folder / f"{s}.jsonl")]
            return rows, f"{variant}/{{train,test}}.jsonl"
        if all((folder / f"{s}.parquet").is_file() for s in SPLITS):
            import pyarrow.parquet as pq

            rows = []
            for s in SPLITS:
                try:
                    rows += pq.read_table(folder / f"{s}.parquet").to_pylist()
                except Exception as exc:  # pyarrow raises several types for a broken file
                    raise DataError(f"cannot read parquet: {exc}", file=str(folder / s)) from None
            return rows, f"{variant}/{{train,test}}.parquet"
        if (folder / "disk").is_dir():
            import datasets

            try:
                dd = datasets.load_from_disk(str(folder / "disk"))
            except Exception as exc:  # datasets raises several types for a broken folder
                raise DataError(f"cannot load dataset: {exc}", file=str(folder / "disk")) from None
            return [r for s in SPLITS if s in dd for r in dd[s]], f"{variant}/disk"
    return [], None


def train_steps(run_dir: Path) -> list[TrainStep]:
    """Every ``train/<step>/`` folder with curves or metrics, sorted by name."""
    root = run_dir / "train"
    if not root.is_dir():
        return []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return train_folders([(d.name, d) for d in folders])


def train_folders(folders: list[tuple[str, Path]]) -> list[TrainStep]:
    """The training steps among (name, folder): those with curves or metrics."""
    steps = []
    for name, d in folders:
        step = TrainStep(name, d)
        if (d / "curves.jsonl").is_file():
            step.curves = list(iter_jsonl(d / "curves.jsonl"))
        if (d / "metrics.json").is_file():
            metrics = read_json(d / "metrics.json")
            if not isinstance(metrics, dict):
                raise DataError("expected a JSON object", file=str(d / "metrics.json"))
            step.metrics = metrics
        if step.curves or step.metrics is not None:
            steps.append(step)
    return steps


def eval_data(run_dir: Path, folder: Path | None = None) -> EvalData | None:
    """``eval/eval.json`` (required for the section) and ``eval/responses.jsonl`` (or those
    of another evaluation ``folder``)."""
    folder = folder if folder is not None else run_dir / "eval"
    if not (folder / "eval.json").is_file():
        return None
    report = read_json(folder / "eval.json")
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise DataError("expected an object with 'metrics'", file=str(folder / "eval.json"))
    rows = []
    if (folder / "responses.jsonl").is_file():
        rows = list(iter_jsonl(folder / "responses.jsonl"))
    return EvalData(folder, report, rows)
