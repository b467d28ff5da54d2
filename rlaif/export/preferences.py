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
the same input gives the same bytes, and all pairs of one prompt land in one split. Uploading a
finished export: :func:`rlaif.export.card.push_to_hub`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rlaif.errors import StoreError
from rlaif.export.card import plot_margins, push_to_hub, render_card, summarize
from rlaif.export.filters import SPLITS, PreferenceExportConfig, select_preferences
from rlaif.export.sl_cai import write_jsonl
from rlaif.store import Manifest, content_hash
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

    A prompt goes to test when its hash, read as a number in [0, 1), is below ``test_size``:
    a prompt's split never depends on the other prompts, so a grown dataset keeps its test
    set. With two or more prompts and ``test_size > 0``, at least one prompt (the lowest hash)
    is in test; at least one (the highest) is always in train, so a single prompt is train.
    """
    keys = list(dict.fromkeys(row["_prompt_key"] for row in rows))
    u = {k: int(content_hash([seed, k])[:16], 16) / 16**16 for k in keys}
    test = {k for k in keys if u[k] < test_size}
    if len(keys) >= 2 and test_size > 0 and not test:
        test.add(min(keys, key=u.__getitem__))
    if keys and test == set(keys):  # never all test: a test split needs something trained
        test.discard(max(keys, key=u.__getitem__))
    return ["test" if row["_prompt_key"] in test else "train" for row in rows]


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


# -- files --------------------------------------------------------------------------------------


def _write_variant(
    folder: Path, variant: str, splits: dict[str, list[dict]], formats: tuple[str, ...]
) -> list[Path]:
    import datasets

    datasets.disable_progress_bars()
    folder.mkdir(parents=True)
    feats = _features(variant)
    dss = {
        s: datasets.Dataset.from_list(r, features=feats)
        if r
        else datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
        for s, r in splits.items()
    }
    paths = []
    for fmt in formats:
        if fmt == "disk":
            # An empty split needs an explicit shard: datasets 5.2 writes none by default,
            # and load_from_disk then fails on the missing file.
            shards = {s: 1 for s, r in splits.items() if not r}
            datasets.DatasetDict(dss).save_to_disk(str(folder / "disk"), num_shards=shards)
            paths.append(folder / "disk")
        for s, rows in splits.items():
            if fmt == "jsonl":
                write_jsonl(rows, folder / f"{s}.jsonl")
                paths.append(folder / f"{s}.jsonl")
            elif fmt == "parquet":
                dss[s].to_parquet(str(folder / f"{s}.parquet"))
                paths.append(folder / f"{s}.parquet")
    return paths


def export_preferences(
    records: Iterable[Mapping[str, Any]],
    run_dir: str | Path,
    cfg: PreferenceExportConfig,
    provenance: Mapping[str, Any],
    manifest: Manifest,
) -> dict[str, Any]:
    """Filter, split and write the preference datasets, card and plot; push if configured.

    Args:
        records: judged pair records, in prompt-source order.
        run_dir: the run directory; files go to ``run_dir/export/preferences``.
        cfg: filters, split and formats.
        provenance: constitution, models, template hashes, judge config, seeds, version
            (see :func:`rlaif.export.card.render_card`); secrets in it are never written.
        manifest: its ``info["export"]["preferences"]`` gets the counts and filter reasons.

    Returns:
        The statistics written to the manifest, plus ``rows`` (conversational, per split).

    Raises:
        DataError: a malformed record. StoreError: the files cannot be written (the records
        are untouched). PushToHubError (``cfg.push_to_hub``): the upload failed; the local
        export and ``manifest.info`` are complete.
    """
    sel = select_preferences(records, cfg)
    where = split_rows(sel.rows, cfg.test_size, cfg.seed)
    by_split = {s: [r for r, w in zip(sel.rows, where, strict=True) if w == s] for s in SPLITS}
    out = Path(run_dir) / "export" / "preferences"
    staging = temp_sibling(out)
    files: dict[str, list[str]] = {}
    try:
        remove_stale(out)  # leftovers of an interrupted export
        staging.mkdir(parents=True)
        for variant in cfg.variants:
            rows = {s: [variant_row(r, variant) for r in by_split[s]] for s in SPLITS}
            written = _write_variant(staging / variant, variant, rows, cfg.formats)
            files[variant] = [str(p.relative_to(staging)) for p in written]
        stats = summarize(sel, by_split, cfg)
        stats["files"] = files
        if cfg.plot:
            plot_margins(sel.rows, staging / "margins.png")
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
    conversational = {s: [variant_row(r, "conversational") for r in by_split[s]] for s in SPLITS}
    return {**stats, "rows": conversational}
