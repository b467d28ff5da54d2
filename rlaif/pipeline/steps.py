"""One step of a stage over many prompts: records first, then the cache, then the model.

Shared by the SL-CAI and RL-CAI stages. A step record's id is the content hash of what the
model sees (messages, sampling params, template hash, model and revision), so a resumed run
finds it, and any change that alters the model's input makes new work.
"""

from __future__ import annotations

from typing import Any

from rlaif.backends import load_backend
from rlaif.backends.base import Backend
from rlaif.pipeline.calls import GenRequest, GenResult, ModelCaller
from rlaif.pipeline.config import ExecutionConfig, ModelConfig
from rlaif.progress import Progress
from rlaif.store import CallCache, StageStore, record_id


def make_caller(
    m: ModelConfig,
    batch_size: int,
    cache: CallCache,
    backend: Backend | None = None,
    execution: ExecutionConfig | None = None,
) -> ModelCaller:
    """A :class:`ModelCaller` whose backend is loaded only when a request misses the cache.

    The model id and revision for cache keys come from resolving the model (cheap: no
    weights are loaded), so a finished run re-runs without loading anything.

    Args:
        m: the model.
        batch_size: requests per backend call (per worker in Ray mode).
        cache: the run's call cache.
        backend: a ready backend to use instead of building one from ``m``.
        execution: ``mode: ray`` runs the model on a pool of Ray workers
            (:class:`~rlaif.backends.ray_backend.RayBackend`); each call then carries
            ``workers`` x the per-worker batch. Cache keys and records do not change.
    """
    if backend is not None:
        return ModelCaller(
            lambda: backend,
            model=backend.model_id,
            revision=backend.model_revision,
            cache=cache,
            batch_size=batch_size,
        )
    ray = execution if execution is not None and execution.mode == "ray" else None
    per_call = batch_size
    if ray is not None:
        batch_size = ray.batch_size or batch_size
        per_call = batch_size * ray.workers
    kind = m.backend
    if kind == "auto":  # load_pipeline resolves it; a config built in Python may not be
        from rlaif.backends import auto_backend_kind

        kind = auto_backend_kind()
    if kind == "fake":
        model_id, revision = m.id, None
        options = dict(m.options)
    elif kind == "openai":
        # The server holds the model: nothing to resolve locally. The revision in cache keys
        # and records is what the user declares (model.revision); a server does not say.
        model_id, revision = m.id, m.revision
        options = {"revision": m.revision, **m.options}
    else:
        from rlaif.backends import resolve_model

        resolved = resolve_model(m.id, revision=m.revision, trust_remote_code=m.trust_remote_code)
        model_id, revision = resolved.model_id, resolved.revision
        options = {"revision": m.revision, "trust_remote_code": m.trust_remote_code, **m.options}
        if kind == "transformers":
            options.setdefault("batch_size", batch_size)

    def factory() -> Backend:
        if ray is None:
            return load_backend(kind, m.id, **options)
        from rlaif.backends.ray_backend import RayBackend

        return RayBackend(
            kind,
            m.id,
            options=options,
            workers=ray.workers,
            batch_size=batch_size,
            address=ray.address,
            num_cpus_per_worker=ray.num_cpus_per_worker,
            num_gpus_per_worker=ray.num_gpus_per_worker,
            start_timeout=ray.start_timeout,
            model_id=model_id,
            model_revision=revision,
        )

    return ModelCaller(factory, model=model_id, revision=revision, cache=cache, batch_size=per_call)


def step_id(name: str, req: GenRequest, caller: ModelCaller) -> str:
    return record_id(
        name,
        {
            "messages": req.messages,
            "params": req.params.to_dict(),
            "template_hash": req.template_hash,
            "model": caller.model,
            "revision": caller.revision,
        },
    )


def run_gen_step(
    name: str,
    requests: dict[str, GenRequest],
    store: StageStore,
    caller: ModelCaller,
    progress: Progress,
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run one generation step; return key (prompt id) -> step record (ok or error).

    Records already on disk are reused; the rest go through the caller, and each backend batch
    is appended (one fsync) as soon as it returns. A record holds ``text`` (the first
    completion) and, when ``n > 1``, ``texts`` (all of them).
    """
    keys = list(requests)
    ids = {k: step_id(name, requests[k], caller) for k in keys}
    done: dict[str, dict[str, Any]] = {}
    pending = []
    for k in keys:
        rec = store.get(ids[k]) if store.is_done(ids[k]) else None
        if rec is not None:
            done[k] = rec
        else:
            pending.append(k)
    if done:
        progress.update(len(done))

    def save(indices: list[int], results: list[GenResult]) -> None:
        records = [
            _record(ids[pending[i]], pending[i], name, requests[pending[i]], res, extra)
            for i, res in zip(indices, results, strict=True)
        ]
        store.append(records)
        for rec in records:
            done[rec["prompt_id"]] = rec
        fresh = [r for r in results if not r.cached]
        progress.update(
            len(records), tokens=sum(c.completion_tokens for r in fresh for c in r.completions)
        )

    results = caller.generate([requests[k] for k in pending], on_batch=save)
    # Cache hits never reach on_batch: save them here (one fsynced append).
    hits = [i for i, r in enumerate(results) if r.cached and pending[i] not in done]
    if hits:
        save(hits, [results[i] for i in hits])
    return done


def _record(
    rid: str,
    key: str,
    name: str,
    req: GenRequest,
    res: GenResult,
    extra: dict[str, dict[str, Any]] | None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": rid,
        "prompt_id": key,
        "step": name,
        "template_hash": req.template_hash,
        "params": req.params.to_dict(),
    }
    if extra and key in extra:
        rec.update(extra[key])
    if not res.ok:
        rec.update(status="error", reason=res.error)
        return rec
    comp = res.completions[0]
    rec.update(
        status="ok",
        text=comp.text,
        finish_reason=comp.finish_reason,
        prompt_tokens=comp.prompt_tokens,
        completion_tokens=sum(c.completion_tokens for c in res.completions),
    )
    if len(res.completions) > 1:
        rec["texts"] = [c.text for c in res.completions]
        rec["finish_reasons"] = [c.finish_reason for c in res.completions]
    return rec
