"""The RL-CAI judge stage of a run: judge every pair wave by wave, keep what the export takes.

For each wave of prompts the stage reads the wave's CAI-SL traces and sampled responses from
their stores, builds the pairs (:mod:`rlaif.pipeline.select`), judges them with every judge
model (:func:`rlaif.pipeline.rl_cai.judge_wave`, one store each), chooses the export's records
and writes them to the wave ledger (:mod:`rlaif.pipeline.waves`), from which the preference
export reads them back. Memory holds one wave. A wave the ledger has as finished under the
same fingerprint is skipped; when every wave is, and the export on disk was made from them
with the same settings, the export is not written again.
"""

from __future__ import annotations

import math
from typing import Any

from rlaif.config.schema import PipelineConfig
from rlaif.export.filters import PreferenceExportConfig
from rlaif.export.preferences import export_preferences
from rlaif.pipeline.calibration import calibrate_judges
from rlaif.pipeline.judges import judge_kind
from rlaif.pipeline.rl_cai import judge_wave, read_samples
from rlaif.pipeline.select import combine, wave_errors, wave_export_records, wave_pairs
from rlaif.pipeline.waves import WAVE, ExportMark, LazyWaves, WaveRecords, pack
from rlaif.progress import Progress
from rlaif.sources import PromptItem
from rlaif.stages import judge as J
from rlaif.store import Manifest

__all__ = ["SELECT", "judge_and_export", "sample_params"]


def sample_params(cfg: PipelineConfig) -> Any:
    """The sampling parameters of the sample stage (its seed: the run's plus 7)."""
    assert cfg.stages.sample is not None
    return cfg.stages.sample.params(cfg.seed + 7)


SELECT = "judge-select"


def judge_and_export(run: Any, manifest: Manifest, traces: Any) -> dict[str, Any]:
    """Judge CAI-SL pairs and sampled pairs wave by wave, choose what to keep, export."""
    cfg, jstage = run.cfg, run.cfg.stages.judge
    assert jstage is not None and run.judge_callers
    jcfg = J.judge_config(jstage)
    kind = judge_kind(jstage, cfg.resolve_path("."), run.run_dir)
    samples = cfg.stages.sample is not None
    fp = run.fingerprint(SELECT)
    names = ["judge" if n == 0 else f"judge-{n + 1}" for n in range(len(run.judge_callers))]
    calibrated = jstage.calibrate != "none"
    # A calibrated run judges every wave again (from its records, no model call): the rates it
    # reports are over every judged pair.
    stores = [run.store(n) for n in names]
    left: list[int] = []
    before = 0  # pairs of the waves finished before this run (their ledger entries count them)
    for w in range(run.waves):
        entry = run.finished(SELECT, fp, w, stores)
        if calibrated or entry is None:
            left.append(w)
        else:
            before += entry.get("pairs", 0)
    run.worked = run.worked or bool(left)
    settings = PreferenceExportConfig.from_section(cfg.stages.export.preferences)
    mark = ExportMark(run.ledger, run.run_dir, fp, run.waves, settings)
    if not left and (done := mark.done()) is not None:
        # nothing new since this export was written: its statistics stand
        manifest.info.setdefault("export", {})["preferences"] = done["stats"]
        return dict(done["stats"])
    calibration = calibrate_judges(run, _all_pairs(run, traces), jcfg, kind)
    for n in range(len(names)):  # every judge's rates, even over no pair
        calibration.add(n, [])
    pairs_total = 0
    how = jcfg.mode if kind.kind in ("auto", "ai") else kind.kind
    waves = LazyWaves(run.prompts)
    per_prompt = math.comb(cfg.stages.sample.n, 2) if cfg.stages.sample else 0
    per_prompt += 1 if traces is not None and jstage.cai_sl else 0
    estimate = before + per_prompt * sum(_wave_size(run, w) for w in left)  # at most
    with Progress(estimate * len(names), f"judge ({how})", "pairs", run.stream,
                  initial=before * len(names)) as progress:  # fmt: skip
        for w in left:
            wave = waves.get(w)
            tr = traces.wave(wave) if traces is not None else None
            sampled = _samples_of(run, wave) if samples else None
            pairs = wave_pairs(wave, tr, sampled, jstage.cai_sl)
            pairs_total += len(pairs)
            judged = []
            for n, jc in enumerate(run.judge_callers):
                out = judge_wave(pairs, calibration.configs[n], run.constitution, run.book,
                                 cfg.system, cfg.seed, jc, stores[n], progress, kind)  # fmt: skip
                judged.append(out)
                if calibrated:  # counted wave by wave: the rates need no records kept
                    calibration.add(n, out.values())
            by_pair = combine([{_pair_key(r): r for r in m.values()} for m in judged], jcfg)
            records = wave_export_records(wave, tr, sampled, by_pair, jstage)
            errors = wave_errors(records, [r for m in judged for r in m.values()])
            packed = pack(records, judged[0]) if len(judged) == 1 else records
            run.finish(SELECT, fp, w, stores, errors=errors, records=packed, pairs=len(pairs),
                       prompts=len(wave))  # fmt: skip
    for name in names:
        manifest.set_expected(name, pairs_total + before)
    cal = calibration.record([], manifest)
    provenance = {**run.provenance(), **cal}
    mark.start()  # an export cut short leaves no marker behind
    source = WaveRecords(run.ledger, SELECT, fp, run.waves, stores[0])
    stats = export_preferences(source, run.run_dir, settings, provenance, manifest)
    mark.finish(stats=manifest.info["export"]["preferences"])  # the export on disk is this one
    return stats


def _pair_key(r: dict[str, Any]) -> tuple[str, str, int, int]:
    return (r["source"], r["prompt_id"], r["i"], r["j"])


def _wave_size(run: Any, w: int) -> int:
    return min(WAVE, run.prompts.count - w * WAVE)


def _samples_of(run: Any, wave: list[PromptItem]) -> dict[str, list[str]]:
    """The sampled responses of a wave's prompts, read from the sample store."""
    store = next(s for s in run.stores if s.stage == "sample")
    return read_samples(wave, sample_params(run.cfg), run.book, run.cfg.system, run.caller, store)


def _all_pairs(run: Any, traces: Any) -> Any:
    """Every pair of the run, wave by wave (what calibration draws its sample from)."""
    jstage = run.cfg.stages.judge
    assert jstage is not None
    for wave in run.prompts.waves(WAVE):
        tr = traces.wave(wave) if traces is not None else None
        sampled = _samples_of(run, wave) if run.cfg.stages.sample else None
        yield from wave_pairs(wave, tr, sampled, jstage.cai_sl)
