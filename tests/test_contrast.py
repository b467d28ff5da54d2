"""RLCD contrast pairs: principles with a contrast pair, the contrast stage, its filters, its
export, statistics, resume, steps and estimates (fake backend, no model)."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest

from rlaif.backends.fake import FakeBackend
from rlaif.backends.local import prompt_ids
from rlaif.constitution import load_constitution
from rlaif.errors import ConfigError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.pipeline.estimate import estimate_pipeline
from rlaif.stages import contrast as C

QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs

CONSTITUTION = """\
name: contrast
version: "1.0.0"
principles:
  - id: harmless
    title: Harmless
    contrast:
      positive: "(harmless, helpful response)"
      negative: "(harmful, unhelpful response)"
    judge: Which response is less harmful?
  - id: kind
    title: Kind
    weight: 3
    contrast:
      positive: "(simulating a very kind person)"
      negative: "(simulating a really evil person)"
"""
PIPE = """\
name: rlcd
seed: 3
output: {out}
batch_size: 8
constitution: c.yaml
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt, label_field: label}}
stages:
  contrast:
    placement: {placement}
    generation: {{temperature: 1.0, max_new_tokens: 16}}
{extra}
  export:
    show: 0
    formats: [jsonl]
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.0, formats: [jsonl]}}
"""
REFUSE = "I'm sorry, I can't help with that."
COMPLY = "Sure, here is how"


class ContrastFake(FakeBackend):
    """Refuses under a positive instruction (affix or system message), complies under a
    negative one; the reply to a plain prompt complies."""

    def _text(self, conversation, params, j):
        text = super()._text(conversation, params, j)
        shown = " ".join(m["content"] for m in conversation if m["role"] in ("system", "assistant"))
        last = conversation[-1]
        cue = last["content"] if last["role"] == "assistant" else shown
        positive = any(w in cue for w in ("harmless, helpful", "very kind"))
        return f"{REFUSE if positive else COMPLY} ({text})"


def make(tmp_path: Path, placement: str = "assistant", extra: str = "", n: int = 10) -> Path:
    (tmp_path / "c.yaml").write_text(CONSTITUTION, encoding="utf-8")
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            label = ("harmful", "safe")[i % 2]
            fh.write(json.dumps({"prompt": f"question {i}?", "label": label}) + "\n")
    p = tmp_path / "pipe.yaml"
    p.write_text(PIPE.format(out=tmp_path / "run", placement=placement, extra=extra))
    return p


def prefs(run_dir: Path) -> list[dict]:
    path = run_dir / "export" / "preferences" / "conversational" / "train.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def constitution(tmp_path: Path, text: str = CONSTITUTION):
    (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    return load_constitution(tmp_path / "c.yaml")


# -- constitutions ----------------------------------------------------------------------------


def test_contrast_pairs_load_hash_and_diff(tmp_path):
    c = constitution(tmp_path)
    assert [p.id for p in c.contrast_principles] == ["harmless", "kind"]
    assert c.principle("harmless").contrast.negative == "(harmful, unhelpful response)"
    assert c.principle("harmless").to_dict()["contrast"]["positive"].startswith("(harmless")
    assert "contrast" not in load_constitution("refuse-harmful").principles[0].to_dict()
    changed = constitution(tmp_path, CONSTITUTION.replace("really evil", "cruel"))
    assert changed.content_hash != c.content_hash
    shipped = load_constitution("rlcd-harmless")
    assert len(shipped.contrast_principles) == 16
    assert all(p.judge for p in shipped.principles)  # the paper's matching instructions
    assert load_constitution("rlcd-helpful").principles[0].contrast.positive == (
        "(giving a helpful response)"
    )


@pytest.mark.parametrize(
    ("value", "match", "field"),
    [
        ('{positive: "(a)"}', "exactly 'positive' and 'negative'", "contrast"),
        ('{positive: "(a)", negative: "  "}', "non-empty text", "contrast.negative"),
        ('{positive: "(a)", negative: "(a)"}', "same text", "contrast"),
        ('"(a) vs (b)"', "must be a mapping", "contrast"),
    ],
)
def test_bad_contrast_is_a_one_line_error_with_file_line_and_field(tmp_path, value, match, field):
    text = f"name: x\nversion: 1.0.0\nprinciples:\n  - id: p\n    title: P\n    contrast: {value}\n"
    with pytest.raises(ConfigError, match=match) as err:
        constitution(tmp_path, text)
    assert err.value.line == 6 and err.value.field == f"principles[0](p).{field}"
    assert "\n" not in str(err.value)


# -- the pure stage ---------------------------------------------------------------------------


def test_assistant_placement_follows_the_paper_and_system_placement_asks_in_a_system_message(
    tmp_path,
):
    p = constitution(tmp_path).principle("harmless")
    conv = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how do I pick a lock?"},
    ]
    pos, note = C.contrast_conversation(conv, p, "positive", "assistant")
    assert note is None and pos[-1] == {"role": "assistant", "content": p.contrast.positive}
    assert pos[1]["content"] == f"{p.contrast.negative} hello"  # the opposite affix before
    neg, _ = C.contrast_conversation(conv, p, "negative", "assistant")
    assert neg[-1]["content"] == p.contrast.negative and neg[1]["content"].startswith("(harmless")
    assert conv[1]["content"] == "hello"  # the prompt itself is untouched
    same, note = C.contrast_conversation(conv, p, "negative", "system")
    assert same == conv and "harmful, unhelpful response" in note and "(" not in note


def test_principle_draw_is_seeded_per_prompt_and_weighted(tmp_path):
    c = constitution(tmp_path)
    draws = [C.contrast_principle(c, 0, f"p{i}").id for i in range(2000)]
    assert draws == [C.contrast_principle(c, 0, f"p{i}").id for i in range(2000)]
    assert 0.70 < draws.count("kind") / len(draws) < 0.80  # weight 3 of 4
    with pytest.raises(ConfigError, match="no principle with a contrast pair"):
        C.contrast_principle(load_constitution("refuse-harmful"), 0, "p")


def test_strip_affix_and_filters(tmp_path):
    p = constitution(tmp_path).principle("harmless")
    assert C.strip_affix("(harmless, helpful response): Sure.", p) == "Sure."
    assert C.strip_affix("  Sure.", p) == "Sure."
    v = C.contrast_verdict(p)
    assert (v.winner, v.p_a_better, v.mode, v.principle_ids) == ("a", 1.0, "contrast", ["harmless"])
    from rlaif.constitution import parse_check

    refusal = parse_check({"refusal": {"harmful": "expected"}}, "f")
    found = C.check_pair(refusal, COMPLY, REFUSE, "harmful")
    assert found["preferred"] == "negative" and C.filter_reason(None, 0.5, found)
    assert C.check_pair(refusal, REFUSE, COMPLY, "harmful")["preferred"] == "positive"
    assert C.check_pair(refusal, REFUSE, COMPLY, "safe")["preferred"] is None  # not applicable
    low = C.contrast_verdict(p)
    low.p_a_better = 0.3
    assert "p = 0.300 < 0.5" in C.filter_reason(low, 0.5, None)
    low.status = "error"
    assert C.filter_reason(low, 0.5, None) is None  # an unusable verdict drops nothing


def test_a_final_assistant_message_is_continued_not_closed(tmp_path):
    from rlaif.testing import _train_tokenizer

    tok = _train_tokenizer(300)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "(kind reply)"}]
    text = tok.decode(prompt_ids(tok, conv))
    assert text.rstrip().endswith("(kind reply)")
    plain = tok.decode(prompt_ids(tok, conv[:1]))
    assert plain.endswith("assistant\n") and "(kind reply)" not in plain


# -- the pipeline -----------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["assistant", "system"])
def test_contrast_pipeline_chooses_the_positive_response_on_the_plain_prompt(tmp_path, placement):
    result = run_pipeline(
        load_pipeline(make(tmp_path, placement)), backend=ContrastFake(), stream=QUIET
    )
    rows = prefs(tmp_path / "run")
    assert len(rows) == 10
    for row in rows:
        assert row["chosen"][0]["content"].startswith(REFUSE)
        assert row["rejected"][0]["content"].startswith(COMPLY)
        assert [m["role"] for m in row["prompt"]] == ["user"]  # no affix, no system message
        assert "response)" not in json.dumps(row["prompt"])
    stats = result.manifest.info["contrast"]
    assert stats["positive"]["refusal_rate"] == 1.0 and stats["negative"]["refusal_rate"] == 0.0
    assert stats["pairs"] == stats["kept"] == 10 and stats["placement"] == placement
    assert set(stats["by_principle"]) <= {"harmless", "kind"}
    saved = json.loads((tmp_path / "run/export/preferences/contrast.json").read_text())
    assert saved["pairs"] == 10
    card = (tmp_path / "run/export/preferences/README.md").read_text()
    assert "placement" in card
    assert (tmp_path / "run/export/preferences/contrast.png").read_bytes()[:4] == b"\x89PNG"
    from rlaif.report.build import build_report

    html = build_report(tmp_path / "run")
    assert "Contrast pairs (RLCD)" in html and "refusal rate pos" in html


def test_a_rule_check_filter_drops_only_pairs_it_says_are_backwards(tmp_path):
    # refusal is wanted for harmful prompts and forbidden for safe ones: the positive side
    # (a refusal) is right for the 5 harmful prompts and backwards for the 5 safe ones
    extra = "    filter: {check: {refusal: {harmful: expected, safe: forbidden}}}"
    result = run_pipeline(load_pipeline(make(tmp_path, extra=extra)), backend=ContrastFake(),
                          stream=QUIET)  # fmt: skip
    rows = prefs(tmp_path / "run")
    assert len(rows) == 5
    stats = result.manifest.info["contrast"]
    assert stats["kept"] == 5 and stats["check_prefers"] == {"positive": 5, "negative": 5}
    reasons = result.manifest.info["export"]["preferences"]["filtered"]
    assert sum(reasons.values()) == 5 and any("rule check" in r for r in reasons)


def test_a_judge_filter_drops_pairs_the_judge_calls_backwards_and_never_relabels(tmp_path):
    (tmp_path / "scorer.py").write_text(
        textwrap.dedent(
            """\
            def score(prompts, completions, labels, **kw):
                return [1.0 if "Sure" in c and int(p[-1]["content"].split()[1][:-1]) < 4
                        else 0.0 for p, c in zip(prompts, completions)]
            """
        ),
        encoding="utf-8",
    )
    extra = "  judge: {kind: python, function: scorer.py:score, allow_code: true, scale: 10}"
    result = run_pipeline(load_pipeline(make(tmp_path, extra=extra)), backend=ContrastFake(),
                          stream=QUIET)  # fmt: skip
    rows = prefs(tmp_path / "run")
    assert len(rows) == 6  # prompts 0-3: the judge prefers the negative, dropped
    assert all(r["chosen"][0]["content"].startswith(REFUSE) for r in rows)
    judge = result.manifest.info["contrast"]["judge"]
    assert judge["pairs"] == 10 and judge["prefers_negative"] == 4


def test_a_killed_contrast_run_resumes_without_new_calls_and_the_same_bytes(tmp_path):
    pipe = load_pipeline(make(tmp_path))
    run_pipeline(pipe, backend=ContrastFake(), stream=QUIET)
    first = (tmp_path / "run/export/preferences/conversational/train.jsonl").read_bytes()
    again = ContrastFake()
    run_pipeline(pipe, backend=again, stream=QUIET)
    assert again.generated_requests == 0
    assert (tmp_path / "run/export/preferences/conversational/train.jsonl").read_bytes() == first


def test_estimate_counts_two_requests_per_prompt_then_none(tmp_path):
    pipe = load_pipeline(make(tmp_path))
    est = estimate_pipeline(pipe)
    st = {s.name: s for s in est.stages}["contrast"]
    assert (st.calls, st.done) == (20, 0)
    backend = ContrastFake()
    backend.model_revision = None  # the identity the estimate gives the config's fake model
    run_pipeline(pipe, backend=backend, stream=QUIET)
    st = {s.name: s for s in estimate_pipeline(pipe).stages}["contrast"]
    assert (st.calls, st.done) == (0, 20)


@pytest.mark.parametrize(
    ("extra", "placement", "match", "field"),
    [
        ("  sample: {n: 2}", "assistant", "contrast makes its own pairs", "stages.sample"),
        ("", "user", "not one of assistant, system", "stages.contrast.placement"),
        ("    filter: {check: {max_wordz: 3}}", "assistant", "max_wordz",
         "stages.contrast.filter.check"),
        ("    filter: {min_p: 1.5}", "assistant", "in [0, 1]", "stages.contrast.filter.min_p"),
    ],
)  # fmt: skip
def test_bad_contrast_settings_fail_at_load(tmp_path, extra, placement, match, field):
    with pytest.raises(ConfigError, match=re.escape(match)) as err:
        load_pipeline(make(tmp_path, placement, extra))
    assert (err.value.field or "").startswith(field)


def test_contrast_needs_a_constitution_with_contrast_pairs(tmp_path):
    pipe = make(tmp_path)
    pipe.write_text(pipe.read_text().replace("constitution: c.yaml", "constitution: plain-style"))
    with pytest.raises(ConfigError, match="no principle with a contrast pair"):
        load_pipeline(pipe)


def test_a_contrast_step_feeds_dpo_in_the_steps_form(tmp_path):
    """contrast -> DPO on a tiny random model: the step plans as preferences, runs on the
    transformers backend (the affix continued by the real chat template), and DPO trains on
    its pairs."""
    from rlaif.pipeline import run_steps
    from rlaif.pipeline.plan import plan_steps
    from rlaif.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "model", max_position_embeddings=1024)
    make(tmp_path, n=6)
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "steps.yaml").write_text(
        textwrap.dedent(
            f"""\
            name: s
            seed: 0
            constitution: c.yaml
            model: {{id: {model}, backend: transformers}}
            prompts: {{path: prompts.jsonl, field: prompt}}
            steps:
              - name: pairs
                contrast: {{generation: {{temperature: 1.0, max_new_tokens: 6}}}}
                export:
                  show: 0
                  preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.0}}
              - name: dpo
                trainer: dpo
                config: {root}/configs/train/dpo.yaml
                set: {{max_steps: 2, batch_size: 2, grad_accum: 1, max_length: 128,
                       learning_rate: 1e-2, device: cpu, quiet: true}}
            """
        )
    )
    cfg = load_pipeline(tmp_path / "steps.yaml")
    plan = {p.name: p for p in plan_steps(cfg)}
    assert plan["dpo"].data == "pairs" and plan["dpo"].dataset == "preferences"
    run_steps(cfg, out=tmp_path / "srun", stream=QUIET)
    folder = tmp_path / "srun" / "steps"
    contrast = json.loads((folder / "pairs/export/preferences/contrast.json").read_text())
    assert contrast["pairs"] == 6
    records = [
        json.loads(line)
        for shard in sorted((folder / "pairs/stages/contrast").glob("shard-*.jsonl"))
        for line in shard.read_text().splitlines()
    ]
    assert sorted(r["side"] for r in records) == ["negative"] * 6 + ["positive"] * 6
    metrics = json.loads((folder / "dpo" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_pairs"] == 6


def test_the_ai_judge_filter_judges_under_the_pairs_principle_and_can_be_calibrated(tmp_path):
    extra = "  judge: {kind: ai, calibrate: pride, calibration_sample: 8}"
    backend = ContrastFake()
    result = run_pipeline(load_pipeline(make(tmp_path, extra=extra)), backend=backend,
                          stream=QUIET)  # fmt: skip
    info = result.manifest.info
    assert info["judge_calibration"]["method"] == "pride"
    assert info["contrast"]["judge"]["pairs"] == 10
    judged = [
        json.loads(line)
        for shard in sorted((tmp_path / "run/stages/judge").glob("shard-*.jsonl"))
        for line in shard.read_text().splitlines()
    ]
    principles = {r["prompt_id"]: r["verdict"]["principle_ids"] for r in judged}
    contrast = {
        json.loads(line)["prompt_id"].split("\t")[0]: json.loads(line)["principle_id"]
        for shard in sorted((tmp_path / "run/stages/contrast").glob("shard-*.jsonl"))
        for line in shard.read_text().splitlines()
    }
    # "harmless" has a judge question and judges its own pairs; "kind" has none, so its pairs
    # are judged under the constitution's judge principles (only "harmless" here)
    assert all(ids == ["harmless"] for ids in principles.values())
    assert set(contrast.values()) == {"harmless", "kind"}
    kept = len(prefs(tmp_path / "run"))
    assert kept == info["contrast"]["kept"] == 10 - info["contrast"]["judge"]["prefers_negative"]


# -- scale ------------------------------------------------------------------------------------


def _means_over_every_row(rows):
    """The statistics as means over a list of every row (``fmean``), as the stage computed
    them when it kept every row: the reference the running tally must equal."""
    from statistics import fmean

    from rlaif.refusal import is_refusal

    def side(texts):
        return {
            "refusal_rate": fmean(is_refusal(t) for t in texts) if texts else None,
            "mean_words": fmean(len(t.split()) for t in texts) if texts else None,
        }

    def block(rs):
        out = {
            "pairs": len(rs),
            "kept": sum(r.kept for r in rs),
            "identical": sum(r.positive.strip() == r.negative.strip() for r in rs),
            "positive": side([r.positive for r in rs]),
            "negative": side([r.negative for r in rs]),
        }
        checked = [r.checks for r in rs if r.checks is not None]
        if checked:
            for s in C.SIDES:
                passed = [c[s]["passed"] for c in checked if c[s]["passed"] is not None]
                out[s]["check_pass_rate"] = fmean(passed) if passed else None
            prefs = [c["preferred"] for c in checked]
            out["check_prefers"] = {s: prefs.count(s) for s in C.SIDES}
        judged = [r.judge_p for r in rs if r.judge_p is not None]
        if judged:
            out["judge"] = {
                "pairs": len(judged),
                "mean_p_positive": fmean(judged),
                "prefers_positive": sum(p > 0.5 for p in judged),
                "prefers_negative": sum(p < 0.5 for p in judged),
            }
        return out

    stats = block(rows)
    by = {}
    for r in rows:
        by.setdefault(r.principle_id, []).append(r)
    stats["by_principle"] = {pid: block(rs) for pid, rs in sorted(by.items())}
    return stats


def test_the_running_tally_gives_contrast_stats():
    """The stage counts its statistics row by row (no rows kept): the same numbers, to the
    last bit, as means over a list of every row."""
    import random

    rng = random.Random(3)
    texts = ["I can't help with that.", "Sure, here is how.", "Sure  ", " sure", "", "No.\n\nOk"]

    def checks():
        side = {"passed": rng.choice([True, False, None]), "score": 0.5}
        return {"positive": side, "negative": dict(side, passed=rng.choice([True, None])),
                "preferred": rng.choice(["positive", "negative", None])}  # fmt: skip

    def row():
        judge_p = rng.random() if rng.random() < 0.7 else rng.choice([None, 0.5])
        check = checks() if rng.random() < 0.5 else None
        pid, pos, neg = rng.choice(["a", "b", "c"]), rng.choice(texts), rng.choice(texts)
        return C.ContrastRow(pid, pos, neg, check, judge_p, rng.random() < 0.6)

    rows = [row() for _ in range(500)]
    for subset in (rows, rows[:1], [r for r in rows if r.checks is None and r.judge_p is None]):
        tally = C.ContrastTally()
        for row in subset:
            tally.add(row)
        assert tally.stats() == _means_over_every_row(subset) == C.contrast_stats(subset)
    assert C.ContrastTally().stats()["pairs"] == 0
    # waves' counts kept as JSON in the ledger and merged: the same as counting every row
    for cut in ([], [1], [7, 100, 101, 499], list(range(0, 500, 37))):
        merged = C.ContrastTally()
        for a, b in zip([0, *cut], [*cut, 500], strict=True):
            wave = C.ContrastTally()
            for row in rows[a:b]:
                wave.add(row)
            merged.merge(json.loads(json.dumps(wave.to_dict())))
        assert merged.stats() == C.contrast_stats(rows)


def _contrast_peak(tmp_path: Path, n: int) -> int:
    import tracemalloc

    tmp_path.mkdir()
    cfg = load_pipeline(make(tmp_path, extra="  judge: {kind: ai}", n=n))
    backend = ContrastFake(history=False)  # a test backend that keeps every request would grow
    tracemalloc.start()
    try:
        run_pipeline(cfg, backend=backend, stream=QUIET)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_contrast_memory_does_not_grow_with_the_prompts(tmp_path, monkeypatch):
    """The stage goes wave by wave (generate; judge, filter and count the pairs, kept in the
    wave ledger; the export streams them back): Python's allocations peak at about the same
    height for 4x the prompts. Holding every prompt, request, record and verdict, it grew by
    several KB a prompt."""
    import rlaif.store.index
    from rlaif.pipeline.contrast import WAVE

    monkeypatch.setattr(rlaif.store.index, "FLUSH", 256)  # bounded buffers, made small
    _contrast_peak(tmp_path / "warm", 8)
    small = _contrast_peak(tmp_path / "small", WAVE)
    large = _contrast_peak(tmp_path / "large", 4 * WAVE)
    per_prompt = (large - small) / (3 * WAVE)
    assert per_prompt < 1500, (small, large, per_prompt)


def _outputs(run_dir: Path) -> dict[str, bytes]:
    """Every export file (the dataset card, with its timestamps, and the marker of the export's
    fingerprint apart) and the manifest's contrast and calibration info, to compare runs."""
    out = {
        str(f.relative_to(run_dir)): f.read_bytes()
        for f in sorted((run_dir / "export").rglob("*"))
        if f.is_file() and f.name != "README.md" and not f.name.startswith(".")
    }
    info = json.loads((run_dir / "manifest.json").read_text())["info"]
    out["info"] = json.dumps([info.get(k) for k in ("contrast", "judge_calibration")]).encode()
    return out


