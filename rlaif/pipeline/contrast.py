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

Memory holds one wave of prompts at a time, and the wave ledger (:mod:`rlaif.pipeline.waves`)
says which waves are done. First the responses are generated wave by wave (a finished wave is
skipped without rendering a request). Then each wave's pairs are judged, filtered and counted
(:class:`rlaif.stages.contrast.ContrastTally`); the wave's ledger entry keeps its counts and
a second entry its pair records, which the export streams. A re-run skips every finished
wave, and when the export on disk is the one they make, answers from the ledger. A calibrated
judge filters every wave again (its prior and rates are over all pairs; no model call).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
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
from rlaif.pipeline.waves import ExportMark, LazyWaves, Ledger, WaveRecords
from rlaif.progress import Progress
from rlaif.sources import PromptItem
from rlaif.sources.stream import PromptStream
from rlaif.stages import contrast as C
from rlaif.stages import judge as J
from rlaif.stages.critique import clean
from rlaif.store import Manifest, StageStore, record_id

STAGE = "contrast"
FILTER = "contrast-filter"  # ledger: a wave's pairs judged, filtered and counted
PAIRS = "contrast-pairs"  # ledger: a wave's pair records, what the export reads
WAVE = 512  # prompts per wave (two requests each): the runner's wave


class RunParts(calibration.RunParts, Protocol):
    """What the contrast stage needs of a run (the runner's ``_Run``) beyond the judge's."""

    prompts: PromptStream
    caller: ModelCaller
    ledger: Ledger

    worked: bool

    @property
    def waves(self) -> int: ...

    def store(self, stage: str) -> StageStore: ...

    def provenance(self) -> dict[str, Any]: ...

    def fingerprint(self, stage: str) -> str: ...

    def finished(
        self, stage: str, fp: str, w: int, stores: list[StageStore]
    ) -> dict[str, Any] | None: ...

    def finish(
        self, stage: str, fp: str, w: int, stores: list[StageStore], **data: Any
    ) -> None: ...


def contrast_and_export(run: RunParts, manifest: Manifest) -> dict[str, Any]:
    """Make, filter and export the contrast pairs of every prompt; return the export stats.

    Wave by wave, memory holds one wave: the responses are generated, then (after the
    judge's calibration, which needs every pair) each wave's pairs are judged, filtered and
    counted, and their records kept in the wave ledger, from which the export reads them.
    """
    cfg, stage = run.cfg, run.cfg.stages.contrast
    assert stage is not None
    store = run.store(STAGE)
    manifest.set_expected(STAGE, 2 * run.prompts.count)
    _generate(run, store)
    stores = [store, run.store("judge")] if run.judge_callers else [store]
    fp = run.fingerprint(FILTER)
    calibrated = cfg.stages.judge is not None and cfg.stages.judge.calibrate != "none"
    # the waves finished before this run count from their ledger entries; the rest are left
    done = _Filtered()
    left: list[int] = []
    for w in range(run.waves):
        entry = None if calibrated else run.finished(FILTER, fp, w, stores)
        if entry is None:
            left.append(w)
        else:
            done.add(entry)
    run.worked = run.worked or bool(left)
    settings = PreferenceExportConfig.from_section(cfg.stages.export.preferences)
    mark = ExportMark(run.ledger, run.run_dir, fp, run.waves, settings)
    if not left and (written := mark.done()) is not None:
        # nothing new since this export was written: its statistics stand
        manifest.info["contrast"] = written["contrast"]
        manifest.info.setdefault("export", {})["preferences"] = written["stats"]
        return dict(written["stats"])
    if run.judge_callers and run.judge_callers[0] is not run.caller:
        run.caller.close()  # the policy's work is done: free it before the judge loads
    judge = None
    if run.judge_callers and left:  # at most one pair a prompt: the waves' prompts bound them
        bound = sum(min(WAVE, run.prompts.count - w * WAVE) for w in left)
        judge = _Judge(run, stores[-1], _all_pairs(run, store), bound)
    _filter_waves(run, fp, left, stores, judge, done)
    if run.judge_callers:
        manifest.set_expected("judge", done.pairs)  # every wave's, finished before or now
    if judge is not None:
        judge.finish(manifest)
    stats = done.tally.stats()
    stats.update(placement=stage.placement, failed=done.failed)
    manifest.info["contrast"] = stats
    provenance = {**run.provenance(), "contrast": {"placement": stage.placement,
                                                   "min_p": stage.filter.min_p}}  # fmt: skip
    mark.start()  # an export cut short leaves no marker behind
    source = WaveRecords(run.ledger, PAIRS, fp, run.waves, store)
    out_stats = export_preferences(source, run.run_dir, settings, provenance, manifest)
    write_contrast(stats, out_stats["export_dir"])
    mark.finish(stats=manifest.info["export"]["preferences"], contrast=stats)
    return out_stats


