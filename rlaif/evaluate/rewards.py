"""Reward-model scores for evaluation, cached so a repeated evaluation loads no model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlaif.errors import ModelError


def reward_fn_for(folder: str, cache_path: Path) -> tuple[Callable, dict[str, Any]]:
    """A cached reward scorer over (conversation, response) pairs, and its provenance.

    The model loads only when a score is missing from the cache.
    """
    from rlaif.backends import resolve_model
    from rlaif.store import CallCache, content_hash

    try:
        revision = resolve_model(folder).revision
    except ModelError:
        revision = None
    info = {"model": folder, "revision": revision}
    loaded: list[Any] = []

    def score(pairs: list[tuple[list[dict[str, str]], str]]) -> list[float]:
        from rlaif.train.online import load_reward_model
        from rlaif.train.reward import reward_scores, reward_text

        cache = CallCache(cache_path)
        try:
            keys = [content_hash(["reward", folder, revision, c, r]) for c, r in pairs]
            todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
            if todo:
                if not loaded:
                    loaded.extend(load_reward_model(folder))
                model, tok = loaded
                texts = [
                    reward_text(tok, pairs[i][0], [{"role": "assistant", "content": pairs[i][1]}])
                    for i in todo
                ]
                new = reward_scores(model, tok, texts)
                cache.put_many({keys[i]: {"score": s} for i, s in zip(todo, new, strict=True)})
            return [float(cache.get(k)["score"]) for k in keys]
        finally:
            cache.close()

    return score, info
