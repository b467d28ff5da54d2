"""Export RL-CAI preference pairs: filtered, split by prompt, in TRL's formats, with a card.

Input: judged pair records in prompt-source order (``id``, ``prompt_id``, ``prompt`` messages,
``x``, ``y``, ``source``, ``verdict`` as :meth:`Verdict.to_dict`, ``status``, ``reason``).
Output under ``run_dir/export/preferences/``::

    README.md, margins.png                      the dataset card and its plot
    conversational/{train,test}.{parquet,jsonl}  TRL explicit-prompt conversational format
    conversational/disk/                        the same as a DatasetDict (save_to_disk)
    text/...                                    the plain-text format, same layout

Columns: ``prompt``, ``chosen``, ``rejected``, ``margin`` (logit of the judge's soft label,
what TRL's RewardTrainer subtracts from the reward gap) and four metadata columns: ``id``,
``prompt_id``, ``source`` and ``p_chosen``. TRL 1.16 tolerates them: DPOTrainer and
RewardTrainer tokenize from ``prompt`` / ``chosen`` / ``rejected`` only, drop unused columns
(``remove_unused_columns``) and their collators pick their own keys even when columns are kept.
Names TRL reads and that a metadata column must never take: :data:`TRL_RESERVED`.

Text rendering (:func:`render_prompt_text`): a conversation of one user turn is its text; any
other conversation becomes an Anthropic-HH-style transcript (``System:`` / ``Human:`` /
``Assistant:`` blocks joined by blank lines) ending in ``"\\n\\nAssistant:"``. ``chosen`` and
``rejected`` are the responses, stripped, with no separator: TRL concatenates prompt + response,
so a plain-text user who wants one adds it.

Which records become rows, and the reason counted for each one that does not:
:mod:`rlaif.export.filters`. Rows keep input order; the split is a hash of the prompt text, so
the same input gives the same bytes, and all pairs of one prompt land in one split. Every file is
written as a stream, row by row (:mod:`rlaif.export.writers`), so memory stays flat however many
rows there are. Uploading a finished export: :func:`rlaif.export.card.push_to_hub`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rlaif.errors import StoreError
from rlaif.export.card import push_to_hub, render_card
from rlaif.export.filters import SPLITS, PreferenceExportConfig, PreferenceStream
from rlaif.export.split import SplitRule
from rlaif.export.stats import RowTally, plot_margin_values, summarize
from rlaif.export.writers import RowSink, write_dataset_dict
from rlaif.store import Manifest
from rlaif.store.atomic import remove_stale, swap_in, temp_sibling

META_COLUMNS = ("id", "prompt_id", "source", "p_chosen")
# Keys TRL 1.16's preference trainers read from a row besides prompt/chosen/rejected/margin:
# a metadata column with one of these names would change what they do.
TRL_RESERVED = frozenset(
    {"messages", "completion", "label", "tools", "chat_template_kwargs", "image", "images"}
    | {"prompt_ids", "chosen_ids", "rejected_ids", "chosen_input_ids", "rejected_input_ids"}
    | {"ref_chosen_logps", "ref_rejected_logps"}
)
ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}


# -- rows ---------------------------------------------------------------------------------------


def render_prompt_text(messages: list[dict[str, str]]) -> str:
    """The plain-text prompt of a conversation (rule in the module docstring).

    >>> render_prompt_text([{"role": "user", "content": "Hi?"}])
    'Hi?'
    >>> render_prompt_text([{"role": "system", "content": "Be kind."},
    ...                     {"role": "user", "content": "Hi?"}])
    'System: Be kind.\\n\\nHuman: Hi?\\n\\nAssistant:'
    """
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    turns = [f"{ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def split_rows(rows: list[dict[str, Any]], test_size: float, seed: int) -> list[str]:
    """``"train"`` or ``"test"`` for each row, by a seeded hash of its prompt text.

    The rule (:class:`rlaif.export.split.SplitRule`): a prompt goes to test when its hash, read
    as a number in [0, 1), is below ``test_size``, so a grown dataset keeps its test set. With
    two or more prompts and ``test_size > 0``, at least one prompt (the lowest hash) is in
    test; at least one (the highest) is always in train, so a single prompt is train.
    """
    rule = SplitRule(test_size, seed)
    for key in dict.fromkeys(row["_prompt_key"] for row in rows):
        rule.add(key)
    return [rule.of(row["_prompt_key"]) for row in rows]


def variant_row(row: dict[str, Any], variant: str) -> dict[str, Any]:
    """The exported form of a kept row: conversational messages or plain text."""
    out = {k: row[k] for k in ("prompt", "chosen", "rejected", "margin", *META_COLUMNS)}
    if variant == "text":
        out["prompt"] = render_prompt_text(row["prompt"])
        out["chosen"] = row["chosen"][0]["content"]
        out["rejected"] = row["rejected"][0]["content"]
    return out


def _features(variant: str):  # -> datasets.Features
    import datasets

    text = datasets.Value("string")
    msgs = datasets.List({"role": text, "content": text})
    kind = msgs if variant == "conversational" else text
    cols = {"prompt": kind, "chosen": kind, "rejected": kind, "margin": datasets.Value("float64")}
    cols |= {"id": text, "prompt_id": text, "source": text, "p_chosen": datasets.Value("float64")}
    return datasets.Features(cols)


# -- files ---------------------------------------------------------------------------------------


def _write_variant(folder: Path, variant: str, formats: tuple[str, ...]) -> dict[str, RowSink]:
    """Open the files of one variant for writing: a sink per split, in each of ``formats``."""
    folder.mkdir(parents=True)
    return {
        s: RowSink(
            _features(variant),
            jsonl=folder / f"{s}.jsonl" if "jsonl" in formats else None,
            parquet=folder / f"{s}.parquet" if "parquet" in formats else None,
            disk=folder / "disk" / s if "disk" in formats else None,
        )
        for s in SPLITS
    }


def _file_list(variant: str, formats: tuple[str, ...]) -> list[str]:
    """The files of one variant, in the order of ``formats`` (as the manifest lists them)."""
    files = []
    for fmt in formats:
        if fmt == "disk":
            files.append(f"{variant}/disk")
        else:
            files += [f"{variant}/{s}.{fmt}" for s in SPLITS]
    return files


def _write(stream: PreferenceStream, staging: Path, cfg: PreferenceExportConfig) -> RowTally:
    """The second pass: every kept row into the sinks of its split, and into the tally."""
    sinks: dict[tuple[str, str], RowSink] = {}
    tally = RowTally()
    try:
        for variant in cfg.variants:
            for s, sink in _write_variant(staging / variant, variant, cfg.formats).items():
                sinks[variant, s] = sink
        for split, row in stream.rows():
            tally.add(row, split)
            for variant in cfg.variants:
                sinks[variant, split].write(variant_row(row, variant))
        for sink in sinks.values():
            sink.close()
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    if "disk" in cfg.formats:
        for variant in cfg.variants:
            write_dataset_dict(staging / variant / "disk", SPLITS)
    return tally


def export_preferences(
    records: Iterable[Mapping[str, Any]],
    run_dir: str | Path,
    cfg: PreferenceExportConfig,
    provenance: Mapping[str, Any],
    manifest: Manifest,
) -> dict[str, Any]:
    """Filter, split and write the preference datasets, card and plot; push if configured.

    The records are read twice, as a stream (:class:`rlaif.export.filters.PreferenceStream`):
    once to filter and count, once to write every file row by row
    (:class:`rlaif.export.writers.RowSink`). Memory does not grow with the rows but for
    digests and two floats per row (see those classes).

    Args:
        records: judged pair records, in prompt-source order: a list, or a source whose
            ``__iter__`` gives the same records again each time (not a one-shot iterator).
        run_dir: the run directory; files go to ``run_dir/export/preferences``.
        cfg: filters, split and formats.
        provenance: constitution, models, template hashes, judge config, seeds, version
            (see :func:`rlaif.export.card.render_card`); secrets in it are never written.
        manifest: its ``info["export"]["preferences"]`` gets the counts and filter reasons.

    Returns:
        The statistics written to the manifest (``files`` and ``export_dir`` say where the
        rows are; they are not returned).

    Raises:
        DataError: a malformed record. StoreError: the files cannot be written (the records
        are untouched). PushToHubError (``cfg.push_to_hub``): the upload failed; the local
        export and ``manifest.info`` are complete. TypeError: a one-shot iterator of records.
    """
    stream = PreferenceStream(records, cfg)  # the first pass: filters and counts
    out = Path(run_dir) / "export" / "preferences"
    staging = temp_sibling(out)
    try:
        remove_stale(out)  # leftovers of an interrupted export
        staging.mkdir(parents=True)
        tally = _write(stream, staging, cfg)
        stats = summarize(stream.sel, tally, stream.split.counts(), cfg)
        stats["files"] = {v: _file_list(v, cfg.formats) for v in cfg.variants}
        if cfg.plot:
            plot_margin_values(tally.margins, tally.p_chosen, staging / "margins.png")
            stats["plot"] = "margins.png"
        card = render_card(stats, provenance, cfg)
        (staging / "README.md").write_text(card, encoding="utf-8")
        swap_in(staging, out)
    except OSError as exc:
        raise StoreError(
            f"cannot write the preference export: {exc.strerror or exc}; the records are safe, "
            "re-run to export again",
            file=getattr(exc, "filename", None) or out,
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful swap
    stats["export_dir"] = str(out)
    manifest.info.setdefault("export", {})["preferences"] = stats
    if cfg.push_to_hub:
        stats["hub"] = {"repo_id": cfg.push_to_hub, "url": None}
        stats["hub"]["url"] = push_to_hub(out, cfg.push_to_hub, private=cfg.private)
    return stats
