"""The dataset card (README.md with Hub front matter), its statistics, the margins plot, and
the upload of a finished export to the Hugging Face Hub.

The statistics and the plot are made in :mod:`rlaif.export.stats` (re-exported here).
The card says what the data is, how it was made (full provenance), what was filtered and why,
how the labels are distributed, and how to load it. It is built only from the export's
statistics and the provenance the caller passes; secrets never reach it: keys that name a
secret are redacted and the values of secret-looking environment variables are masked.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rlaif.errors import RlaifError
from rlaif.export.filters import (
    FILTER_REASONS,
    SKIPPED,
    SPLITS,
    VARIANTS,
    PreferenceExportConfig,
)
from rlaif.export.stats import plot_margin_values, plot_margins, summarize
from rlaif.version import __version__

__all__ = [  # plot_margins and summarize moved to rlaif.export.stats; still importable here
    "PushToHubError",
    "plot_margin_values",
    "plot_margins",
    "push_to_hub",
    "render_card",
    "scrub",
    "summarize",
]

TAGS = ["rlaif", "constitutional-ai", "dpo", "reward-modeling", "preference", "synthetic", "trl"]
_SECRET_KEY = re.compile(
    r"(^|_)(token|api_?key|secret|password|passwd|authorization|auth|credentials?)$", re.I
)
_SECRET_ENV = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|AUTH|CREDENTIAL", re.I)
_REDACTED = "(redacted)"


# -- secrets ------------------------------------------------------------------------------------


def scrub(obj: Any) -> Any:
    """``obj`` with the values of secret-named keys replaced by ``(redacted)``."""
    if isinstance(obj, Mapping):
        return {
            str(k): _REDACTED if _SECRET_KEY.search(str(k)) and v else scrub(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def _mask_secrets(text: str) -> str:
    """Mask the values of secret-looking environment variables (and the Hub token) in text."""
    secrets = [v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8]
    try:
        from huggingface_hub import get_token

        secrets.append(get_token() or "")
    except Exception:  # no hub client or an unreadable token file: nothing more to mask
        pass
    for value in sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True):
        text = text.replace(value, "***")
    return text


# -- card ---------------------------------------------------------------------------------------


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K")):
        if n < limit:
            return name
    return "100K<n<1M" if n < 1_000_000 else "1M<n<10M"


def _configs(stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Hub ``configs``: one per variant, pointing at its Parquet (else JSONL) files."""
    configs = []
    for variant, files in stats.get("files", {}).items():
        for ext in ("parquet", "jsonl"):
            data = [
                {"split": s, "path": f"{variant}/{s}.{ext}"}
                for s in SPLITS
                if f"{variant}/{s}.{ext}" in files and stats["splits"][s]["rows"]
            ]
            if data:
                configs.append({"config_name": variant, "data_files": data})
                break
    if configs:
        configs[0]["default"] = True
    return configs


def _model(p: Any, revision: Any = None) -> str:
    if isinstance(p, Mapping):
        p, revision = p.get("id") or p.get("name"), p.get("revision")
    return f"`{p}` (revision `{revision or 'unpinned'}`)" if p else "(not recorded)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a pipe would end the Markdown table cell


