"""RL-CAI preference export: filters and their accounting, split, formats, card, Hub, TRL."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlaif.errors import ConfigError, DataError, RlaifError
from rlaif.export import stats as stats_mod
from rlaif.export.card import PushToHubError, push_to_hub, render_card
from rlaif.export.filters import (
    DUPLICATE,
    EMPTY,
    FILTER_REASONS,
    GENERATION_ERROR,
    IDENTICAL,
    JUDGE_ERROR,
    LENGTH_RATIO,
    LOW_CONFIDENCE,
    PROMPT_CAP,
    SKIPPED,
    TIE,
    PreferenceExportConfig,
    select_preferences,
    upstream_reason,
)
from rlaif.export.preferences import (
    META_COLUMNS,
    TRL_RESERVED,
    export_preferences,
    render_prompt_text,
    split_rows,
    variant_row,
)
from rlaif.stages.judge import JudgeConfig, Verdict
from rlaif.stages.pairs import keep_cai_sl_pair, margin_from_p
from rlaif.store import Manifest

FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefXYZ"
# The shape the pipeline runner passes (rlaif.pipeline.runner._Run.provenance).
PROVENANCE = {
    "constitution": {"name": "helpful-harmless", "version": "1.2.0", "hash": "c0ffee1234"},
    "templates": {"judge_mc": "tmplhash01", "respond": "tmplhash02"},
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "model_revision": "rev-policy",
    "backend": "transformers",
    "seed": 7,
    "rlaif_version": "0.1.0",
    "judge_model": "judge/model-x",
    "judge_revision": "rev-judge",
    "judge": JudgeConfig().to_dict(),
}
NO_FILTERS = PreferenceExportConfig(min_confidence=0.5, max_length_ratio=None, test_size=0.0)


def verdict(p: float | None, winner: str | None = None, status: str = "ok", **kw: Any) -> dict:
    if status != "ok":
        return Verdict("error", reason="order 1: bad scores", n_errors=1).to_dict()
    w = winner or ("a" if p > 0.5 else "b" if p < 0.5 else "tie")  # type: ignore[operator]
    consistent = kw.pop("consistent", w != "tie")
    return Verdict("ok", w, p, p, p, consistent, 1, 2, **kw).to_dict()


def rec(
    i: int | str,
    x: str = "Paris is the capital of France.",
    y: str = "I think it is Rome.",
    p: float | None = 0.8,
    *,
    prompt: str | None = None,
    status: str = "ok",
    v: dict | None = None,
    messages: list | None = None,
    source: str = "samples",
    reason: str | None = None,
) -> dict[str, Any]:
    text = prompt if prompt is not None else f"What is the capital of France? ({i})"
    r = {
        "id": f"pair-{i}",
        "prompt_id": f"prompt-{i}",
        "prompt": messages or [{"role": "user", "content": text}],
        "x": x,
        "y": y,
        "source": source,
        "verdict": v if v is not None else verdict(p),
        "status": status,
    }
    if reason:
        r["reason"] = reason
    return r


def export(records, tmp: Path, cfg=NO_FILTERS, provenance=PROVENANCE) -> tuple[dict, Manifest]:
    manifest = Manifest()
    return export_preferences(records, tmp, cfg, provenance, manifest), manifest


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("min_confidence", 0.4),
        ("min_confidence", 1.5),
        ("max_length_ratio", 0.5),
        ("max_pairs_per_prompt", 0),
        ("max_pairs_per_prompt", True),
        ("test_size", 1.0),
        ("test_size", -0.1),
        ("seed", 1.5),
        ("formats", ["csv"]),
        ("formats", []),
        ("variants", ["text", "text"]),
        ("push_to_hub", "not a repo id"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        PreferenceExportConfig(**{name: value})
    assert err.value.field == name
    assert "\n" not in str(err.value)


def test_config_defaults_and_lists_become_tuples() -> None:
    cfg = PreferenceExportConfig(formats=["jsonl"], variants=["text"])
    assert cfg.formats == ("jsonl",) and cfg.variants == ("text",)
    d = PreferenceExportConfig()
    assert (d.min_confidence, d.max_length_ratio, d.max_pairs_per_prompt) == (0.55, 4.0, None)
    assert (d.test_size, d.formats) == (0.1, ("disk", "parquet", "jsonl"))


def test_metadata_columns_avoid_names_trl_reads() -> None:
    assert not set(META_COLUMNS) & TRL_RESERVED


# -- filters ------------------------------------------------------------------------------------


def unjudged(record: dict[str, Any]) -> dict[str, Any]:
    """A record that never reached the judge."""
    return {**record, "verdict": None}


def why_not(p: float) -> str:
    """Why the runner skips a CAI-SL pair whose revision the judge does not prefer."""
    return keep_cai_sl_pair(Verdict.from_dict(verdict(p)))[1] or ""


FILTER_CASES = [
    (
        f"{SKIPPED}: fewer than two judged responses",
        unjudged(rec(1, status="skipped", reason="fewer than two judged responses")),
    ),
    (
        f"{SKIPPED}: judge prefers the initial response",
        rec(11, status="skipped", source="cai_sl", p=0.4, reason=why_not(0.4)),
    ),
    (GENERATION_ERROR, unjudged(rec(2, status="error", reason="generation failed: timeout"))),
    (JUDGE_ERROR, rec(3, status="error", v=verdict(None, status="error"), reason="judge")),
    (JUDGE_ERROR, rec(4, v=verdict(None, status="error"))),
    (EMPTY, rec(5, x="   \n")),
    (IDENTICAL, rec(6, x="Same answer.", y="  Same answer.\n")),
    (TIE, rec(7, p=0.5)),
    (LOW_CONFIDENCE, rec(8, p=0.52)),
    (LENGTH_RATIO, rec(9, x="Yes." * 10, y="No.", p=0.9)),  # the longer one chosen
    (LENGTH_RATIO, rec(10, x="Yes." * 10, y="No.", p=0.1)),  # the shorter one chosen
]


@pytest.mark.parametrize(
    ("reason", "record"), FILTER_CASES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(FILTER_CASES)]
)
def test_each_filter_counts_its_reason(reason: str, record: dict, tmp_path: Path) -> None:
    cfg = PreferenceExportConfig(min_confidence=0.6, max_length_ratio=3.0, test_size=0.0)
    kept = rec(100)
    stats, manifest = export([record, kept], tmp_path, cfg)
    assert stats["filtered"] == {reason: 1}
    assert stats["filtered_examples"][reason] == [record["id"]]
    assert stats["inputs"] == 2 and stats["kept"] == 1
    assert stats["inputs"] == stats["kept"] + sum(stats["filtered"].values())
    assert manifest.info["export"]["preferences"]["filtered"] == {reason: 1}
    assert f"| {reason} | 1 |" in (tmp_path / "export/preferences/README.md").read_text()


@pytest.mark.parametrize(
    ("reason", "category"),
    [
        ("generation failed: CUDA out of memory", GENERATION_ERROR),
        ("sampling failed", GENERATION_ERROR),
        ("judge error: order 1: bad option scores", JUDGE_ERROR),
        ("tie: orders disagree: |p1 - p2| = 0.7 > 0.5", TIE),
        ("revision identical to initial response", IDENTICAL),
        ("same texts as pair [0, 2]", IDENTICAL),
        ("no pair of distinct responses", IDENTICAL),
        ("p(revision better) = 0.5432 < min_p 0.6", f"{SKIPPED}: p(revision better) = # < min_p #"),
        ("", f"{SKIPPED}: no reason given"),
    ],
)
def test_upstream_skip_reasons_become_few_categories(reason: str, category: str) -> None:
    assert upstream_reason(reason) == category


def test_length_ratio_boundary_and_off_switch() -> None:
    at_limit = rec(1, x="a" * 30, y="b" * 10)  # exactly 3x: kept
    over = rec(2, x="a" * 31, y="b" * 10)
    cfg = PreferenceExportConfig(max_length_ratio=3.0, test_size=0)
    assert [r["id"] for r in select_preferences([at_limit, over], cfg).rows] == ["pair-1"]
    assert len(select_preferences([at_limit, over], NO_FILTERS).rows) == 2


def test_duplicates_and_per_prompt_cap(tmp_path: Path) -> None:
    same = "Which is the capital of Italy?"
    records = [
        rec(1, prompt=same, x="Rome.", y="Milan.", p=0.7),
        rec(2, prompt=same, x="Rome.", y="Milan.", p=0.9),  # same row: dropped, even if surer
        rec(3, prompt=same, x="Rome, of course.", y="Milan.", p=0.95),
        rec(4, prompt=same, x="Rome!", y="Turin.", p=0.6),
        rec(5, prompt="Another prompt?", x="A", y="B", p=0.8),
    ]
    cfg = PreferenceExportConfig(
        min_confidence=0.5, max_length_ratio=None, max_pairs_per_prompt=1, test_size=0
    )
    sel = select_preferences(records, cfg)
    assert [r["id"] for r in sel.rows] == ["pair-3", "pair-5"]  # the surest pair per prompt
    assert sel.filtered == {DUPLICATE: 1, PROMPT_CAP: 2}
    assert sel.examples[DUPLICATE] == ["pair-2"]
    uncapped = select_preferences(records, NO_FILTERS)
    assert [r["id"] for r in uncapped.rows] == ["pair-1", "pair-3", "pair-4", "pair-5"]
    stats, _ = export(records, tmp_path, cfg)
    assert stats["filtered"] == {DUPLICATE: 1, PROMPT_CAP: 2}


def test_everything_accounted_for_with_many_reasons(tmp_path: Path) -> None:
    records = [r for _, r in FILTER_CASES] + [rec(i) for i in range(20, 30)]
    # what the runner writes for a prompt whose sampling failed: no prompt, texts or verdict
    bare = {"id": "no-sample", "prompt_id": "p", "source": "samples", "status": "skipped"}
    records.append({**bare, "reason": "sampling failed"})
    cfg = PreferenceExportConfig(min_confidence=0.6, max_length_ratio=3.0)
    stats, manifest = export(records, tmp_path, cfg)
    assert stats["kept"] == 10
    assert stats["kept"] + sum(stats["filtered"].values()) == len(records) == stats["inputs"]
    assert all(k in FILTER_REASONS or k.startswith(f"{SKIPPED}: ") for k in stats["filtered"])
    upstream = [k for k in stats["filtered"] if k.startswith(f"{SKIPPED}: ")]
    assert len(upstream) == 2 and list(stats["filtered"])[-2:] == sorted(upstream)  # last
    assert sum(s["rows"] for s in stats["splits"].values()) == stats["kept"]
    json.dumps(manifest.to_dict(), allow_nan=False)  # the manifest can be written


def test_winner_b_swaps_and_margin_is_the_logit(tmp_path: Path) -> None:
    sel = select_preferences([rec(1, x="  Rome.  ", y="Paris.", p=0.25)], NO_FILTERS)
    (row,) = sel.rows
    assert row["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert row["rejected"] == [{"role": "assistant", "content": "Rome."}]  # stripped
    assert row["p_chosen"] == pytest.approx(0.75)
    assert row["margin"] == pytest.approx(math.log(3))


def test_malformed_records_are_data_errors() -> None:
    with pytest.raises(DataError, match="prompt"):
        select_preferences([rec(1, messages=[{"role": "user"}])], NO_FILTERS)
    with pytest.raises(DataError, match="verdict"):
        select_preferences([{**rec(1), "verdict": None}], NO_FILTERS)
    with pytest.raises(DataError, match="verdict"):
        select_preferences([{**rec(1), "verdict": {"bogus": 1}}], NO_FILTERS)


TEXT = st.text(alphabet="ab \n", max_size=6)


@st.composite
def random_record(draw: st.DrawFn, i: int = 0) -> dict[str, Any]:
    status = draw(st.sampled_from(["ok", "ok", "ok", "error", "skipped"]))
    if draw(st.booleans()):
        v = verdict(None, status="error")
    else:
        p = draw(st.floats(0, 1))
        v = verdict(p, winner=draw(st.sampled_from(["a", "b", "tie", None])))
    return {
        "id": f"r{draw(st.integers(0, 5))}",
        "prompt_id": "p",
        "prompt": [{"role": "user", "content": draw(st.sampled_from(["q1", "q2", "q3"]))}],
        "x": draw(TEXT),
        "y": draw(TEXT),
        "source": "samples",
        "verdict": v,
        "status": status,
    }


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    records=st.lists(random_record(), max_size=25),
    min_conf=st.floats(0.5, 1),
    ratio=st.one_of(st.none(), st.floats(1, 10)),
    cap=st.one_of(st.none(), st.integers(1, 3)),
)
def test_property_never_chosen_equals_rejected(records, min_conf, ratio, cap) -> None:
    cfg = PreferenceExportConfig(
        min_confidence=min_conf, max_length_ratio=ratio, max_pairs_per_prompt=cap
    )
    sel = select_preferences(records, cfg)
    assert len(sel.rows) + sum(sel.filtered.values()) == len(records)
    for row in sel.rows:
        for variant in ("conversational", "text"):
            out = variant_row(row, variant)
            assert out["chosen"] != out["rejected"]
        assert row["chosen"][0]["content"].strip() != row["rejected"][0]["content"].strip()
        assert row["p_chosen"] >= min_conf - 1e-9 and row["p_chosen"] > 0.5
        assert 0 < row["margin"] < 14
        assert row["margin"] == pytest.approx(margin_from_p(row["p_chosen"]))
    keys = [(r["_row_key"]) for r in sel.rows]
    assert len(keys) == len(set(keys))


# -- split --------------------------------------------------------------------------------------


def test_split_is_deterministic_and_never_leaks_a_prompt() -> None:
    records = [rec(i, prompt=f"prompt {i % 40}", x=f"good {i}", y=f"bad {i}") for i in range(200)]
    rows = select_preferences(records, NO_FILTERS).rows
    a, b = split_rows(rows, 0.2, seed=3), split_rows(rows, 0.2, seed=3)
    assert a == b
    assert split_rows(rows, 0.2, seed=4) != a
    by_prompt: dict[str, set[str]] = {}
    for row, s in zip(rows, a, strict=True):
        by_prompt.setdefault(row["prompt"][0]["content"], set()).add(s)
    assert all(len(s) == 1 for s in by_prompt.values())
    n_test = sum(s == {"test"} for s in by_prompt.values())
    assert 2 <= n_test <= 16  # about 20 % of 40 prompts
    # A prompt keeps its split when the dataset grows: the hash decides, not the rank.
    grown = split_rows(rows + select_preferences([rec(999)], NO_FILTERS).rows, 0.2, seed=3)
    assert grown[: len(rows)] == a


def test_split_minimum_one_test_prompt() -> None:
    rows = select_preferences([rec(1), rec(2)], NO_FILTERS).rows
    assert sorted(split_rows(rows, 0.01, seed=0)) == ["test", "train"]
    assert sorted(split_rows(rows, 0.99, seed=0)) == ["test", "train"]
    assert split_rows(rows[:1], 0.5, seed=0) == ["train"]  # one prompt: all train
    assert split_rows(rows, 0.0, seed=0) == ["train", "train"]


def test_same_prompt_text_with_other_ids_shares_a_split() -> None:
    records = [rec(i, prompt="same text", x=f"a{i}", y=f"b{i}") for i in range(5)]
    records += [rec(i) for i in range(5, 30)]
    rows = select_preferences(records, NO_FILTERS).rows
    where = split_rows(rows, 0.3, seed=1)
    assert len(set(where[:5])) == 1


# -- files --------------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_two_exports_are_byte_identical(tmp_path: Path) -> None:
    records = [rec(i, prompt=f"p{i % 7}", x=f"good answer {i}", y=f"bad {i}") for i in range(30)]
    records.append(
        rec(99, messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    )
    cfg = PreferenceExportConfig(test_size=0.3)
    export(records, tmp_path / "a", cfg)
    export(records, tmp_path / "b", cfg)
    export(records, tmp_path / "b", cfg)  # re-export over an existing one
    a, b = _tree(tmp_path / "a/export"), _tree(tmp_path / "b/export")
    assert a == b
    assert "preferences/margins.png" in a and "preferences/README.md" in a
    assert sorted(p.name for p in (tmp_path / "b/export").iterdir()) == ["preferences"]


def test_formats_load_back_with_the_same_rows(tmp_path: Path) -> None:
    import datasets

    records = [rec(i, prompt=f"p{i % 9}", x=f"good answer {i}", y=f"bad {i}") for i in range(30)]
    stats, _ = export(records, tmp_path, PreferenceExportConfig(test_size=0.3))
    out = tmp_path / "export/preferences"
    for variant in ("conversational", "text"):
        dd = datasets.load_from_disk(str(out / variant / "disk"))
        assert set(dd) == {"train", "test"}
        for split in ("train", "test"):
            lines = (out / variant / f"{split}.jsonl").read_text().splitlines()
            rows = [json.loads(x) for x in lines]
            assert rows == dd[split].to_list()
            pq = datasets.Dataset.from_parquet(str(out / variant / f"{split}.parquet"))
            assert pq.to_list() == rows
            assert len(rows) == stats["splits"][split]["rows"]
            assert list(json.loads(lines[0])) == sorted(json.loads(lines[0]))  # sorted keys
    assert "rows" not in stats  # the rows are in the files, never all in memory
    train = (out / "conversational/train.jsonl").read_text().splitlines()
    ids = [json.loads(x)["id"] for x in train]
    assert ids == sorted(ids, key=lambda s: int(s.split("-")[1]))  # input order


def test_plain_text_format(tmp_path: Path) -> None:
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Capital of France?"},
    ]
    assert render_prompt_text([{"role": "user", "content": "Hi?"}]) == "Hi?"
    assert render_prompt_text(multi) == (
        "System: Be brief.\n\nHuman: Hi?\n\nAssistant: Hello.\n\n"
        "Human: Capital of France?\n\nAssistant:"
    )
    records = [rec(1, prompt="Single?", x=" Paris. ", y="Rome."), rec(2, messages=multi, p=0.2)]
    export(records, tmp_path, NO_FILTERS)
    lines = (tmp_path / "export/preferences/text/train.jsonl").read_text().splitlines()
    one, two = (json.loads(x) for x in lines)
    assert (one["prompt"], one["chosen"], one["rejected"]) == ("Single?", "Paris.", "Rome.")
    assert two["prompt"] == render_prompt_text(multi) and two["chosen"] == "I think it is Rome."
    assert set(one) == {"prompt", "chosen", "rejected", "margin", *META_COLUMNS}


def test_empty_export_still_loads(tmp_path: Path) -> None:
    import datasets

    stats, _ = export([rec(1, p=0.5)], tmp_path, PreferenceExportConfig())
    assert stats["kept"] == 0 and stats["filtered"] == {TIE: 1}
    dd = datasets.load_from_disk(str(tmp_path / "export/preferences/conversational/disk"))
    assert dd["train"].num_rows == 0 and "margin" in dd["train"].column_names
    front = _front_matter(tmp_path)
    assert "configs" not in front  # the Hub cannot load a config without rows


# -- card ---------------------------------------------------------------------------------------


def _front_matter(run: Path) -> dict:
    text = (run / "export/preferences/README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_has_provenance_stats_and_no_secrets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value-0000")
    prov = {**PROVENANCE, "server": {"api_key": "sk-inline-secret-1111", "max_new_tokens": 64}}
    prov["note"] = f"token {FAKE_TOKEN} pasted by mistake"
    records = [rec(i, prompt=f"p{i}", x=f"good answer {i}", y=f"bad {i}") for i in range(12)]
    records.append(rec(50, p=0.5))
    stats, _ = export(records, tmp_path, PreferenceExportConfig(), prov)
    text = (tmp_path / "export/preferences/README.md").read_text()
    for needle in (
        "helpful-harmless", "1.2.0", "c0ffee1234", "SmolLM2-135M-Instruct", "rev-policy",
        "judge/model-x", "rev-judge", "tmplhash01", "tmplhash02", '"tie_threshold": 0.5',
        "**Judge mode**: `logprob`", "**Seeds**: `7`", "`transformers`", "0.1.0",
        "## How to load", "load_from_disk", "DPOTrainer",
        "RewardTrainer", "| tie | 1 |", "position consistency", "longer response is chosen",
        "| margin | 12 |", "margins.png", '"max_new_tokens": 64',
    ):  # fmt: skip
        assert needle in text, needle
    for secret in (FAKE_TOKEN, "sk-secret-value-0000", "sk-inline-secret-1111"):
        assert secret not in text
        for p in tmp_path.rglob("*"):
            assert not p.is_file() or secret.encode() not in p.read_bytes(), p
    front = _front_matter(tmp_path)
    assert front["license"] == "unknown" and front["task_categories"] == ["text-generation"]
    assert {"rlaif", "constitutional-ai", "dpo"} <= set(front["tags"])
    names = {c["config_name"]: c for c in front["configs"]}
    assert set(names) == {"conversational", "text"} and names["conversational"]["default"]
    for c in names.values():
        for f in c["data_files"]:
            assert (tmp_path / "export/preferences" / f["path"]).is_file()
    assert stats["length"]["longer_chosen_rate"] == 1.0


def test_render_card_without_optional_provenance() -> None:
    stats = {
        "inputs": 0, "kept": 0, "filtered": {}, "files": {},
        "splits": {s: {"rows": 0, "prompts": 0} for s in ("train", "test")},
        "margin": stats_mod._summary([]), "p_chosen": stats_mod._summary([]),
        "length": {"chosen_mean_chars": None, "rejected_mean_chars": None,
                   "longer_chosen_rate": None, "equal_length_pairs": 0},
        "sources": {}, "config": {},
        "judge": {"verdicts": 0, "errors": 0, "tie_rate": None,
                  "position_consistency": None, "first_position_rate": None},
    }  # fmt: skip
    text = render_card(stats, {}, PreferenceExportConfig(pretty_name="My prefs"))
    assert "# My prefs" in text and "(not recorded)" in text and "n/a" in text
    other = {  # the alternative spelling: models as {id, revision}, several judges
        "policy_model": {"id": "pol", "revision": "r1"},
        "judge_models": [{"id": "j1", "revision": "r2"}, {"id": "j2"}],
        "judge_config": {"mode": "reasoning"},
        "seeds": {"sampling": 3},
    }
    text = render_card(stats, other, PreferenceExportConfig())
    for needle in ("`pol` (revision `r1`)", "`j1` (revision `r2`), `j2` (revision `unpinned`)"):
        assert needle in text
    assert "**Judge mode**: `reasoning`" in text and '"sampling": 3' in text


# -- Hub ----------------------------------------------------------------------------------------


def _no_token_anywhere(root: Path, token: str) -> None:
    for p in root.rglob("*"):
        assert not p.is_file() or token.encode() not in p.read_bytes(), p


def test_push_offline_fails_in_one_line_and_keeps_the_export(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cfg = PreferenceExportConfig(push_to_hub="someone/prefs")
    manifest = Manifest()
    with pytest.raises(PushToHubError) as err:
        export_preferences([rec(1), rec(2)], tmp_path, cfg, PROVENANCE, manifest)
    msg = str(err.value)
    assert isinstance(err.value, RlaifError) and "\n" not in msg
    assert msg.startswith("push to hub failed: cannot reach huggingface.co")
    out = tmp_path / "export" / "preferences"
    assert str(out) in msg and FAKE_TOKEN not in msg
    assert (out / "README.md").is_file() and (out / "conversational/train.parquet").is_file()
    assert manifest.info["export"]["preferences"]["kept"] == 2
    manifest.write(tmp_path)
    _no_token_anywhere(tmp_path, FAKE_TOKEN)


class FakeApi:
    """Stands in for huggingface_hub.HfApi: records calls, fails as told."""

    calls: ClassVar[list] = []
    fail: ClassVar[BaseException | None] = None

    def __init__(self, token: str | None = None) -> None:
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        if FakeApi.fail is not None:
            raise FakeApi.fail
        FakeApi.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/datasets/{repo_id}"

    def upload_folder(self, **kw: Any) -> None:
        FakeApi.calls.append(("upload_folder", kw))


class ConnectError(Exception):
    """Named like httpx's, which huggingface_hub raises when the network is down."""


