"""Export SL-CAI results: an SFT dataset and CAI-SL preference pairs, in TRL's formats.

* SFT (``messages``): the prompt turns plus the final revision as the assistant turn.
* Pairs (explicit-prompt conversational): ``prompt`` messages, ``chosen`` = the final revision,
  ``rejected`` = the initial response, each as a one-message assistant list.

Rows follow the order of the prompt source, so an interrupted-and-resumed run exports the same
bytes as an uninterrupted one. Every trace is accounted for: exported, or filtered with a reason.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.errors import StoreError
from rlaif.store import Manifest
from rlaif.store.atomic import remove_stale, swap_in, temp_sibling, write_atomic

if TYPE_CHECKING:
    from rlaif.config.schema import ExportConfig


def sl_cai_rows(
    traces: Iterable[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter[str]]:
    """Build SFT rows and pair rows from trace records; returns (sft, pairs, filtered)."""
    sft, pairs = [], []
    filtered: Counter[str] = Counter()
    for t in traces:
        if t.get("status") != "ok":
            filtered[f"generation failed: {str(t.get('reason', '')).split(':')[0]}"] += 1
            continue
        final, initial = t["final_response"].strip(), t["initial_response"].strip()
        if not final:
            filtered["empty revision"] += 1
            continue
        sft.append(
            {
                "messages": [*t["prompt"], {"role": "assistant", "content": final}],
                "prompt_id": t["prompt_id"],
            }
        )
        if not initial:
            filtered["empty initial response"] += 1
        elif final == initial:
            filtered["revision identical to initial response"] += 1
        else:
            pairs.append(
                {
                    "prompt": t["prompt"],
                    "chosen": [{"role": "assistant", "content": final}],
                    "rejected": [{"role": "assistant", "content": initial}],
                    "prompt_id": t["prompt_id"],
                    "principle_ids": t.get("principle_ids", []),
                }
            )
    return sft, pairs, filtered


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    """Replace ``path`` atomically with one JSON line per row (keys sorted, UTF-8 as is)."""
    write_atomic(path, (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


SFT_COLUMNS = ("messages", "prompt_id")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "prompt_id", "principle_ids")


def _write_dataset(
    rows: list[dict[str, Any]], folder: Path, fmt: str, columns: tuple[str, ...]
) -> None:
    import datasets

    datasets.disable_progress_bars()  # the run's own progress line is enough
    if rows:
        ds = datasets.Dataset.from_list(rows)
    else:  # keep the columns so an empty export still loads
        ds = datasets.Dataset.from_dict({c: [] for c in columns})
    remove_stale(folder)
    tmp = temp_sibling(folder)
    try:
        if fmt == "parquet":
            ds.to_parquet(str(tmp))
        else:  # one shard: datasets 5 writes no file for 0 rows otherwise
            ds.save_to_disk(str(tmp), num_shards=1)
        swap_in(tmp, folder)
    finally:  # left only by a failed write: a file (parquet) or a folder
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def export_sl_cai(
    run_dir: Path,
    traces: list[dict[str, Any] | None],
    cfg: ExportConfig,
    manifest: Manifest,
) -> dict[str, Any]:
    """Write the SFT and pair datasets under ``run_dir/export`` and account for them.

    Args:
        run_dir: the run directory.
        traces: the critique-and-revise trace records, in prompt-source order (rows follow it).
        cfg: what to export and in which formats.
        manifest: its ``info["export"]`` gets the counts and filter reasons.
    """
    records = [t for t in traces if t is not None]
    sft, pairs, filtered = sl_cai_rows(r for r in records if r is not None)
    out = Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    try:
        for name, rows, wanted, columns in (
            ("sft", sft, cfg.sft, SFT_COLUMNS),
            ("pairs", pairs, cfg.pairs, PAIR_COLUMNS),
        ):
            if not wanted:
                continue
            paths = []
            for fmt in cfg.formats:
                if fmt == "jsonl":
                    path = out / f"{name}.jsonl"
                    write_jsonl(rows, path)
                else:
                    path = out / (f"{name}.parquet" if fmt == "parquet" else name)
                    _write_dataset(rows, path, fmt, columns)
                paths.append(str(path))
            written[name] = {"rows": len(rows), "paths": paths}
    except OSError as exc:
        raise StoreError(
            f"cannot write the export: {exc.strerror or exc}; the records are safe, "
            "re-run to export again",
            file=getattr(exc, "filename", None) or out,
        ) from None
    manifest.info.setdefault("export", {}).update(
        {
            "sft_rows": len(sft),
            "pair_rows": len(pairs),
            "filtered": dict(filtered),
            "files": written,
        }
    )
    return {"sft": sft, "pairs": pairs, "filtered": dict(filtered), "files": written}