def _meaning(reason: str) -> str:
    return FILTER_REASONS.get(reason) or FILTER_REASONS[SKIPPED]


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def _provenance_lines(prov: Mapping[str, Any]) -> list[str]:
    c = prov.get("constitution") or {}
    if isinstance(c, Mapping):
        name, version, digest = (c.get(k, "?") for k in ("name", "version", "hash"))
        cons = f"`{name}` version `{version}`, hash `{digest}`"
    else:
        cons = f"`{c}`"
    policy = _model(prov.get("policy_model") or prov.get("model"), prov.get("model_revision"))
    judges = prov.get("judge_models") or [prov.get("judge_model")]
    judge_names = ", ".join(_model(j, prov.get("judge_revision")) for j in judges)
    jcfg = prov.get("judge_config", prov.get("judge"))
    mode = jcfg.get("mode") if isinstance(jcfg, Mapping) else None
    seeds = prov.get("seeds", prov.get("seed"))
    lines = [
        f"- **Constitution**: {cons}",
        *_prompts_lines(prov.get("prompts")),
        f"- **Policy model** (wrote the responses): {policy}",
        *([f"- **Backend**: `{prov['backend']}`"] if prov.get("backend") else []),
        f"- **Judge model(s)**: {judge_names}",
        f"- **Judge mode**: `{mode or 'not recorded'}`",
        f"- **Judge config**: `{json.dumps(jcfg, sort_keys=True, default=str)}`",
        f"- **Seeds**: `{json.dumps(seeds, sort_keys=True)}`",
        f"- **rlaif version**: `{prov.get('rlaif_version') or __version__}`",
    ]
    lines += _calibration_lines(prov.get("judge_calibration"))
    templates = prov.get("templates") or prov.get("template_hashes") or {}
    if isinstance(templates, Mapping) and templates:
        lines.append("- **Templates** (name: content hash):")
        lines += [f"  - `{k}`: `{v}`" for k, v in sorted(templates.items())]
    return lines


def _prompts_lines(src: Any) -> list[str]:
    """A dataset's name, config, split and resolved revision, or a file's path and hash."""
    if not isinstance(src, Mapping) or not src:
        return []
    at = "".join(f", {k} `{src[k]}`" for k in ("config", "split") if src.get(k))
    rows = f"offset {src.get('offset') or 0}, limit {src.get('limit') or 'none'}"
    return [f"- **Prompts**: `{src.get('dataset') or src.get('path')}`{at}, revision "
            f"`{src.get('revision') or 'not resolved'}`, {rows}"]  # fmt: skip


def _calibration_lines(cal: Any) -> list[str]:
    """The judge's option prior (``judge_calibration`` of the provenance) and the rates it
    moved, raw -> calibrated; nothing for an uncalibrated run."""
    if not isinstance(cal, Mapping) or not cal.get("judges"):
        return []
    lines = [
        f"- **Judge calibration** (`{cal.get('method')}`, {cal.get('sample')} sampled pairs or "
        "requests): the judge's log-odds `b` for the option shown first, removed from every "
        "order before the tie rule (`p = sigmoid(log P(A) - log P(B) - b)`):"
    ]
    names = {"first_position_rate": "first-position rate",
             "position_consistency": "position consistency", "tie_rate": "tie rate"}  # fmt: skip
    for j in cal["judges"]:
        prior = j.get("prior") or {}
        ci = prior.get("ci95")
        ci_text = f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else ""
        rates = ", ".join(
            f"{names.get(k, k)} {_fmt(r['raw']['rate'])} -> {_fmt(r['calibrated']['rate'])}"
            for k, r in (j.get("rates") or {}).items()
        )
        lines.append(
            f"  - `{j.get('stage')}` ({_model(j.get('model'), j.get('revision'))}): "
            f"b = {_fmt(prior.get('bias'))}{ci_text} over n = {prior.get('n')}"
            + (f"; raw -> calibrated: {rates}" if rates else "")
        )
    return lines


