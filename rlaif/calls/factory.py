"""Make the :class:`~rlaif.calls.caller.ModelCaller` for a model section of a pipeline.

The backend is built lazily (only when a request misses the run's records and cache), in this
process or on a pool of Ray workers; the model id and revision that cache keys and records
carry are resolved here without loading any weights.
"""

from __future__ import annotations

from rlaif.backends import load_backend
from rlaif.backends.base import Backend
from rlaif.calls.caller import ModelCaller
from rlaif.config.schema import ExecutionConfig, ModelConfig
from rlaif.store import CallCache


def make_caller(
    m: ModelConfig,
    batch_size: int,
    cache: CallCache,
    backend: Backend | None = None,
    execution: ExecutionConfig | None = None,
    name: str | None = None,
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
        name: what cache keys and records call the model instead of ``m.id`` (a model an
            earlier pipeline step trained is ``step:<name>``, wherever its run dir lies;
            its revision is the hash of its weights either way).
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
        model_id, revision = name or resolved.model_id, resolved.revision
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
