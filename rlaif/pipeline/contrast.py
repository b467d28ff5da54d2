"""The RLCD contrast stage of a pipeline: generate, filter, export, and say how far apart.

For every prompt one principle with a ``contrast`` pair is drawn (seeded by the prompt), and
the policy answers twice: under the positive instruction and under the negative one
(:mod:`rlaif.stages.contrast`). The positive response is chosen by construction. Filters can
only drop pairs: a rule check that prefers the negative response, and the ``judge`` section's
judge (any kind; RLCD-Rescore's judge used as a filter) when its P(positive better) is below
``contrast.filter.min_p``. The exported prompt is the plain prompt.

Generation records (stage ``contrast``, one per response) are durable per backend batch and
the filter judge's records per wave, like the other stages, so a killed run resumes without
losing or repeating work. ``contrast.json`` in the export folder and ``manifest.info
["contrast"]`` hold the statistics the report shows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from rlaif.calls.caller import GenRequest, ModelCaller
from rlaif.constitution import parse_check
from rlaif.export.contrast import write_contrast
from rlaif.export.filters import PreferenceExportConfig
from rlaif.export.preferences import export_preferences
from rlaif.pipeline import calibration
from rlaif.pipeline.calibration import calibrate_judges
from rlaif.pipeline.judges import judge_kind
from rlaif.pipeline.rl_cai import PairToJudge, judge_wave
from rlaif.pipeline.steps import run_gen_step
from rlaif.progress import Progress
from rlaif.sources import PromptItem
from rlaif.stages import contrast as C
from rlaif.stages import judge as J
from rlaif.stages.critique import clean
from rlaif.store import Manifest, StageStore, record_id

STAGE = "contrast"
WAVE = 512  # prompts per wave (two requests each)


class RunParts(calibration.RunParts, Protocol):
    """What the contrast stage needs of a run (the runner's ``_Run``) beyond the judge's."""

    items: list[PromptItem]
    caller: ModelCaller

    def store(self, stage: str) -> StageStore: ...

    def provenance(self) -> dict[str, Any]: ...


def contrast_and_export(run: RunParts, manifest: Manifest) -> dict[str, Any]:
    """Make, filter and export the contrast pairs of every prompt; return the export stats."""
    cfg, stage = run.cfg, run.cfg.stages.contrast
    assert stage is not None
    principles = {i.id: C.contrast_principle(run.constitution, cfg.seed, i.id) for i in run.items}
    texts = _generate(run, principles, manifest)
    if run.judge_callers and run.judge_callers[0] is not run.caller:
        run.caller.close()  # the policy's work is done: free it before the judge loads
    rule = None
    if isinstance(stage.filter.check, dict):
        rule = parse_check(stage.filter.check, "stages.contrast.filter.check")
    records, rows = [], []
    pairs: list[PairToJudge] = []
    for item in run.items:
        p = principles[item.id]
        pos, neg = (texts.get((item.id, side)) for side in C.SIDES)
        rec: dict[str, Any] = {
            "id": record_id("contrast-pair", {"prompt_id": item.id, "x": pos, "y": neg}),
            "prompt_id": item.id,
            "prompt": item.messages(),
            "source": STAGE,
            "i": 0,
            "j": 1,
            "principle_id": p.id,
        }
        if pos is None or neg is None:
            records.append({**rec, "status": "error", "reason": "generation failed"})
            continue
        check = p.check if stage.filter.check == "principle" else rule
        checked = C.check_pair(check, pos, neg, item.label) if check is not None else None
        verdict = C.contrast_verdict(p).to_dict()
        rec.update(x=pos, y=neg, verdict=verdict, status="ok", filter={"check": checked})
        records.append(rec)
        if run.judge_callers:
            pairs.append(PairToJudge(item.id, item.messages(), pos, neg, STAGE, 0, 1, item.label))
    judged = _judge(run, pairs, principles, manifest) if pairs else {}
    for rec in records:
        if rec["status"] != "ok":
            continue
        v = judged.get(rec["prompt_id"])
        if v is not None:
            rec["filter"]["judge"] = v.to_dict()
        why = C.filter_reason(v, stage.filter.min_p, rec["filter"]["check"])
        if why is not None:
            rec.update(status="skipped", reason=why)
        rows.append(
            C.ContrastRow(rec["principle_id"], rec["x"], rec["y"], rec["filter"]["check"],
                          v.p_a_better if v is not None and v.status == "ok" else None,
                          why is None)
        )  # fmt: skip
    stats = C.contrast_stats(rows)
    stats.update(placement=stage.placement, failed=sum(r["status"] == "error" for r in records))
    manifest.info["contrast"] = stats
    settings = PreferenceExportConfig.from_section(cfg.stages.export.preferences)
    provenance = {**run.provenance(), "contrast": {"placement": stage.placement,
                                                   "min_p": stage.filter.min_p}}  # fmt: skip
    out = export_preferences(records, run.run_dir, settings, provenance, manifest)
    write_contrast(stats, out["export_dir"])
    return out


def _generate(
    run: RunParts, principles: dict[str, Any], manifest: Manifest
) -> dict[tuple[str, str], str]:
    """(prompt id, side) -> the response, for every request that succeeded."""
    cfg, stage = run.cfg, run.cfg.stages.contrast
    assert stage is not None
    params = stage.generation.params(cfg.seed + 11)
    requests: dict[str, GenRequest] = {}
    extra: dict[str, dict[str, Any]] = {}
    for item in run.items:
        for side in C.SIDES:
            key = f"{item.id}\t{side}"
            p = principles[item.id]
            requests[key] = C.contrast_request(
                run.book, item.messages(), p, side, stage.placement, cfg.system, params
            )
            extra[key] = {"side": side, "principle_id": p.id}
    store = run.store(STAGE)
    manifest.set_expected(STAGE, len(requests))
    keys = list(requests)
    done: dict[str, dict[str, Any]] = {}
    with Progress(len(keys), STAGE, "responses", run.stream) as progress:
        for start in range(0, len(keys), 2 * WAVE):
            chunk = {k: requests[k] for k in keys[start : start + 2 * WAVE]}
            done.update(run_gen_step(STAGE, chunk, store, run.caller, progress, extra))
    out = {}
    for key, rec in done.items():
        if rec.get("status") == "ok":
            pid, side = key.split("\t")
            out[(pid, side)] = C.strip_affix(clean(rec["text"]), principles[pid])
    return out


def _judge(
    run: RunParts, pairs: list[PairToJudge], principles: dict[str, Any], manifest: Manifest
) -> dict[str, J.Verdict]:
    """The filter judge's verdict per prompt id (x = the positive response). A pair is judged
    under its own principle when that principle can judge (as RLCD-Rescore scores each pair
    with the instruction of its affix pair), else under the constitution's judge principles."""
    cfg, jstage = run.cfg, run.cfg.stages.judge
    assert jstage is not None
    kind = judge_kind(jstage, cfg.resolve_path("."), run.run_dir)
    # judge.calibrate: the option prior, estimated on these pairs (each under principles drawn
    # from the whole constitution: the prior belongs to the judge's letters, not a principle)
    calibration = calibrate_judges(run, pairs, J.judge_config(jstage), kind)
    jcfg = calibration.configs[0]
    store = run.store("judge")
    manifest.set_expected("judge", len(pairs))
    groups: dict[str, list[PairToJudge]] = {}
    for pair in pairs:
        p = principles[pair.prompt_id]
        groups.setdefault(p.id if J.judged_by(p, kind.kind) else "", []).append(pair)
    judged: dict[str, dict[str, Any]] = {}
    how = jcfg.mode if kind.kind in ("auto", "ai") else kind.kind
    with Progress(len(pairs), f"judge filter ({how})", "pairs", run.stream) as progress:
        for pid, group in groups.items():
            constitution = run.constitution
            if pid:
                one = (run.constitution.principle(pid),)
                constitution = dataclasses.replace(constitution, principles=one)
            for start in range(0, len(group), WAVE):
                judged.update(
                    judge_wave(group[start : start + WAVE], jcfg, constitution, run.book,
                               cfg.system, cfg.seed, run.judge_callers[0], store, progress,
                               kind)
                )  # fmt: skip
    calibration.record([judged], manifest)
    return {r["prompt_id"]: J.Verdict.from_dict(r["verdict"]) for r in judged.values()}