def render_card(
    stats: Mapping[str, Any], provenance: Mapping[str, Any], cfg: PreferenceExportConfig
) -> str:
    """The README.md of an export: Hub front matter, provenance, statistics, how to load.

    ``provenance`` keys read by name (others are listed in the full-provenance block):
    ``constitution`` {name, version, hash}, ``policy_model`` and ``judge_model`` (or a list
    ``judge_models``) {id, revision}, ``templates`` {name: hash}, ``judge_config``, ``seeds``
    (or ``seed``) and ``rlaif_version``.
    """
    prov = scrub(dict(provenance))
    cons = prov.get("constitution")
    cons_name = cons.get("name") if isinstance(cons, Mapping) else cons
    title = cfg.pretty_name or f"RL-CAI preferences{f' ({cons_name})' if cons_name else ''}"
    front: dict[str, Any] = {
        "license": cfg.license,
        "pretty_name": title,
        "task_categories": ["text-generation"],
        "tags": TAGS,
        "size_categories": [_size_category(stats["kept"])],
    }
    if configs := _configs(stats):
        front["configs"] = configs
    sp, ln, jd = stats["splits"], stats["length"], stats["judge"]
    variants = list(stats.get("files", {}))
    first = variants[0] if variants else "conversational"
    parts = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        f"# {title}",
        "",
        "## What it is",
        "",
        "Pairwise preference data made by RL-CAI (RLAIF): a policy model sampled responses to "
        "each prompt and an AI judge compared them under principles of a written constitution, "
        "in both presentation orders to cancel position bias. Each row has a `prompt`, the "
        "`chosen` and `rejected` responses and a `margin`: the judge's soft label "
        "`p_chosen` on TRL's logit scale, `log(p / (1 - p))`, which TRL's `RewardTrainer` "
        "subtracts from the reward gap. `id`, `prompt_id`, `source` (`samples`: two policy "
        "samples; `cai_sl`: a critique-revision against its initial response) and `p_chosen` "
        "are metadata columns that TRL's trainers ignore.",
        "",
        "Two formats, same rows: `conversational/` (TRL's explicit-prompt conversational "
        "format: `prompt` is a list of messages, `chosen` and `rejected` one assistant message "
        "each) and `text/` (plain strings: a single user turn is its text; a longer "
        "conversation is a `System:` / `Human:` / `Assistant:` transcript ending in "
        "`Assistant:`; responses are stripped, with no leading space). Splits are assigned by "
        "a hash of the prompt text, so all pairs of one prompt are in the same split.",
        "",
        "## How it was made",
        "",
        *_provenance_lines(prov),
        f"- **Export filters**: `{json.dumps(stats['config'], sort_keys=True)}`",
        "",
        "## Statistics",
        "",
        f"{stats['inputs']} pair records in, {stats['kept']} rows out.",
        "",
        "| split | rows | prompts |",
        "|---|---|---|",
        *(f"| {s} | {sp[s]['rows']} | {sp[s]['prompts']} |" for s in SPLITS),
        "",
        "Filtered pairs (first matching reason):",
        "",
        "| reason | pairs | meaning |",
        "|---|---|---|",
        *(f"| {_cell(k)} | {n} | {_meaning(k)} |" for k, n in stats["filtered"].items()),
        *([] if stats["filtered"] else ["| (none) | 0 | |"]),
        "",
        "| label | count | min | p25 | median | mean | p75 | max |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {stats[k]['count']} | "
            + " | ".join(_fmt(stats[k][q]) for q in ("min", "p25", "median", "mean", "p75", "max"))
            + " |"
            for k in ("margin", "p_chosen")
        ),
        "",
        f"- Mean length (characters): chosen {_fmt(ln['chosen_mean_chars'])}, "
        f"rejected {_fmt(ln['rejected_mean_chars'])}.",
        f"- The longer response is chosen in {_fmt(ln['longer_chosen_rate'])} of the pairs "
        f"whose lengths differ ({ln['equal_length_pairs']} pairs have equal lengths); "
        "far from 0.5 hints at a length-biased judge.",
        f"- Rows by source: `{json.dumps(stats['sources'], sort_keys=True)}`.",
        f"- Judge, over all {jd['verdicts']} verdicts ({jd['errors']} errors): tie rate "
        f"{_fmt(jd['tie_rate'])}, position consistency {_fmt(jd['position_consistency'])} "
        "(both orders pick the same response), first-position win rate "
        f"{_fmt(jd['first_position_rate'])} (0.5 = no position bias).",
        *(["", "![margins and p_chosen](margins.png)"] if stats.get("plot") else []),
        "",
        "## How to load",
        "",
        "```python",
        "from datasets import load_dataset, load_from_disk",
        "",
        f'ds = load_from_disk("{first}/disk")  # a DatasetDict: train / test',
        f'# or: load_dataset("parquet", data_files={{"train": "{first}/train.parquet"}})',
        "",
        "from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer",
        "",
        'dpo = DPOTrainer(model="<policy>", args=DPOConfig(output_dir="dpo"),',
        '                 train_dataset=ds["train"], eval_dataset=ds["test"])',
        'rm = RewardTrainer(model="<policy>", args=RewardConfig(output_dir="rm"),',
        '                   train_dataset=ds["train"])  # uses the margin column',
        "```",
        "",
        "## Full provenance",
        "",
        "```json",
        json.dumps(prov, indent=2, sort_keys=True, ensure_ascii=False, default=str),
        "```",
        "",
    ]
    return _mask_secrets("\n".join(parts))


