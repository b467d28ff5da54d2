"""Export SL-CAI results: an SFT dataset and CAI-SL preference pairs, in TRL's formats.

* SFT (``messages``): the prompt turns plus the final revision as the assistant turn.
* Pairs (explicit-prompt conversational): ``prompt`` messages, ``chosen`` = the final revision,
  ``rejected`` = the initial response, each as a one-message assistant list.

Rows follow the order of the prompt source, so an interrupted-and-resumed run exports the same
bytes as an uninterrupted one. Every trace is accounted for: exported, or filtered with a reason.
The traces are read once, as a stream, and every file is written row by row
(:class:`rlaif.export.writers.RowSink`): memory does not grow with the number of traces.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlaif.errors import StoreError
from rlaif.export.writers import RowSink, json_line
from rlaif.store import Manifest
from rlaif.store.atomic import remove_stale, swap_in, temp_sibling, write_atomic

if TYPE_CHECKING:
    from rlaif.config.schema import ExportConfig

SFT_COLUMNS = ("messages", "prompt_id")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "prompt_id", "principle_ids")


def iter_sl_cai_rows(
    traces: Iterable[Mapping[str, Any] | None], filtered: Counter[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``("sft", row)`` and ``("pairs", row)`` for each trace, in order; what a trace does not
    give is counted in ``filtered`` by reason. ``None`` entries (no trace) are skipped."""
    for t in traces:
        if t is None:
            continue
        if t.get("status") != "ok":
            filtered[f"generation failed: {str(t.get('reason', '')).split(':')[0]}"] += 1
            continue
        final, initial = t["final_response"].strip(), t["initial_response"].strip()
        if not final:
            filtered["empty revision"] += 1
            continue
        yield (
            "sft",
            {
                "messages": [*t["prompt"], {"role": "assistant", "content": final}],
                "prompt_id": t["prompt_id"],
            },
        )
        if not initial:
            filtered["empty initial response"] += 1
        elif final == initial:
            filtered["revision identical to initial response"] += 1
        else:
            yield (
                "pairs",
                {
                    "prompt": t["prompt"],
                    "chosen": [{"role": "assistant", "content": final}],
                    "rejected": [{"role": "assistant", "content": initial}],
                    "prompt_id": t["prompt_id"],
                    "principle_ids": t.get("principle_ids", []),
                },
            )


def sl_cai_rows(
    traces: Iterable[Mapping[str, Any] | None],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Counter[str]]:
    """Build SFT rows and pair rows from trace records; returns (sft, pairs, filtered).

    Holds every row: for small inputs. The export streams them (:func:`iter_sl_cai_rows`).
    """
    out: dict[str, list[dict[str, Any]]] = {"sft": [], "pairs": []}
    filtered: Counter[str] = Counter()
    for kind, row in iter_sl_cai_rows(traces, filtered):
        out[kind].append(row)
    return out["sft"], out["pairs"], filtered


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: Path) -> None:
    """Replace ``path`` atomically with one JSON line per row (keys sorted, UTF-8 as is)."""
    write_atomic(path, (json_line(r).decode("utf-8") for r in rows))


def _features(name: str) -> Any:  # -> datasets.Features
    import datasets

    text = datasets.Value("string")
    msgs = datasets.List({"role": text, "content": text})
    if name == "sft":
        return datasets.Features({"messages": msgs, "prompt_id": text})
    cols = {"prompt": msgs, "chosen": msgs, "rejected": msgs, "prompt_id": text}
    return datasets.Features(cols | {"principle_ids": datasets.List(text)})


def _final_path(out: Path, name: str, fmt: str) -> Path:
    return out / {"jsonl": f"{name}.jsonl", "parquet": f"{name}.parquet"}.get(fmt, name)


def export_sl_cai(
    run_dir: Path,
    traces: Iterable[Mapping[str, Any] | None],
    cfg: ExportConfig,
    manifest: Manifest,
) -> dict[str, Any]:
    """Write the SFT and pair datasets under ``run_dir/export`` and account for them.

    Each file is written next to its final place and swapped in when every file is complete.

    Args:
        run_dir: the run directory.
        traces: the critique-and-revise trace records (``None`` for none), in prompt-source
            order (rows follow it); read once, so any iterable does.
        cfg: what to export and in which formats.
        manifest: its ``info["export"]`` gets the counts and filter reasons.

    Returns:
        ``filtered`` and ``files`` (rows and paths per dataset), and ``sft`` and ``pairs``:
        their first ``cfg.show`` rows only (what the command line prints), never all rows.
    """
    out = Path(run_dir) / "export"
    out.mkdir(parents=True, exist_ok=True)
    wanted = [n for n, on in (("sft", cfg.sft), ("pairs", cfg.pairs)) if on]
    temps = {(n, f): temp_sibling(_final_path(out, n, f)) for n in wanted for f in cfg.formats}
    sinks: dict[str, RowSink] = {}
    filtered: Counter[str] = Counter()
    counts = {"sft": 0, "pairs": 0}
    preview: dict[str, list[dict[str, Any]]] = {"sft": [], "pairs": []}
    try:
        for name, fmt in temps:
            remove_stale(_final_path(out, name, fmt))  # leftovers of a killed export
        for name in wanted:
            sinks[name] = RowSink(
                _features(name),
                jsonl=temps.get((name, "jsonl")),
                parquet=temps.get((name, "parquet")),
                disk=temps.get((name, "disk")),
            )
        for kind, row in iter_sl_cai_rows(traces, filtered):
            counts[kind] += 1
            if len(preview[kind]) < cfg.show:
                preview[kind].append(row)
            if kind in sinks:
                sinks[kind].write(row)
        for sink in sinks.values():
            sink.close()
        for (name, fmt), tmp in temps.items():
            swap_in(tmp, _final_path(out, name, fmt))
    except OSError as exc:
        raise StoreError(
            f"cannot write the export: {exc.strerror or exc}; the records are safe, "
            "re-run to export again",
            file=getattr(exc, "filename", None) or out,
        ) from None
    finally:
        for sink in sinks.values():
            sink.abort()  # a no-op for closed files
        for tmp in temps.values():  # left only by a failed export: a file or a folder
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
    written = {
        n: {"rows": counts[n], "paths": [str(_final_path(out, n, f)) for f in cfg.formats]}
        for n in wanted
    }
    manifest.info.setdefault("export", {}).update(
        {
            "sft_rows": counts["sft"],
            "pair_rows": counts["pairs"],
            "filtered": dict(filtered),
            "files": written,
        }
    )
    return {**preview, "filtered": dict(filtered), "files": written}