class _Response:
    status_code = 401


class HTTPErr(Exception):
    response = _Response()


@pytest.mark.parametrize(
    ("fail", "expected"),
    [
        (ConnectError("[Errno -3] name resolution"), "cannot reach huggingface.co (offline?)"),
        (HTTPErr(f"401 for token {FAKE_TOKEN}"), "the Hub refused the token (HTTP 401)"),
        (RuntimeError(f"weird {FAKE_TOKEN}\nsecond line"), "RuntimeError: weird ***"),
        (None, None),
    ],
)
def test_push_maps_client_failures(tmp_path: Path, monkeypatch, fail, expected) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    FakeApi.calls, FakeApi.fail = [], fail
    export([rec(1), rec(2)], tmp_path)
    out = tmp_path / "export/preferences"
    if fail is None:
        url = push_to_hub(out, "someone/prefs", private=True)
        assert url == "https://huggingface.co/datasets/someone/prefs"
        assert FakeApi.calls[0] == ("init", FAKE_TOKEN)  # the token goes to the client only
        assert FakeApi.calls[1][2] == {"repo_type": "dataset", "private": True, "exist_ok": True}
        upload = FakeApi.calls[2][1]
        assert upload["repo_type"] == "dataset" and upload["folder_path"] == str(out)
        assert "README.md" in upload["allow_patterns"]
        assert "conversational/train.parquet" in upload["allow_patterns"]
    else:
        with pytest.raises(PushToHubError) as err:
            push_to_hub(out, "someone/prefs")
        msg = str(err.value)
        assert expected in msg and FAKE_TOKEN not in msg and "\n" not in msg
        assert msg.endswith(f"the dataset is saved locally at {out}")
    _no_token_anywhere(tmp_path, FAKE_TOKEN)