# -- the Hub ------------------------------------------------------------------------------------


class PushToHubError(RlaifError):
    """Uploading an export to the Hugging Face Hub failed (the local files are complete)."""


def _hub_files(export_dir: Path) -> list[str]:
    """The files worth uploading: the card, the plot and one loadable format per variant."""
    names = ["README.md", *(["margins.png"] if (export_dir / "margins.png").exists() else [])]
    for variant in VARIANTS:
        for ext in ("parquet", "jsonl"):
            found = [
                f"{variant}/{s}.{ext}"
                for s in SPLITS
                if (export_dir / variant / f"{s}.{ext}").exists()
            ]
            if found:
                names += found
                break
    return names


def push_to_hub(export_dir: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload a finished preference export to a Hub dataset repo; returns the repo URL.

    The token comes from ``HF_TOKEN`` or huggingface_hub's own lookup (``hf auth login``); it
    is passed to the client only, never written or logged, and scrubbed from error messages.

    Raises:
        PushToHubError: one line saying why (offline, no token, refused, ...) and where the
            dataset is saved locally.
    """
    export_dir = Path(export_dir)
    saved = f"the dataset is saved locally at {export_dir}"
    if not (export_dir / "README.md").is_file():
        raise PushToHubError(f"push to hub failed: no finished export at {export_dir}")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise PushToHubError(
            f"push to hub failed: huggingface_hub is not installed; {saved}"
        ) from None
    if constants.HF_HUB_OFFLINE:
        why = "cannot reach huggingface.co (offline: HF_HUB_OFFLINE is set)"
        raise PushToHubError(f"push to hub failed: {why}; {saved}")
    token = huggingface_hub.get_token()
    if not token:
        why = "no Hugging Face token (set HF_TOKEN or run `hf auth login`)"
        raise PushToHubError(f"push to hub failed: {why}; {saved}")
    try:
        api = huggingface_hub.HfApi(token=token)
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=str(export_dir),
            allow_patterns=_hub_files(export_dir),
            commit_message="Upload RL-CAI preference dataset (rlaif)",
        )
    except Exception as exc:  # any failure of the client: one line, never a traceback
        raise PushToHubError(f"push to hub failed: {_why(exc, token)}; {saved}") from None
    return str(url)


# Transport failures by class name: huggingface_hub has used requests, httpx and httpx2.
_NETWORK_ERRORS = {
    "ConnectionError",
    "ConnectError",
    "TransportError",
    "NetworkError",
    "TimeoutException",
}


def _network_error(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return isinstance(exc, (ConnectionError, TimeoutError)) or bool(names & _NETWORK_ERRORS)


def _why(exc: BaseException, token: str) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        why = f"the Hub refused the token (HTTP {status})"
    elif status is not None:
        why = f"HTTP {status} from the Hub ({type(exc).__name__})"
    elif _network_error(exc):
        why = "cannot reach huggingface.co (offline?)"
    else:
        first = (str(exc).splitlines() or [""])[0][:200]
        why = f"{type(exc).__name__}: {first}"
    return why.replace(token, "***") if token else why