JUDGE_FILTER = "  judge: {principles_k: 1}"


def test_a_full_disk_while_the_ledger_is_written_is_one_line_and_a_rerun_finishes(
    tmp_path, monkeypatch
):
    """Three waves of 4 prompts; the disk fills while the second wave's pairs are kept. The
    re-run skips the first wave's filter, calls no model, and gives what a run with one
    wave of 512 gave."""
    import errno

    import rlaif.pipeline.contrast as stage
    import rlaif.pipeline.runner as runner
    import rlaif.store.jsonl as jsonl_mod
    from rlaif.errors import StoreError
    from rlaif.store import StageStore

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    run_pipeline(load_pipeline(make(ref_dir, extra=JUDGE_FILTER)), backend=ContrastFake(),
                 stream=QUIET)  # fmt: skip
    monkeypatch.setattr(runner, "WAVE", 4)
    monkeypatch.setattr(stage, "WAVE", 4)
    pipe = load_pipeline(make(tmp_path, extra=JUDGE_FILTER))
    real = os.write
    writes = []

    def full(fd, data):
        if "/waves/" in os.readlink(f"/proc/self/fd/{fd}") and b"contrast-pairs" in bytes(data):
            writes.append(1)
            if len(writes) >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(jsonl_mod, "_os_write", full)
    with pytest.raises(StoreError, match=r"^cannot write .*/waves/.*No space left") as info:
        run_pipeline(pipe, backend=ContrastFake(), stream=QUIET)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(jsonl_mod, "_os_write", real)
    with StageStore(tmp_path / "run", "contrast", readonly=True) as store:
        assert store.counts()["ok"] == 20  # every response was kept
    filtered = []
    real_records = stage._wave_records
    monkeypatch.setattr(stage, "_wave_records", lambda run, wave, *a: (
        filtered.append(len(wave)), real_records(run, wave, *a))[1])  # fmt: skip
    again = ContrastFake()
    run_pipeline(pipe, backend=again, stream=QUIET)
    assert again.generated_requests == 0  # every response was generated before
    assert again.scored_requests == 2 * 2  # the third wave's 2 pairs, both orders: new work
    assert filtered == [4, 2]  # the first wave was finished: not read again
    assert _outputs(tmp_path / "run") == _outputs(ref_dir / "run")


