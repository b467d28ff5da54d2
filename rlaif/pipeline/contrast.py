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

Memory holds one wave of prompts at a time: the responses are generated wave by wave, then
each wave's pairs are judged, filtered, counted (:class:`rlaif.stages.contrast.ContrastTally`)
and written to ``run_dir/waves/contrast-records.jsonl``, which the export streams (it is
written again whole by every run, from the stores; a killed run leaves only a ``.part``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from rlaif.calls.caller import GenRequest, ModelCaller
from rlaif.constitution import Principle, parse_check
from rlaif.export.contrast import write_contrast
from rlaif.export.filters import PreferenceExportConfig
from rlaif.export.preferences import export_preferences
from rlaif.pipeline import calibration
from rlaif.pipeline.calibration import calibrate_judges
from rlaif.pipeline.judges import judge_kind
from rlaif.pipeline.rl_cai import PairToJudge, judge_wave
from rlaif.pipeline.steps import recorded, run_gen_step
from rlaif.pipeline.waves import LazyWaves
from rlaif.progress import Progress
from rlaif.sources import PromptItem
from rlaif.sources.stream import PromptStream
from rlaif.stages import contrast as C
from rlaif.stages import judge as J
from rlaif.stages.critique import clean
from rlaif.store import Manifest, StageStore, record_id
from rlaif.store.jsonl import JsonlReader, encode_line, write_failure

STAGE = "contrast"
WAVE = 512  # prompts per wave (two requests each): the runner's wave
SPOOL = "contrast-records.jsonl"  # in run_dir/waves: the export's records, rewritten each run


class RunParts(calibration.RunParts, Protocol):
    """What the contrast stage needs of a run (the runner's ``_Run``) beyond the judge's."""

    prompts: PromptStream
    caller: ModelCaller

    @property
    def waves(self) -> int: ...

    def store(self, stage: str) -> StageStore: ...

    def provenance(self) -> dict[str, Any]: ...


def contrast_and_export(run: RunParts, manifest: Manifest) -> dict[str, Any]:
    """Make, filter and export the contrast pairs of every prompt; return the export stats.

    Wave by wave, memory holds one wave: the responses are generated, then (after the
    judge's calibration, which needs every pair) each wave's pairs are judged and filtered,
    counted for the statistics and written to a spool file, from which the export reads them.
    """
    cfg, stage = run.cfg, run.cfg.stages.contrast
    assert stage is not None
    store = run.store(STAGE)
    manifest.set_expected(STAGE, 2 * run.prompts.count)
    waves = LazyWaves(run.prompts, WAVE)
    with Progress(2 * run.prompts.count, STAGE, "responses", run.stream) as progress:
        for w in range(run.waves):
            wave = waves.get(w)
            requests, extra = _requests(run, wave, _principles(run, wave))
            run_gen_step(STAGE, requests, store, run.caller, progress, extra)
    if run.judge_callers and run.judge_callers[0] is not run.caller:
        run.caller.close()  # the policy's work is done: free it before the judge loads
    judge = _Judge(run, _all_pairs(run, store)) if run.judge_callers else None
    rule = None
    if isinstance(stage.filter.check, dict):
        rule = parse_check(stage.filter.check, "stages.contrast.filter.check")
    tally, failed = C.ContrastTally(), 0
    spool = run.run_dir / "waves" / SPOOL
    spool.parent.mkdir(parents=True, exist_ok=True)
    part = spool.with_name(f".{SPOOL}.part")
    waves = LazyWaves(run.prompts, WAVE)
    try:
        with open(part, "wb") as out:
            for w in range(run.waves):
                wave = waves.get(w)
                principles = _principles(run, wave)
                records, pairs = _wave_records(run, wave, principles, store, rule)
                judged = judge.wave(pairs, principles) if judge is not None and pairs else {}
                for rec in records:
                    failed += _filter(rec, judged.get(rec["prompt_id"]), stage.filter.min_p,
                                      tally)  # fmt: skip
                    out.write(encode_line(rec))
                del records, pairs, judged  # one wave in memory, not two while the next is read
        os.replace(part, spool)
    except OSError as exc:  # the stores hold every generated and judged record: re-run
        raise write_failure(part, exc) from exc
    if judge is not None:
        judge.finish(manifest)
    stats = tally.stats()
    stats.update(placement=stage.placement, failed=failed)
    manifest.info["contrast"] = stats
    settings = PreferenceExportConfig.from_section(cfg.stages.export.preferences)
    provenance = {**run.provenance(), "contrast": {"placement": stage.placement,
                                                   "min_p": stage.filter.min_p}}  # fmt: skip
    out_stats = export_preferences(_Spool(spool), run.run_dir, settings, provenance, manifest)
    write_contrast(stats, out_stats["export_dir"])
    return out_stats


def _principles(run: RunParts, wave: list[PromptItem]) -> dict[str, Principle]:
    """The principle drawn for each prompt of a wave (seeded by the prompt)."""
    return {i.id: C.contrast_principle(run.constitution, run.cfg.seed, i.id) for i in wave}


def _requests(
    run: RunParts, wave: list[PromptItem], principles: dict[str, Principle]
) -> tuple[dict[str, GenRequest], dict[str, dict[str, Any]]]:
    """A wave's two requests per prompt (key ``id<TAB>side``), and what their records add."""
    cfg, stage = run.cfg, run.cfg.stages.contrast
    assert stage is not None
    params = stage.generation.params(cfg.seed + 11)
    requests: dict[str, GenRequest] = {}
    extra: dict[str, dict[str, Any]] = {}
    for item in wave:
        p = principles[item.id]
        for side in C.SIDES:
            key = f"{item.id}\t{side}"
            requests[key] = C.contrast_request(
                run.book, item.messages(), p, side, stage.placement, cfg.system, params
            )
            extra[key] = {"side": side, "principle_id": p.id}
    return requests, extra


def _texts(
    run: RunParts, wave: list[PromptItem], principles: dict[str, Principle], store: StageStore
) -> dict[tuple[str, str], str]:
    """(prompt id, side) -> the response, for a wave's requests that succeeded (read from the
    stage's records only; the policy may be closed)."""
    requests, _ = _requests(run, wave, principles)
    out = {}
    for key, rec in recorded(STAGE, requests, store, run.caller).items():
        pid, side = key.split("\t")
        out[(pid, side)] = C.strip_affix(clean(rec["text"]), principles[pid])
    return out


def _pairs(wave: list[PromptItem], texts: dict[tuple[str, str], str]) -> Iterator[PairToJudge]:
    """The pairs the judge gets: the wave's prompts with both responses."""
    for item in wave:
        pos, neg = (texts.get((item.id, side)) for side in C.SIDES)
        if pos is not None and neg is not None:
            yield PairToJudge(item.id, item.messages(), pos, neg, STAGE, 0, 1, item.label)


def _wave_records(
    run: RunParts,
    wave: list[PromptItem],
    principles: dict[str, Principle],
    store: StageStore,
    rule: Any,
) -> tuple[list[dict[str, Any]], list[PairToJudge]]:
    """A wave's pair records (before the judge filter) and the pairs the judge gets."""
    stage = run.cfg.stages.contrast
    assert stage is not None
    texts = _texts(run, wave, principles, store)
    records: list[dict[str, Any]] = []
    for item in wave:
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
    return records, (list(_pairs(wave, texts)) if run.judge_callers else [])


def _filter(rec: dict[str, Any], v: J.Verdict | None, min_p: float, tally: C.ContrastTally) -> int:
    """Apply the filters to a pair record and count it; 1 for a failed generation."""
    if rec["status"] != "ok":
        return 1
    if v is not None:
        rec["filter"]["judge"] = v.to_dict()
    why = C.filter_reason(v, min_p, rec["filter"]["check"])
    if why is not None:
        rec.update(status="skipped", reason=why)
    tally.add(
        C.ContrastRow(rec["principle_id"], rec["x"], rec["y"], rec["filter"]["check"],
                      v.p_a_better if v is not None and v.status == "ok" else None, why is None)
    )  # fmt: skip
    return 0


def _all_pairs(run: RunParts, store: StageStore) -> Iterator[PairToJudge]:
    """Every pair the judge gets, wave by wave (what its calibration draws from)."""
    for wave in run.prompts.waves(WAVE):
        yield from _pairs(wave, _texts(run, wave, _principles(run, wave), store))


class _Spool:
    """The spooled pair records, read again from the file on each pass (the export reads
    them twice); a damaged line is an error naming the file and line."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for _, rec in JsonlReader(self.path, tail="error"):
            yield rec


class _Judge:
    """The filter judge, wave by wave. A pair is judged under its own principle when that
    principle can judge (as RLCD-Rescore scores each pair with the instruction of its affix
    pair), else under the constitution's judge principles."""

    def __init__(self, run: RunParts, pairs: Iterable[PairToJudge]) -> None:
        cfg, jstage = run.cfg, run.cfg.stages.judge
        assert jstage is not None
        self.run = run
        self.kind = judge_kind(jstage, cfg.resolve_path("."), run.run_dir)
        # judge.calibrate: the option prior, estimated on these pairs (each under principles
        # drawn from the whole constitution: the prior belongs to the judge's letters)
        self.calibration = calibrate_judges(run, pairs, J.judge_config(jstage), self.kind)
        self.jcfg = self.calibration.configs[0]
        self.store = run.store("judge")
        how = self.jcfg.mode if self.kind.kind in ("auto", "ai") else self.kind.kind
        self.progress = Progress(run.prompts.count, f"judge filter ({how})", "pairs", run.stream)
        self.pairs = 0

    def wave(
        self, pairs: list[PairToJudge], principles: dict[str, Principle]
    ) -> dict[str, J.Verdict]:
        """The verdict per prompt id (x = the positive response) of one wave's pairs."""
        run, cfg = self.run, self.run.cfg
        groups: dict[str, list[PairToJudge]] = {}
        for pair in pairs:
            p = principles[pair.prompt_id]
            groups.setdefault(p.id if J.judged_by(p, self.kind.kind) else "", []).append(pair)
        judged: dict[str, dict[str, Any]] = {}
        for pid, group in groups.items():
            constitution = run.constitution
            if pid:
                one = (run.constitution.principle(pid),)
                constitution = dataclasses.replace(constitution, principles=one)
            judged.update(
                judge_wave(group, self.jcfg, constitution, run.book, cfg.system, cfg.seed,
                           run.judge_callers[0], self.store, self.progress, self.kind)
            )  # fmt: skip
        self.pairs += len(pairs)
        self.calibration.add(0, judged.values())
        return {r["prompt_id"]: J.Verdict.from_dict(r["verdict"]) for r in judged.values()}

    def finish(self, manifest: Manifest) -> None:
        self.progress.close()
        manifest.set_expected("judge", self.pairs)
        self.calibration.record([], manifest)