def _generate(run: RunParts, store: StageStore) -> None:
    """Both responses of every prompt, wave by wave; a finished wave is skipped."""
    fp = run.fingerprint(STAGE)
    waves = LazyWaves(run.prompts, WAVE)
    with Progress(2 * run.prompts.count, STAGE, "responses", run.stream) as progress:
        for w in range(run.waves):
            if (entry := run.finished(STAGE, fp, w, [store])) is not None:
                progress.update(2 * entry["prompts"])
                continue
            wave = waves.get(w)
            requests, extra = _requests(run, wave, _principles(run, wave))
            out = run_gen_step(STAGE, requests, store, run.caller, progress, extra)
            ok = sum(rec["status"] == "ok" for rec in out.values())
            run.finish(STAGE, fp, w, [store], errors=len(requests) - ok, prompts=len(wave))


class _Filtered:
    """What the filtered waves add up to: their statistics' counts, failed generations and
    the pairs the judge got."""

    def __init__(self) -> None:
        self.tally = C.ContrastTally()
        self.failed = self.pairs = 0

    def add(self, entry: dict[str, Any]) -> None:
        """Count a wave's ``contrast-filter`` ledger entry."""
        self.tally.merge(entry["tally"])
        self.failed += entry["failed"]
        self.pairs += entry["pairs"]


def _filter_waves(
    run: RunParts,
    fp: str,
    left: list[int],
    stores: list[StageStore],
    judge: _Judge | None,
    done: _Filtered,
) -> None:
    """Judge, filter and count the pairs of the waves ``left``, keeping each wave's counts and
    pair records in the ledger, and add them to ``done``."""
    stage = run.cfg.stages.contrast
    assert stage is not None
    rule = None
    if isinstance(stage.filter.check, dict):
        rule = parse_check(stage.filter.check, "stages.contrast.filter.check")
    waves = LazyWaves(run.prompts, WAVE)
    for w in left:
        wave = waves.get(w)
        principles = _principles(run, wave)
        records, pairs = _wave_records(run, wave, principles, stores[0], rule)
        judged = judge.wave(pairs, principles) if judge is not None and pairs else {}
        counts = C.ContrastTally()
        failed = sum(_filter(rec, judged.get(rec["prompt_id"]), stage.filter.min_p, counts)
                     for rec in records)  # fmt: skip
        # a failed verdict too makes the wave one that --retry-errors does again
        errors = failed + sum(v.status != "ok" for v in judged.values())
        run.ledger.finish(PAIRS, fp, w, records=records)  # first: the entry below vouches
        entry = {"tally": counts.to_dict(), "failed": failed, "pairs": len(pairs)}
        run.finish(FILTER, fp, w, stores, errors=errors, prompts=len(wave), **entry)
        done.add(entry)
        del records, pairs, judged  # one wave in memory, not two while the next is read


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


class _Judge:
    """The filter judge, wave by wave. A pair is judged under its own principle when that
    principle can judge (as RLCD-Rescore scores each pair with the instruction of its affix
    pair), else under the constitution's judge principles."""

    def __init__(
        self, run: RunParts, store: StageStore, pairs: Iterable[PairToJudge], bound: int
    ) -> None:
        cfg, jstage = run.cfg, run.cfg.stages.judge
        assert jstage is not None
        self.run, self.store = run, store
        self.kind = judge_kind(jstage, cfg.resolve_path("."), run.run_dir)
        # judge.calibrate: the option prior, estimated on these pairs (each under principles
        # drawn from the whole constitution: the prior belongs to the judge's letters)
        self.calibration = calibrate_judges(run, pairs, J.judge_config(jstage), self.kind)
        self.jcfg = self.calibration.configs[0]
        how = self.jcfg.mode if self.kind.kind in ("auto", "ai") else self.kind.kind
        self.progress = Progress(bound, f"judge filter ({how})", "pairs", run.stream)

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
        self.calibration.add(0, judged.values())
        return {r["prompt_id"]: J.Verdict.from_dict(r["verdict"]) for r in judged.values()}

    def finish(self, manifest: Manifest) -> None:
        """Close the progress bar; the manifest gets the calibration's figures."""
        self.progress.close()
        self.calibration.record([], manifest)
