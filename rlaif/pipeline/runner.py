"""Run a pipeline: prompts -> critique-and-revise -> records -> datasets, resumable at any time.

The runner owns ordering, batching, caching and resume; stages only say what to ask the model.
Prompts are processed in chunks (waves): each chunk goes through every step of the stage
with full batches, then its traces are written. A crash loses at most the batch in flight;
re-running skips every record already on disk and makes no model call for it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rlaif import __version__
from rlaif.backends import load_backend
from rlaif.backends.base import Backend, SamplingParams
from rlaif.constitution import load_constitution
from rlaif.errors import ConfigError
from rlaif.pipeline.calls import GenRequest, GenResult, ModelCaller
from rlaif.pipeline.config import PipelineConfig
from rlaif.pipeline.sources import PromptItem, read_prompts
from rlaif.progress import Progress
from rlaif.prompts import PromptBook
from rlaif.stages import critique as cai
from rlaif.store import CallCache, Manifest, RunLock, StageStore, record_id

log = logging.getLogger(__name__)

TRACE_STAGE = "critique_revise"
CHUNK = 512  # prompts per wave: bounds memory, keeps batches full


@dataclass
class RunResult:
    run_dir: Path
    manifest: Manifest
    exports: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _step_stores(run_dir: Path, rounds: int, retry_errors: bool) -> dict[str, StageStore]:
    names = ["respond"] + [f"{s}-{r}" for r in range(1, rounds + 1) for s in ("critique", "revise")]
    return {n: StageStore(run_dir, n, retry_errors=retry_errors) for n in names}


def run_pipeline(
    cfg: PipelineConfig,
    *,
    out: str | Path | None = None,
    backend: Backend | None = None,
    retry_errors: bool = False,
    stream: TextIO | None = None,
) -> RunResult:
    """Run (or resume) a pipeline and export its datasets.

    Args:
        cfg: the validated pipeline config.
        out: run directory (default: ``cfg.output`` relative to the working directory).
        backend: a ready backend to use instead of the one the config names (tests, benches).
        retry_errors: redo requests that failed in an earlier run.
        stream: where progress goes (default stderr).
    """
    from rlaif.export import export_sl_cai  # import here: export pulls in `datasets`

    t0 = time.perf_counter()
    stream = stream or sys.stderr
    run_dir = Path(out or cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        constitution = load_constitution(cfg.constitution_ref())
        book = PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None)
        p = cfg.prompts
        items, dropped = read_prompts(
            cfg.resolve_path(p.path),
            fmt=p.format,
            field=p.field,
            id_field=p.id_field,
            split=p.split,
            offset=p.offset,
            limit=p.limit,
        )
        stage = cfg.stages.critique_revise
        if stage is None:
            raise ConfigError("the pipeline has no stages to run", file=cfg.path, field="stages")
        model_id, revision, factory = _backend_factory(cfg, backend)
        cache = CallCache(run_dir / "cache" / "calls.jsonl")
        caller = ModelCaller(
            factory, model=model_id, revision=revision, cache=cache, batch_size=cfg.batch_size
        )
        ctx = cai.CritiqueContext(constitution, book, cfg.system, stage.few_shot, cfg.seed)
        run_key = {
            "constitution": constitution.content_hash,
            "templates": cai.template_hashes(book),
            "model": model_id,
            "revision": revision,
            "seed": cfg.seed,
            "system": cfg.system,
            "stage": dataclasses.asdict(stage),
        }
        base = Manifest.load(run_dir) or Manifest()
        base.start()
        base.info.update(
            {
                "pipeline": cfg.name,
                "config": cfg.to_dict(),
                "constitution": constitution.provenance(),
                "templates": cai.template_hashes(book),
                "model": {"id": model_id, "revision": revision, "backend": cfg.model.backend},
                "seed": cfg.seed,
                "rlaif_version": __version__,
                "prompts": {
                    "read": len(items) + len(dropped),
                    "kept": len(items),
                    "dropped": _count_reasons(dropped),
                },
            }
        )
        base.set_expected(TRACE_STAGE, len(items))
        base.write(run_dir)
        stores = _step_stores(run_dir, stage.rounds, retry_errors)
        traces = StageStore(run_dir, TRACE_STAGE, retry_errors=retry_errors)
        try:
            steps = 1 + 2 * stage.rounds
            finished = sum(1 for i in items if traces.is_done(_trace_id(i, run_key)))
            progress = Progress(
                total=len(items) * steps,
                desc="critique-revise",
                unit="requests",
                stream=stream,
                initial=finished * steps,
            )
            with progress:
                for start in range(0, len(items), CHUNK):
                    chunk = [
                        i
                        for i in items[start : start + CHUNK]
                        if not traces.is_done(_trace_id(i, run_key))
                    ]
                    if chunk:
                        _run_chunk(chunk, cfg, ctx, caller, stores, traces, progress, run_key)
            manifest = Manifest.from_store(run_dir, base=base)
            manifest.info["calls"] = caller.stats.to_dict()
            manifest.info["backend"] = caller.describe()
            exports = export_sl_cai(
                run_dir,
                traces,
                cfg.stages.export,
                manifest,
                order=[_trace_id(i, run_key) for i in items],
            )
            manifest.finish()
            manifest.write(run_dir)
        finally:
            for s in (*stores.values(), traces):
                s.close()
            cache.close()
            caller.close()
    return RunResult(run_dir, manifest, exports, caller.stats.to_dict(), time.perf_counter() - t0)


def _count_reasons(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["reason"]] = out.get(r["reason"], 0) + 1
    return out


def _backend_factory(
    cfg: PipelineConfig, backend: Backend | None
) -> tuple[str, str | None, Callable[[], Backend]]:
    """Model id and revision for cache keys, and a factory that loads the backend lazily."""
    if backend is not None:
        return backend.model_id, backend.model_revision, lambda: backend
    m = cfg.model
    if m.backend == "fake":
        return m.id, None, lambda: load_backend("fake", m.id, **m.options)
    from rlaif.backends import resolve_model

    resolved = resolve_model(m.id, revision=m.revision, trust_remote_code=m.trust_remote_code)
    options = dict(m.options)
    options.setdefault("batch_size", cfg.batch_size) if m.backend == "transformers" else None

    def make() -> Backend:
        return load_backend(
            m.backend, m.id, revision=m.revision, trust_remote_code=m.trust_remote_code, **options
        )

    return resolved.model_id, resolved.revision, make


def _trace_id(item: PromptItem, run_key: dict[str, Any]) -> str:
    # The prompt plus everything that decides its trace before the model speaks (constitution
    # and template content, model and revision, seed, stage settings); the model's outputs are
    # functions of these, so they need not be part of the id.
    return record_id(TRACE_STAGE, {"prompt": item.messages(), **run_key})


def _run_step(
    name: str,
    requests: dict[str, GenRequest],
    store: StageStore,
    caller: ModelCaller,
    progress: Progress,
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run one step for many prompts; return prompt id -> step record (ok or error)."""
    pids = list(requests)
    ids = {
        pid: record_id(
            name,
            {
                "messages": requests[pid].messages,
                "params": requests[pid].params.to_dict(),
                "template_hash": requests[pid].template_hash,
                "model": caller.model,
                "revision": caller.revision,
            },
        )
        for pid in pids
    }
    done: dict[str, dict[str, Any]] = {}
    pending = []
    for pid in pids:
        rec = store.get(ids[pid]) if store.is_done(ids[pid]) else None
        if rec is not None:
            done[pid] = rec
        else:
            pending.append(pid)
    if done:
        progress.update(len(done))

    def save(indices: list[int], results: list[GenResult]) -> None:
        records = []
        for i, res in zip(indices, results, strict=True):
            pid = pending[i]
            records.append(_step_record(ids[pid], pid, name, requests[pid], res, extra))
        store.append(records)
        for rec in records:
            done[rec["prompt_id"]] = rec
        fresh = [r for i, r in zip(indices, results, strict=True) if not r.cached]
        progress.update(
            len(records), tokens=sum(c.completion_tokens for r in fresh for c in r.completions)
        )

    results = caller.generate([requests[pid] for pid in pending], on_batch=save)
    # Cache hits never reach on_batch: save them here (a cheap, fsynced append).
    hits = [(i, r) for i, r in enumerate(results) if r.cached and pending[i] not in done]
    if hits:
        save([i for i, _ in hits], [r for _, r in hits])
    return done


