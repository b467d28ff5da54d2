"""Run a pipeline: prompts -> SL-CAI and/or RL-CAI stages -> records -> datasets.

The runner owns ordering, batching, caching and resume; stages only say what to ask the model.
Prompts go through in waves: each wave runs every step with full batches, and its records are
appended as each backend batch returns. A crash loses at most the batch in flight; re-running
skips every record already on disk and makes no model call for it (the model is not even
loaded when nothing is left to do).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rlaif.backends.base import Backend
from rlaif.calls.budget import Budget
from rlaif.calls.caller import ModelCaller
from rlaif.calls.factory import make_caller
from rlaif.config.schema import PipelineConfig
from rlaif.constitution import Constitution, load_constitution
from rlaif.errors import ConfigError
from rlaif.export.card import scrub
from rlaif.export.filters import PreferenceExportConfig
from rlaif.export.preferences import export_preferences
from rlaif.export.sl_cai import export_sl_cai
from rlaif.pipeline.calibration import calibrate_judges
from rlaif.pipeline.contrast import contrast_and_export
from rlaif.pipeline.judges import judge_kind
from rlaif.pipeline.post import PostResult, run_post
from rlaif.pipeline.rl_cai import PairToJudge, judge_wave, sample_wave, select_pairs
from rlaif.pipeline.sl_cai import TRACE_STAGE, critique_revise_wave, step_names
from rlaif.progress import Progress
from rlaif.prompts import PromptBook
from rlaif.sources import PromptItem, read_prompt_set
from rlaif.stages import critique as cai
from rlaif.stages import judge as J
from rlaif.stages.pairs import candidate_pairs, keep_cai_sl_pair
from rlaif.store import CallCache, Manifest, RunLock, StageStore, record_id
from rlaif.version import __version__

WAVE = 512  # prompts per wave: bounds memory, keeps batches full
# Templates only the evaluation renders: eval.json records their hashes, the data records don't.
EVAL_ONLY = ("harm_check",)


@dataclass
class RunResult:
    run_dir: Path
    manifest: Manifest
    exports: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    post: PostResult | None = None  # when stages.train / stages.eval ran


@dataclass
class _Run:
    """What every phase of one run shares."""

    cfg: PipelineConfig
    run_dir: Path
    items: list[PromptItem]
    constitution: Constitution
    book: PromptBook
    caller: ModelCaller
    judge_callers: list[ModelCaller]  # first: the main judge; more: a cross-model ensemble
    retry_errors: bool
    stream: TextIO
    stores: list[StageStore] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # the prompts' source and revision

    def store(self, stage: str) -> StageStore:
        s = StageStore(self.run_dir, stage, retry_errors=self.retry_errors)
        self.stores.append(s)
        return s

    def provenance(self) -> dict[str, Any]:
        p: dict[str, Any] = {
            "constitution": self.constitution.provenance(),
            "templates": {
                n: self.book.template_hash(n) for n in self.book.names() if n not in EVAL_ONLY
            },
            "model": self.caller.model,
            "model_revision": self.caller.revision,
            "backend": self.cfg.model.backend,
            "seed": self.cfg.seed,
            "rlaif_version": __version__,
            "prompts": self.source,
        }
        for role, origin in self.cfg.model_from.items():  # "model_step", "judge_step"
            p[f"{role}_step"] = origin
        if self.judge_callers:
            p["judge_model"] = self.judge_callers[0].model
            p["judge_revision"] = self.judge_callers[0].revision
            if len(self.judge_callers) > 1:
                p["judge_models"] = [
                    {"model": c.model, "revision": c.revision} for c in self.judge_callers
                ]
            j = self.cfg.stages.judge
            assert j is not None
            p["judge"] = J.judge_config(j).to_dict()
            if j.kind != "auto" or j.label_noise:
                p["judge_kind"] = {"kind": j.kind, "function": j.function,
                                   "reward_model": j.reward_model, "scale": j.scale,
                                   "label_noise": j.label_noise}  # fmt: skip
        return p


def run_pipeline(
    cfg: PipelineConfig,
    *,
    out: str | Path | None = None,
    backend: Backend | None = None,
    judge_backend: Backend | None = None,
    retry_errors: bool = False,
    stream: TextIO | None = None,
) -> RunResult:
    """Run (or resume) a pipeline and export its datasets.

    Args:
        cfg: the validated pipeline config.
        out: run directory (default: ``cfg.output`` relative to the working directory).
        backend: a ready policy backend instead of the one the config names (tests, benches).
        judge_backend: a ready judge backend (default: the judge model of the config, or the
            policy backend when the config names none).
        retry_errors: redo requests that failed in an earlier run.
        stream: where progress goes (default stderr).
    """
    if cfg.steps:
        raise ConfigError(
            "this pipeline has steps: run it with rlaif.pipeline.run_steps", field="steps"
        )
    t0 = time.perf_counter()
    run_dir = Path(out or cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        found = read_prompt_set(cfg)
        items, dropped = found.items, found.skipped
        cache = CallCache(run_dir / "cache" / "calls.jsonl")
        named = {role: f"step:{o['step']}" for role, o in cfg.model_from.items()}
        caller = make_caller(
            cfg.model, cfg.batch_size, cache, backend, execution=cfg.execution,
            name=named.get("model"),
        )  # fmt: skip
        judge_callers: list[ModelCaller] = []
        if cfg.stages.judge is not None:
            jm = cfg.stages.judge.model
            judge_callers.append(
                make_caller(
                    jm or cfg.model,
                    cfg.batch_size,
                    cache,
                    judge_backend,
                    execution=cfg.execution,
                    name=named.get("judge"),
                )
                if jm or judge_backend
                else caller
            )
            judge_callers += [
                make_caller(m, cfg.batch_size, cache, execution=cfg.execution)
                for m in cfg.stages.judge.extra_models
            ]
        # None without caps; covers all runs, and the evaluation's calls (its own cache)
        budget = Budget.for_run(
            cfg.budget, cache.path, [run_dir / "eval" / "cache" / "calls.jsonl"]
        )
        for c in (caller, *judge_callers):
            c.budget = budget
        run = _Run(
            cfg,
            run_dir,
            items,
            load_constitution(cfg.constitution_ref()),
            PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None),
            caller,
            judge_callers,
            retry_errors,
            stream or sys.stderr,
            source=found.source,
        )
        base = Manifest.load(run_dir) or Manifest()
        if base.started_at is not None and base.finished_at is None:
            # An earlier run here stopped before it finished (killed, crashed, out of budget).
            base.info["resumed"] = int(base.info.get("resumed", 0)) + 1
        base.start()
        base.info.update(
            {
                "pipeline": cfg.name,
                "config": scrub(cfg.to_dict()),  # no api_key-style option reaches the disk
                "provenance": run.provenance(),
                "prompts": {
                    "read": len(items) + len(dropped),
                    "kept": len(items),
                    "dropped": _count(r["reason"] for r in dropped),
                    "source": found.source,
                },
            }
        )
        base.write(run_dir)
        exports: dict[str, Any] = {}
        described: dict[str, Any] = {}
        try:
            traces = _sl_cai(run, base) if cfg.stages.critique_revise else None
            samples = _sample(run, base) if cfg.stages.sample else None
            if traces is not None:
                exports.update(export_sl_cai(run_dir, traces, cfg.stages.export, base))
            if cfg.stages.contrast is not None:  # RLCD: pairs by construction, judge filters
                exports["preferences"] = contrast_and_export(run, base)
            elif cfg.stages.judge is not None:
                if caller not in judge_callers:
                    # the policy's work is done: free it before a judge model loads (an idle
                    # vLLM engine keeps part of a core busy)
                    described = caller.describe()
                    caller.close()
                exports["preferences"] = _judge_and_export(run, base, traces, samples)
            manifest = Manifest.from_store(run_dir, base=base)
            manifest.info["calls"] = {"policy": caller.stats.to_dict()}
            for n, jc in enumerate(c for c in judge_callers if c is not caller):
                manifest.info["calls"][f"judge-{n + 1}"] = jc.stats.to_dict()
            manifest.info["backend"] = described or caller.describe()
            manifest.finish()
            manifest.write(run_dir)
        finally:
            for s in run.stores:
                s.close()
            cache.close()
            caller.close()
            for jc in judge_callers:
                jc.close()
        post = None
        if cfg.stages.train or cfg.stages.eval:  # the data models are closed: memory is free
            manifest.start()  # not finished until training and evaluation are
            manifest.write(run_dir)
            post = run_post(cfg, run_dir, items, run.stream)
            manifest.info.update(train=post.to_dict()["steps"], eval=post.eval)
            manifest.finish()
            manifest.write(run_dir)
    stats = dict(caller.stats.to_dict())
    for jc in judge_callers:
        if jc is not caller:
            for k, v in jc.stats.to_dict().items():
                stats[k] = stats.get(k, 0) + v
    for k, v in (post.stats if post else {}).items():  # the evaluation's model calls
        stats[k] = stats.get(k, 0) + v
    return RunResult(run_dir, manifest, exports, stats, time.perf_counter() - t0, post)


def _ensemble_record(records: list[dict[str, Any]], jcfg: J.JudgeConfig) -> dict[str, Any]:
    """One judged-pair record from the same pair judged by several models."""
    verdict = J.ensemble([J.Verdict.from_dict(r["verdict"]) for r in records], jcfg)
    rec = {
        **records[0],
        "id": record_id("judge-ensemble", [r["id"] for r in records]),
        "verdict": verdict.to_dict(),
        "status": verdict.status,
    }
    rec.pop("reason", None)
    if verdict.status != "ok":
        rec["reason"] = f"judge error: {verdict.reason or 'unknown'}"
    return rec


def _count(reasons: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return out


def _sl_cai(run: _Run, manifest: Manifest) -> list[dict[str, Any]]:
    """Critique-and-revise every prompt; return the traces in prompt-source order."""
    cfg, stage = run.cfg, run.cfg.stages.critique_revise
    assert stage is not None
    ctx = cai.CritiqueContext(run.constitution, run.book, cfg.system, stage.few_shot, cfg.seed)
    # A trace id covers the prompt and everything that decides its trace before the model
    # speaks; the model's outputs are functions of these, so they need not be part of it.
    key = {
        "constitution": run.constitution.content_hash,
        "templates": cai.template_hashes(run.book),
        "model": run.caller.model,
        "revision": run.caller.revision,
        "seed": cfg.seed,
        "system": cfg.system,
        "stage": dataclasses.asdict(stage),
    }
    ids = {i.id: record_id(TRACE_STAGE, {"prompt": i.messages(), **key}) for i in run.items}
    stores = {n: run.store(n) for n in step_names(stage.rounds)}
    traces = run.store(TRACE_STAGE)
    manifest.set_expected(TRACE_STAGE, len(run.items))
    steps = len(stores)
    done = sum(1 for i in run.items if traces.is_done(ids[i.id]))
    provenance = {
        **{k: v for k, v in run.provenance().items() if k != "prompts"},  # a record has its own
        "params": {
            k: dataclasses.asdict(getattr(stage, k)) for k in ("respond", "critique", "revise")
        },
    }
    with Progress(
        len(run.items) * steps, "critique-revise", "requests", run.stream, initial=done * steps
    ) as progress:
        for start in range(0, len(run.items), WAVE):
            wave = [i for i in run.items[start : start + WAVE] if not traces.is_done(ids[i.id])]
            if wave:
                critique_revise_wave(
                    wave,
                    stage,
                    ctx,
                    run.caller,
                    stores,
                    traces,
                    progress,
                    lambda item: ids[item.id],
                    provenance,
                )
    return [traces.get(ids[i.id]) for i in run.items]


def _sample(run: _Run, manifest: Manifest) -> dict[str, list[str]]:
    """n sampled responses per prompt (RL-CAI); prompt id -> texts, in prompt-source order."""
    cfg = run.cfg
    assert cfg.stages.sample is not None
    params = cfg.stages.sample.params(cfg.seed + 7)
    store = run.store("sample")
    manifest.set_expected("sample", len(run.items))
    out: dict[str, list[str]] = {}
    with Progress(len(run.items), "sample", "prompts", run.stream) as progress:
        for start in range(0, len(run.items), WAVE):
            wave = run.items[start : start + WAVE]
            out.update(sample_wave(wave, params, run.book, cfg.system, run.caller, store, progress))
    return {i.id: out[i.id] for i in run.items if i.id in out}


def _judge_and_export(
    run: _Run,
    manifest: Manifest,
    traces: list[dict[str, Any]] | None,
    samples: dict[str, list[str]] | None,
) -> dict[str, Any]:
    """Judge CAI-SL pairs and sampled pairs, choose what to keep, export preferences."""
    cfg, jstage = run.cfg, run.cfg.stages.judge
    assert jstage is not None and run.judge_callers
    jcfg = J.judge_config(jstage)
    kind = judge_kind(jstage, cfg.resolve_path("."), run.run_dir)
    prompts = {i.id: i.messages() for i in run.items}
    labels = {i.id: i.label for i in run.items}
    pairs: list[PairToJudge] = []
    if traces is not None and jstage.cai_sl:
        pairs += [
            PairToJudge(
                t["prompt_id"],
                t["prompt"],
                t["final_response"],
                t["initial_response"],
                "cai_sl",
                label=labels.get(t["prompt_id"]),
            )
            for t in traces
            if t
            and t["status"] == "ok"
            and t["final_response"].strip() != t["initial_response"].strip()
        ]
    for pid, texts in (samples or {}).items():
        ij, _ = candidate_pairs(texts, "all")
        pairs += [
            PairToJudge(pid, prompts[pid], texts[i], texts[j], "samples", i, j, labels[pid])
            for i, j in ij
        ]
    calibration = calibrate_judges(run, pairs, jcfg, kind)  # configs[n]: judge n's prior removed
    per_model = []
    for n, jc in enumerate(run.judge_callers):
        name = "judge" if n == 0 else f"judge-{n + 1}"
        store = run.store(name)
        manifest.set_expected(name, len(pairs))
        judged: dict[str, dict[str, Any]] = {}
        how = jcfg.mode if kind.kind in ("auto", "ai") else kind.kind
        with Progress(len(pairs), f"{name} ({how})", "pairs", run.stream) as progress:
            for start in range(0, len(pairs), WAVE):
                judged.update(
                    judge_wave(
                        pairs[start : start + WAVE],
                        calibration.configs[n],
                        run.constitution,
                        run.book,
                        cfg.system,
                        cfg.seed,
                        jc,
                        store,
                        progress,
                        kind,
                    )
                )
        per_model.append(
            {(r["source"], r["prompt_id"], r["i"], r["j"]): r for r in judged.values()}
        )
    provenance = {**run.provenance(), **calibration.record(per_model, manifest)}
    by_pair = per_model[0]
    if len(per_model) > 1:  # several judge models: average their verdicts per pair
        by_pair = {
            k: _ensemble_record([m[k] for m in per_model], jcfg)
            for k in by_pair
            if all(k in m for m in per_model)
        }
    records: list[dict[str, Any]] = []
    for t in traces or []:  # CAI-SL: keep a revision only when the judge prefers it
        if not jstage.cai_sl or t is None:
            continue
        rec = by_pair.get(("cai_sl", t["prompt_id"], 0, 1))
        if rec is None:
            reason = (
                f"generation failed: {t.get('reason')}"
                if t["status"] != "ok"
                else "revision identical to initial response"
            )
            records.append(
                {
                    "id": t["id"],
                    "prompt_id": t["prompt_id"],
                    "source": "cai_sl",
                    "status": "skipped",
                    "reason": reason,
                }
            )
            continue
        keep, why = keep_cai_sl_pair(J.Verdict.from_dict(rec["verdict"]), jstage.min_p_revision)
        records.append(rec if keep else {**rec, "status": "skipped", "reason": why})
    if samples is not None:
        records += [
            {
                "id": record_id("no-sample", {"prompt_id": i.id}),
                "prompt_id": i.id,
                "source": "samples",
                "status": "skipped",
                "reason": "sampling failed",
            }
            for i in run.items
            if i.id not in samples
        ]
        sampled = {(pid, i, j): r for (src, pid, i, j), r in by_pair.items() if src == "samples"}
        chosen, none = select_pairs(samples, sampled, jstage.pairs)
        records += chosen
        records += [
            {
                "id": record_id("no-pair", {"prompt_id": pid}),
                "prompt_id": pid,
                "source": "samples",
                "status": "skipped",
                "reason": why,
            }
            for pid, why in none.items()
        ]
    settings = PreferenceExportConfig.from_section(cfg.stages.export.preferences)
    return export_preferences(records, run.run_dir, settings, provenance, manifest)