def test_push_needs_a_token_and_a_finished_export(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(PushToHubError, match="no finished export"):
        push_to_hub(tmp_path / "nothing", "someone/prefs")
    export([rec(1)], tmp_path)
    with pytest.raises(PushToHubError, match="no Hugging Face token"):
        push_to_hub(tmp_path / "export/preferences", "someone/prefs")


# -- TRL round trip -----------------------------------------------------------------------------


def _changed(before: dict, model) -> int:
    import torch

    return sum(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trl-run")
    records = [
        rec(i, prompt=f"What is the capital of country {i}?", x=f"The capital is city {i}.",
            y="I do not know.", p=0.8 if i % 2 else 0.3)
        for i in range(8)
    ]  # fmt: skip
    export(records, run, PreferenceExportConfig(test_size=0.25, max_length_ratio=None))
    return run / "export/preferences"


def _trl_args(config_cls, out: Path):
    return config_cls(
        output_dir=str(out), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, bf16=False, logging_steps=1,
        max_length=128, dataloader_num_workers=0,
    )  # fmt: skip


def test_trl_dpo_trains_one_step_on_the_export(exported: Path, tiny_model_dir, tmp_path) -> None:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dd = datasets.load_from_disk(str(exported / "conversational/disk"))
    assert {"id", "prompt_id", "source", "p_chosen", "margin"} <= set(dd["train"].column_names)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPOTrainer(
        model=model,
        args=_trl_args(DPOConfig, tmp_path),
        train_dataset=dd["train"],
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    trainer.train()
    assert _changed(before, model) > 0


@pytest.mark.parametrize("variant", ["conversational", "text"])
def test_trl_reward_trains_one_step_on_the_export(
    exported: Path, tiny_model_dir, tmp_path, variant: str
) -> None:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    dd = datasets.load_from_disk(str(exported / variant / "disk"))
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RewardTrainer(
        model=model,
        args=_trl_args(RewardConfig, tmp_path),
        train_dataset=dd["train"],
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "margin" in batch  # the soft label reaches the loss
    trainer.train()
    assert _changed(before, model) > 0