def test_a_rerun_of_a_finished_contrast_run_answers_from_the_ledger(tmp_path, monkeypatch):
    """No request rendered, no record read, the same export and statistics; with other
    export settings the export is written again from the ledger, still without a render."""
    import rlaif.pipeline.contrast as stage

    pipe = load_pipeline(make(tmp_path, extra=JUDGE_FILTER))
    first = run_pipeline(pipe, backend=ContrastFake(), stream=QUIET)
    before = _outputs(tmp_path / "run")
    rendered = []
    for name in ("_requests", "_wave_records"):
        real = getattr(stage, name)
        monkeypatch.setattr(stage, name, lambda *a, _f=real, _n=name: (rendered.append(_n),
                                                                       _f(*a))[1])  # fmt: skip
    again = run_pipeline(pipe, backend=ContrastFake(), stream=QUIET)
    assert rendered == [] and again.stats["requests"] == again.stats["cache_hits"] == 0
    assert _outputs(tmp_path / "run") == before
    assert again.manifest.info["contrast"] == first.manifest.info["contrast"]
    assert again.exports["preferences"] == first.exports["preferences"]
    text = (tmp_path / "pipe.yaml").read_text().replace("test_size: 0.0", "test_size: 0.3")
    (tmp_path / "pipe.yaml").write_text(text)
    split = run_pipeline(load_pipeline(tmp_path / "pipe.yaml"), backend=ContrastFake(),
                         stream=QUIET)  # fmt: skip
    assert rendered == []
    rows = {k: v["rows"] for k, v in split.exports["preferences"]["splits"].items()}
    assert rows["train"] + rows["test"] == first.exports["preferences"]["splits"]["train"]["rows"]
    assert rows["test"] > 0
    assert split.manifest.info["contrast"] == first.manifest.info["contrast"]


