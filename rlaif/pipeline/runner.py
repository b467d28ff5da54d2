"""Run a pipeline: prompts -> SL-CAI and/or RL-CAI stages -> records -> datasets.

The runner owns ordering, batching, caching and resume; stages only say what to ask the model.
Prompts go through in waves: each wave runs every step with full batches, and its records are
appended as each backend batch returns. A crash loses at most the batch in flight; re-running
skips every record already on disk and makes no model call for it (the model is not even
loaded when nothing is left to do).

Memory is bounded by a wave, not by the prompt set: prompts are read from their source a wave
at a time (:mod:`rlaif.sources.stream`), each stage reads what it needs of the stage before
from that stage's store, and the preference export reads the judge stage's records back from
the wave ledger (:mod:`rlaif.pipeline.waves`). The ledger also makes a re-run cheap: a wave a
stage finished under the same fingerprint is skipped without rendering a request, and a run
whose waves and export are all finished answers from its manifest.
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
from rlaif.export.sl_cai import export_sl_cai
from rlaif.pipeline.contrast import contrast_and_export
from rlaif.pipeline.gc_tuning import run_gc
from rlaif.pipeline.judge_stage import judge_and_export, sample_params
from rlaif.pipeline.post import PostResult, run_post
from rlaif.pipeline.rl_cai import sample_wave
from rlaif.pipeline.sl_cai import TRACE_STAGE, critique_revise_wave, step_names
from rlaif.pipeline.waves import WAVE, LazyWaves, Ledger, fingerprint
from rlaif.progress import Progress
from rlaif.prompts import PromptBook
from rlaif.sources import PromptItem
from rlaif.sources.stream import PromptStream, open_prompt_stream
from rlaif.stages import critique as cai
from rlaif.stages import judge as J
from rlaif.store import CallCache, Manifest, RunLock, StageStore, record_id
from rlaif.version import __version__

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
    prompts: PromptStream  # scanned: ``count`` prompts, read again a wave at a time
    constitution: Constitution
    book: PromptBook
    caller: ModelCaller
    judge_callers: list[ModelCaller]  # first: the main judge; more: a cross-model ensemble
    retry_errors: bool
    stream: TextIO
    ledger: Ledger
    stores: list[StageStore] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # the prompts' source and revision
    worked: bool = False  # some wave was not finished before this run

    def store(self, stage: str) -> StageStore:
        s = StageStore(self.run_dir, stage, retry_errors=self.retry_errors)
        self.stores.append(s)
        return s

    @property
    def waves(self) -> int:
        return -(-self.prompts.count // WAVE)

    def fingerprint(self, stage: str) -> str:
        """What decides the records of ``stage`` (see :mod:`rlaif.pipeline.waves`)."""
        data = self.cfg.to_dict()
        for key in ("output", "execution", "budget", "name", "batch_size"):
            data.pop(key, None)
        for key in ("export", "train", "eval"):
            data.get("stages", {}).pop(key, None)
        return fingerprint(stage, self.provenance(), data, self.prompts.count)

    def finished(
        self, stage: str, fp: str, w: int, stores: list[StageStore]
    ) -> dict[str, Any] | None:
        """The ledger entry of a wave to skip, or ``None``. An entry is trusted only while the
        stores it vouches for still hold as many records as when it was written (a deleted
        or replaced shard makes the wave checked record by record again)."""
        entry = self.ledger.finished(stage, fp, w, retry_errors=self.retry_errors)
        sizes = entry.get("sizes", {}) if entry else {}
        if entry is not None and any(len(s) < sizes.get(s.stage, 0) for s in stores):
            entry = None
        self.worked = self.worked or entry is None
        return entry

    def finish(self, stage: str, fp: str, w: int, stores: list[StageStore], **data: Any) -> None:
        sizes = {s.stage: len(s) for s in stores}
        self.ledger.finish(stage, fp, w, sizes=sizes, **data)

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
    with RunLock(run_dir), run_gc():
        ledger = Ledger(run_dir)
        try:
            prompts = _scan(open_prompt_stream(cfg), ledger, cfg)
        except BaseException:
            ledger.close()
            raise
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
            prompts,
            load_constitution(cfg.constitution_ref()),
            PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None),
            caller,
            judge_callers,
            retry_errors,
            stream or sys.stderr,
            ledger,
            source=prompts.source,
        )
        base = Manifest.load(run_dir) or Manifest()
        finished_before = base.finished_at is not None
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
                    "read": prompts.count + len(prompts.skipped),
                    "kept": prompts.count,
                    "dropped": _count(r["reason"] for r in prompts.skipped),
                    "source": prompts.source,
                },
            }
        )
        base.write(run_dir)
        exports: dict[str, Any] = {}
        described: dict[str, Any] = {}
        try:
            traces = _sl_cai(run, base) if cfg.stages.critique_revise else None
            if cfg.stages.sample:
                _sample(run, base)
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
                exports["preferences"] = judge_and_export(run, base, traces)
            if run.worked or not finished_before:
                manifest = Manifest.from_store(run_dir, base=base)
            else:  # nothing was left to do: the counts on record are the counts
                manifest = base
            calls = {"policy": caller.stats.to_dict()}
            for n, jc in enumerate(c for c in judge_callers if c is not caller):
                calls[f"judge-{n + 1}"] = jc.stats.to_dict()
            manifest.info["calls"] = calls
            manifest.info["backend"] = described or caller.describe()
            manifest.finish()
            manifest.write(run_dir)
        finally:
            for s in run.stores:
                s.close()
            ledger.close()
            cache.close()
            caller.close()
            for jc in judge_callers:
                jc.close()
        post = None
        if cfg.stages.train or cfg.stages.eval:  # the data models are closed: memory is free
            manifest.start()  # not finished until training and evaluation are
            manifest.write(run_dir)
            post = run_post(cfg, run_dir, prompts, run.stream)
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


def _scan(prompts: PromptStream, ledger: Ledger, cfg: PipelineConfig) -> PromptStream:
    """Count and check the prompts once per source revision and reading settings (the
    ledger keeps the count and the rows left out, so a re-run does not read them again)."""
    fp = fingerprint("prompts", prompts.source, dataclasses.asdict(cfg.prompts))
    entry = ledger.finished("prompts", fp, 0)
    if entry is not None:
        prompts.count, prompts.skipped = entry["count"], entry["skipped"]
        return prompts
    prompts.scan()
    ledger.finish("prompts", fp, 0, count=prompts.count, skipped=prompts.skipped)
    return prompts


def _count(reasons: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return out


class _Traces:
    """The CAI-SL traces of a run in prompt-source order, read from their store a wave at a
    time: re-iterable, what the SL-CAI export and the judge stage read."""

    def __init__(self, run: _Run, key: dict[str, Any], store: StageStore) -> None:
        self.run, self.key, self.store = run, key, store

    def trace_id(self, item: PromptItem) -> str:
        # A trace id covers the prompt and everything that decides its trace before the model
        # speaks; the model's outputs are functions of these, so they need not be part of it.
        return record_id(TRACE_STAGE, {"prompt": item.messages(), **self.key})

    def wave(self, items: list[PromptItem]) -> list[dict[str, Any]]:
        ids = [self.trace_id(i) for i in items]
        found = self.store.get_many(ids)
        return [found.get(rid) for rid in ids]  # type: ignore[misc]

    def __iter__(self) -> Any:
        for items in self.run.prompts.waves(WAVE):
            yield from self.wave(items)


def _sl_cai(run: _Run, manifest: Manifest) -> _Traces:
    """Critique-and-revise every prompt; return the traces (re-iterable, source order)."""
    cfg, stage = run.cfg, run.cfg.stages.critique_revise
    assert stage is not None
    ctx = cai.CritiqueContext(run.constitution, run.book, cfg.system, stage.few_shot, cfg.seed)
    key = {
        "constitution": run.constitution.content_hash,
        "templates": cai.template_hashes(run.book),
        "model": run.caller.model,
        "revision": run.caller.revision,
        "seed": cfg.seed,
        "system": cfg.system,
        "stage": dataclasses.asdict(stage),
    }
    stores = {n: run.store(n) for n in step_names(stage.rounds)}
    traces = _Traces(run, key, run.store(TRACE_STAGE))
    manifest.set_expected(TRACE_STAGE, run.prompts.count)
    steps = len(stores)
    provenance = {
        **{k: v for k, v in run.provenance().items() if k != "prompts"},  # a record has its own
        "params": {
            k: dataclasses.asdict(getattr(stage, k)) for k in ("respond", "critique", "revise")
        },
    }
    fp = run.fingerprint(TRACE_STAGE)
    written = [*stores.values(), traces.store]
    waves = LazyWaves(run.prompts)
    with Progress(run.prompts.count * steps, "critique-revise", "requests", run.stream) as progress:
        for w in range(run.waves):
            if (entry := run.finished(TRACE_STAGE, fp, w, written)) is not None:
                progress.update(entry["prompts"] * steps)
                continue
            items = waves.get(w)
            ids = [traces.trace_id(i) for i in items]
            finished = traces.store.done_many(ids)
            wave = [i for i, rid in zip(items, ids, strict=True) if rid not in finished]
            progress.update((len(items) - len(wave)) * steps)
            if wave:
                critique_revise_wave(wave, stage, ctx, run.caller, stores, traces.store,
                                     progress, traces.trace_id, provenance)  # fmt: skip
            errors = sum(1 for t in traces.wave(items) if t is None or t["status"] != "ok")
            run.finish(TRACE_STAGE, fp, w, written, errors=errors, prompts=len(items))
    return traces


def _sample(run: _Run, manifest: Manifest) -> None:
    """n sampled responses per prompt (RL-CAI), into the ``sample`` store."""
    cfg, params = run.cfg, sample_params(run.cfg)
    store = run.store("sample")
    manifest.set_expected("sample", run.prompts.count)
    fp = run.fingerprint("sample")
    waves = LazyWaves(run.prompts)
    with Progress(run.prompts.count, "sample", "prompts", run.stream) as progress:
        for w in range(run.waves):
            if (entry := run.finished("sample", fp, w, [store])) is not None:
                progress.update(entry["prompts"])
                continue
            wave = waves.get(w)
            out = sample_wave(wave, params, run.book, cfg.system, run.caller, store, progress)
            run.finish("sample", fp, w, [store], errors=len(wave) - len(out), prompts=len(wave))
