"""Prompts from a Hugging Face Hub dataset by name, or from a local folder laid out as one.

Both go through ``datasets.load_dataset_builder``, so a Hub repository and its downloaded
copy read the same way: the README's ``configs:`` front matter names the subsets and splits,
``data_files`` globs pick files, and ``streaming`` iterates the data files batch by batch
instead of writing the whole set to the datasets cache first (memory stays flat, and a
``limit`` stops reading once it is reached).

The revision that was read is resolved once and recorded: the commit sha the Hub (or the
datasets cache) resolved, or ``sha256:<hash>`` of the data files for a local folder.

A Hub name is checked with one short request before ``datasets`` is called, so an unknown
name, or a machine without network, fails at once with one line that names the dataset and
says how to point at a local copy, instead of after ``datasets``' retries (half a minute).
With ``HF_HUB_OFFLINE`` set, or when the Hub cannot be reached, only the datasets cache is
read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.errors import DataError

PROBE_TIMEOUT = 10.0  # seconds for the one request that resolves a Hub name
BATCH = 1024  # rows per batch read from a dataset
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SHA = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "ON", "YES", "TRUE")
# A save_to_disk folder has one of these; a folder with a README, a data/ folder or data
# files is read as a dataset repository.
SAVED_MARKERS = ("dataset_dict.json", "state.json")
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".arrow", ".txt", ".gz", ".zst")
_RESOLVED: dict[str, ResolvedDataset] = {}  # Hub datasets by spec: one commit per process


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset prompt source, as configured.

    Attributes:
        name: the dataset as written (a Hub id or a folder), for messages and provenance.
        target: what ``datasets`` gets: the Hub id, or the folder's absolute path.
        local: whether ``target`` is a local folder.
        config: the subset (the repository's config name); None: its default.
        split: None: ``train`` when there is one, else the first split.
        revision: a Hub branch, tag or commit.
        data_files: globs (a list, or ``{split: globs}``), relative to ``target``.
        streaming: iterate the data files instead of preparing the whole set first.
    """

    name: str
    target: str
    local: bool
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    data_files: str | list[str] | dict[str, list[str]] | None = None
    streaming: bool = False


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a ``save_to_disk`` folder (read by ``load_from_disk``)."""
    return any((path / m).is_file() for m in SAVED_MARKERS)


def is_dataset_repo(path: Path) -> bool:
    """Whether the folder ``path`` looks like a dataset repository: not a ``save_to_disk``
    folder, and a README, a ``data/`` folder or data files at its top (so that a stray
    ``path: /`` is not globbed through for data files)."""
    if is_saved_dataset(path) or not path.is_dir():
        return False
    if (path / "README.md").is_file() or (path / "data").is_dir():
        return True
    return any(f.suffix in DATA_SUFFIXES and f.is_file() for f in path.iterdir())


def normalize_data_files(value: Any) -> str | list[str] | dict[str, list[str]] | None:
    """``data_files`` as plain types: a glob, a list of globs, or ``{split: [globs]}``.

    Raises:
        DataError: any other shape (``field`` is ``prompts.data_files``).
    """
    bad = DataError(
        "must be a glob, a list of globs, or {split: globs}", field="prompts.data_files"
    )
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        if not value or not all(isinstance(g, str) and g for g in value):
            raise bad
        return [str(g) for g in value]
    if isinstance(value, dict) and value:
        out: dict[str, list[str]] = {}
        for split, globs in value.items():
            globs = [globs] if isinstance(globs, str) else globs
            if not isinstance(globs, list) or not globs:
                raise bad
            if not all(isinstance(g, str) and g for g in globs):
                raise bad
            out[str(split)] = [str(g) for g in globs]
        return out
    raise bad


def offline() -> bool:
    """Whether the environment asks for no Hub requests (``HF_HUB_OFFLINE`` and friends)."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(k, "").upper() in _TRUE for k in keys)


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` read their offline switch once, at import; this
    turns it on for one call, so the datasets cache answers without a network retry."""
    import datasets.config as dc
    import huggingface_hub.constants as hc

    saved = dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE
    dc.HF_HUB_OFFLINE = hc.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dc.HF_HUB_OFFLINE, hc.HF_HUB_OFFLINE = saved


def _local_copy_hint(name: str) -> str:
    return (
        f"download it where there is network (hf download {name} --repo-type dataset "
        "--local-dir DIR) and set prompts.dataset: DIR, or set HF_DATASETS_CACHE to a "
        "datasets cache that holds it"
    )


def probe_hub(name: str, revision: str | None) -> str | None:
    """The commit sha the Hub resolves ``name`` at ``revision`` to, with one short request;
    None when the Hub cannot be reached (the datasets cache is then the only source).

    Raises:
        DataError: the Hub says the dataset, or the revision, does not exist, or is gated.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().dataset_info(name, revision=revision, timeout=PROBE_TIMEOUT)
    except GatedRepoError:
        raise DataError(
            f"dataset '{name}' is gated on the Hugging Face Hub: accept its terms on its page "
            f"and set HF_TOKEN, or {_local_copy_hint(name)}",
            field="prompts.dataset",
        ) from None
    except RevisionNotFoundError:
        raise DataError(
            f"dataset '{name}' has no revision '{revision}' on the Hugging Face Hub",
            field="prompts.revision",
        ) from None
    except RepositoryNotFoundError:
        raise DataError(
            f"dataset '{name}' is not on the Hugging Face Hub (check the name; set HF_TOKEN "
            "for a private one) and is no local folder; for a local copy set "
            "prompts.dataset: /path/to/the/folder",
            field="prompts.dataset",
        ) from None
    except Exception:  # no network, DNS, proxy, timeout, 5xx: the cache decides
        return None
    return info.sha


def dataset_spec(p: Any, resolve: Callable[[str], Path]) -> DatasetSpec | None:
    """The dataset a pipeline's ``prompts:`` section names, or None for a prompt file.

    A dataset is ``prompts.dataset`` (a folder relative to the pipeline file when one is
    there, else a Hub id), ``prompts.data_files`` alone (globs relative to the pipeline
    file), or a ``prompts.path`` folder laid out as a dataset (:func:`is_dataset_repo`).

    Args:
        p: the :class:`~rlaif.config.schema.PromptSourceConfig`.
        resolve: turns a configured path into a path (relative to the pipeline file).

    Raises:
        DataError: options that do not fit together, naming the field.
    """
    files = normalize_data_files(p.data_files)
    if p.dataset and p.path:
        raise DataError("set prompts.path or prompts.dataset, not both", field="prompts.dataset")
    name, target, local = p.dataset or p.path, "", True
    if p.dataset:
        folder = resolve(p.dataset)
        if folder.is_dir():
            target = str(folder.resolve())
        elif _REPO_ID.fullmatch(p.dataset) and not p.dataset.startswith((".", "~")):
            target, local = p.dataset, False
        else:
            raise DataError(f"no dataset folder at {folder}", field="prompts.dataset")
    elif p.path:
        folder = resolve(p.path)
        if p.format == "auto" and is_dataset_repo(folder):
            target = str(folder.resolve())
    elif files is not None:
        name, target = "data_files", str(resolve(".").resolve())
    if not target:  # a prompt file (or a save_to_disk folder): dataset options do not apply
        for key in ("config", "revision", "data_files"):
            if getattr(p, key) is not None:
                raise DataError(f"applies to a dataset (prompts.dataset), not to a file "
                                f"({p.path})", field=f"prompts.{key}")  # fmt: skip
        if p.streaming:
            raise DataError(f"applies to a dataset (prompts.dataset), not to a file ({p.path})",
                            field="prompts.streaming")  # fmt: skip
        return None
    if local and p.revision is not None:
        raise DataError(
            "a revision applies to a Hub dataset; a local folder is recorded by the hash of "
            "its data files",
            field="prompts.revision",
        )
    return DatasetSpec(name, target, local, p.config, p.split, p.revision, files, p.streaming)


@dataclass
class ResolvedDataset:
    """A dataset whose builder, split and revision are known; :meth:`rows` reads it."""

    spec: DatasetSpec
    builder: Any
    split: str
    hub_revision: str | None = None  # the commit sha the Hub (or the datasets cache) resolved
    cached: bool = False  # the Hub was not reached: read from the datasets cache

    @functools.cached_property
    def revision(self) -> str | None:
        """The Hub commit sha, or ``sha256:<hash>`` of a local folder's files (hashed on
        first use: a pipeline check does not read a large local copy)."""
        if not self.spec.local:
            return self.hub_revision
        files = (self.builder.config.data_files or {}).get(self.split, [])
        return _content_revision(self.spec, [str(f) for f in files])

    @property
    def label(self) -> str:
        """The dataset in messages: ``name [config/split]``."""
        return f"{self.spec.name} [{self.builder.config.name}/{self.split}]"

    def provenance(self) -> dict[str, Any]:
        """What the manifest and the dataset card record about the prompts' source."""
        s = self.spec
        return {
            "dataset": s.name,
            "hub": not s.local,
            "config": self.builder.config.name,
            "split": self.split,
            "revision": self.revision,
            "requested_revision": s.revision,
            "data_files": s.data_files,
            "streaming": s.streaming,
            **({"from_cache": True} if self.cached else {}),
        }

    def rows(self, offset: int, columns: list[str]) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(row number, row)`` from row ``offset`` (0-based) on; row numbers are 1-based.

        Only ``columns`` are read when the dataset's columns are known up front; a missing
        one is a :class:`DataError` listing the columns there are.
        """
        try:
            if self.spec.streaming:
                ds = self.builder.as_streaming_dataset(split=self.split)
            else:
                with _offline_mode() if self.cached else contextlib.nullcontext():
                    self.builder.download_and_prepare()
                ds = self.builder.as_dataset(split=self.split)
            names = ds.column_names
            if names is not None:
                missing = [c for c in columns if c not in names]
                if missing:
                    raise DataError(
                        f"no column '{missing[0]}' (columns: {', '.join(names) or 'none'}); "
                        f"set prompts.field", file=self.label, field=missing[0],
                    )  # fmt: skip
                ds = ds.select_columns(columns)
            if offset and self.spec.streaming:
                ds = ds.skip(offset)
            elif offset:  # Dataset.skip and select refuse an offset past the end
                if offset >= len(ds):
                    return
                ds = ds.select(range(offset, len(ds)))
            n = offset
            with contextlib.closing(ds.iter(batch_size=BATCH)) as batches:  # stop its readers
                for batch in batches:
                    keys = list(batch)
                    for i in range(len(batch[keys[0]]) if keys else 0):
                        n += 1
                        yield n, {k: batch[k][i] for k in keys}
        except DataError:
            raise
        except Exception as exc:  # datasets / pyarrow / fsspec raise many types for bad data
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DataError(f"cannot read the dataset: {first}", file=self.label) from None


def _digest(paths: list[Path], root: Path) -> str:
    """``sha256:<hash>`` over files: their names relative to ``root``, and their bytes."""
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        digest.update(os.fsencode(os.path.relpath(path, root)) + b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                digest.update(block)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def file_revision(path: Path) -> str:
    """``sha256:<hash>`` of a prompt file, or of a ``save_to_disk`` folder's data files (not
    its ``state.json`` fingerprint or ``cache-*.arrow`` files, which change with each write
    or read)."""
    if path.is_file():
        return _digest([path], path.parent)
    files = [
        f
        for f in path.rglob("*")
        if f.is_file()
        and f.name != "state.json"
        and not f.name.startswith(".")
        and not (f.name.startswith("cache-") and f.suffix == ".arrow")
    ]
    return _digest(files, path)


def _content_revision(spec: DatasetSpec, files: list[str]) -> str:
    """The data files read, and the folder's README (which names its configs and
    features)."""
    root = Path(spec.target)
    paths = [Path(f.removeprefix("file://")) for f in files]
    if spec.name != "data_files" and (root / "README.md").is_file():
        paths.append(root / "README.md")
    return _digest(paths, root)


def _builder(spec: DatasetSpec, revision: str | None) -> Any:
    import datasets

    return datasets.load_dataset_builder(
        spec.target, spec.config, data_files=spec.data_files, revision=revision
    )


def _builder_error(spec: DatasetSpec, exc: Exception, cached: bool) -> DataError:
    """One line for a ``datasets`` error while finding the dataset, naming the field."""
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    if cached and isinstance(exc, (ConnectionError, FileNotFoundError)):
        why = "HF_HUB_OFFLINE is set" if offline() else "the Hugging Face Hub cannot be reached"
        return DataError(
            f"dataset '{spec.name}' is not in the local datasets cache and {why}; "
            f"{_local_copy_hint(spec.name)}",
            field="prompts.dataset",
        )
    if "BuilderConfig" in text or "Config name is missing" in text:
        return DataError(f"dataset '{spec.name}': {text}", field="prompts.config")
    if spec.data_files is not None and "data file" in text.lower():
        return DataError(f"dataset '{spec.name}': {text}", field="prompts.data_files")
    return DataError(f"cannot load dataset '{spec.name}': {text}", field="prompts.dataset")


def resolve_dataset(spec: DatasetSpec) -> ResolvedDataset:
    """Find the dataset's builder, split and revision (reads no rows).

    A Hub name is resolved to a commit sha with one short request; without network (or with
    ``HF_HUB_OFFLINE``) the datasets cache is read, and a dataset that is not there is one
    line that says how to point at a local copy.

    A Hub dataset is resolved once per process, so a pipeline's check and its run read the
    same commit.

    Raises:
        DataError: unknown dataset, config, split or revision, naming the field.
    """
    if not spec.local and repr(spec) in _RESOLVED:
        return _RESOLVED[repr(spec)]
    sha: str | None = None
    cached = False
    if not spec.local:
        sha = None if offline() else probe_hub(spec.name, spec.revision)
        cached = sha is None
    try:
        with _offline_mode() if cached else contextlib.nullcontext():
            builder = _builder(spec, sha or spec.revision)
    except DataError:
        raise
    except Exception as exc:
        raise _builder_error(spec, exc, cached) from None
    files = builder.config.data_files
    splits = list(files) if files else list(builder.info.splits or {})
    split = spec.split or ("train" if "train" in splits or not splits else splits[0])
    if splits and split not in splits:
        raise DataError(f"dataset '{spec.name}' has no split '{split}' (has: "
                        f"{', '.join(splits)})", field="prompts.split")  # fmt: skip
    if not spec.local:
        found = _SHA.search(f"{getattr(builder, 'hash', '')} {getattr(builder, 'base_path', '')}")
        revision = sha or (found[0] if found else None)
        if cached and spec.revision and _SHA.fullmatch(spec.revision) and revision != spec.revision:
            raise DataError(f"the cached copy of dataset '{spec.name}' is revision {revision}, "
                            f"not {spec.revision}; {_local_copy_hint(spec.name)}",
                            field="prompts.revision")  # fmt: skip
        _RESOLVED[repr(spec)] = ResolvedDataset(spec, builder, split, revision, cached)
        return _RESOLVED[repr(spec)]
    return ResolvedDataset(spec, builder, split)