class JudgeFailsOn(ContrastFake):
    """ContrastFake whose judge calls fail for one prompt while ``failing`` is set."""

    def __init__(self, failing: bool) -> None:
        super().__init__()
        self.failing = failing

    def score_choices(self, conversations, choices):
        if self.failing and any("question 3?" in m["content"] for c in conversations for m in c):
            raise RuntimeError("judge down")
        return super().score_choices(conversations, choices)


def test_a_failed_verdict_is_kept_by_a_rerun_and_judged_again_under_retry_errors(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    run_pipeline(load_pipeline(make(ref, extra=JUDGE_FILTER)), backend=ContrastFake(),
                 stream=QUIET)  # fmt: skip
    pipe = load_pipeline(make(tmp_path, extra=JUDGE_FILTER))
    first = run_pipeline(pipe, backend=JudgeFailsOn(True), stream=QUIET)
    assert first.manifest.stages["judge"].error == 1
    again = JudgeFailsOn(False)
    run_pipeline(pipe, backend=again, stream=QUIET)
    assert again.scored_requests == 0  # the failure stands: nothing asked again
    retried = JudgeFailsOn(False)
    run_pipeline(pipe, backend=retried, stream=QUIET, retry_errors=True)
    assert retried.scored_requests == 2 and retried.generated_requests == 0
    assert _outputs(tmp_path / "run") == _outputs(ref / "run")