def _step_record(
    rid: str,
    pid: str,
    name: str,
    req: GenRequest,
    res: GenResult,
    extra: dict[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": rid,
        "prompt_id": pid,
        "step": name,
        "template_hash": req.template_hash,
        "params": req.params.to_dict(),
    }
    if extra and pid in extra:
        rec.update(extra[pid])
    if res.ok:
        comp = res.completions[0]
        rec.update(
            status="ok",
            text=comp.text,
            finish_reason=comp.finish_reason,
            prompt_tokens=comp.prompt_tokens,
            completion_tokens=comp.completion_tokens,
        )
    else:
        rec.update(status="error", reason=res.error)
    return rec


def _run_chunk(
    chunk: list[PromptItem],
    cfg: PipelineConfig,
    ctx: cai.CritiqueContext,
    caller: ModelCaller,
    stores: dict[str, StageStore],
    traces: StageStore,
    progress: Progress,
    run_key: dict[str, Any],
) -> None:
    stage = cfg.stages.critique_revise
    assert stage is not None
    convs = {i.id: i.messages() for i in chunk}
    start_n = progress.n
    seed = cfg.seed

    def params(step_cfg: Any, salt: int) -> SamplingParams:
        return step_cfg.params(seed + salt)

    resp = _run_step(
        "respond",
        {pid: cai.respond_request(ctx, c, params(stage.respond, 0)) for pid, c in convs.items()},
        stores["respond"],
        caller,
        progress,
    )
    current = {pid: cai.clean(r["text"]) for pid, r in resp.items() if r["status"] == "ok"}
    rounds: dict[str, list[dict[str, Any]]] = {pid: [] for pid in convs}
    failed: dict[str, str] = {
        pid: f"respond: {r.get('reason')}" for pid, r in resp.items() if r["status"] != "ok"
    }
    for r in range(1, stage.rounds + 1):
        alive = [pid for pid in convs if pid not in failed]
        princ = {pid: cai.principle_for(ctx, pid, r) for pid in alive}
        crit = _run_step(
            f"critique-{r}",
            {
                pid: cai.critique_request(
                    ctx, convs[pid], current[pid], princ[pid], params(stage.critique, 1000 * r + 1)
                )
                for pid in alive
            },
            stores[f"critique-{r}"],
            caller,
            progress,
            extra={pid: {"principle_id": princ[pid].id} for pid in alive},
        )
        for pid, rec in crit.items():
            if rec["status"] != "ok":
                failed[pid] = f"critique-{r}: {rec.get('reason')}"
        alive = [pid for pid in alive if pid not in failed]
        rev = _run_step(
            f"revise-{r}",
            {
                pid: cai.revise_request(
                    ctx,
                    convs[pid],
                    current[pid],
                    princ[pid],
                    cai.clean(crit[pid]["text"]),
                    params(stage.revise, 1000 * r + 2),
                )
                for pid in alive
            },
            stores[f"revise-{r}"],
            caller,
            progress,
            extra={pid: {"principle_id": princ[pid].id} for pid in alive},
        )
        for pid in alive:
            rec = rev[pid]
            if rec["status"] != "ok":
                failed[pid] = f"revise-{r}: {rec.get('reason')}"
                continue
            revision = cai.clean(rec["text"])
            rounds[pid].append(
                {
                    "round": r,
                    "principle_id": princ[pid].id,
                    "critique_request": princ[pid].critique,
                    "critique": cai.clean(crit[pid]["text"]),
                    "revision_request": princ[pid].revision,
                    "revision": revision,
                    "response": current[pid],
                }
            )
            current[pid] = revision
    provenance = {
        "constitution": ctx.constitution.provenance(),
        "templates": cai.template_hashes(ctx.book),
        "model": caller.model,
        "model_revision": caller.revision,
        "backend": cfg.model.backend,
        "params": {
            k: v
            for k, v in dataclasses.asdict(stage).items()
            if k in ("respond", "critique", "revise")
        },
        "seed": cfg.seed,
        "rlaif_version": __version__,
    }
    records = []
    for item in chunk:
        pid = item.id
        rec: dict[str, Any] = {
            "id": _trace_id(item, run_key),
            "prompt_id": pid,
            "prompt": convs[pid],
            "provenance": provenance,
        }
        if pid in failed:
            rec.update(status="error", reason=failed[pid])
        else:
            rec.update(
                status="ok",
                initial_response=cai.clean(resp[pid]["text"]),
                rounds=rounds[pid],
                final_response=current[pid],
                principle_ids=[x["principle_id"] for x in rounds[pid]],
            )
        records.append(rec)
    traces.append(records)
    # Prompts that failed part-way never make their later requests: count them as done.
    progress.update(max(0, start_n + len(chunk) * (1 + 2 * stage.rounds) - progress.n))
