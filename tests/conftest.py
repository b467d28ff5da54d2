"""Shared fixtures: a tiny local chat model and a fake backend. Nothing here uses the network."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests never reach for the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

from rlaif.backends.fake import FakeBackend
from rlaif.testing import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama chat model (ChatML template, 256-token context), built once."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def fake_backend() -> FakeBackend:
    """A fresh fake backend per test, so call counts start at zero (it costs microseconds)."""
    return FakeBackend()
