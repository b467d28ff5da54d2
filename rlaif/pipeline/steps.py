"""One step of a stage over many prompts: records first, then the cache, then the model.

Shared by the SL-CAI and RL-CAI waves. A step record's id is the content hash of what the
model sees (messages, sampling params, template hash, model and revision), so a resumed run
finds it, and any change that alters the model's input makes new work.
"""

from __future__ import annotations

from typing import Any

from rlaif.calls.caller import GenRequest, GenResult, ModelCaller
from rlaif.progress import Progress
from rlaif.store import StageStore, record_id


def step_id(name: str, req: GenRequest, caller: ModelCaller) -> str:
    return record_id(
        name,
        {
            "messages": req.messages_json,  # encoded once, for this id and the cache key
            "params": req.params.to_dict(),
            "template_hash": req.template_hash,
            "model": caller.model,
            "revision": caller.revision,
        },
    )


def recorded(
    name: str, requests: dict[str, GenRequest], store: StageStore, caller: ModelCaller
) -> dict[str, dict[str, Any]]:
    """The ok records :func:`run_gen_step` wrote for ``requests`` (same keys; requests that
    failed or never ran are absent), read from the store only: the model is never called (it
    may be closed already)."""
    ids = {k: step_id(name, req, caller) for k, req in requests.items()}
    found = store.get_many(ids.values())
    return {k: found[rid] for k, rid in ids.items() if found.get(rid, {}).get("status") == "ok"}


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
    found = store.get_many(ids.values(), done_only=True)  # one index query per batch of ids
    done: dict[str, dict[str, Any]] = {k: found[ids[k]] for k in keys if ids[k] in found}
    if done:
        progress.update(len(done))
    if len(done) == len(keys):
        # Nothing left: no call at all. Records copied from another step (samples_from) are
        # done without being in this step's call cache; sending them would draw them again.
        return done

    def save(indices: list[int], results: list[GenResult]) -> None:
        new = [(keys[i], r) for i, r in zip(indices, results, strict=True) if keys[i] not in done]
        records = [_record(ids[k], k, name, requests[k], res, extra) for k, res in new]
        store.append(records)
        for rec in records:
            done[rec["prompt_id"]] = rec
        fresh = [r for _, r in new if not r.cached]
        progress.update(
            len(records), tokens=sum(c.completion_tokens for r in fresh for c in r.completions)
        )

    # Every request goes to the caller, done ones too (answered from the cache): it cuts its
    # batches from all of them, so a resumed run computes each request in the batch an
    # uninterrupted run gave it (results of some backends depend on the batch).
    results = caller.generate([requests[k] for k in keys], on_batch=save)
    # Cache hits never reach on_batch: save them here (one fsynced append).
    hits = [i for i, r in enumerate(results) if r.cached and keys[i] not in done]
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
