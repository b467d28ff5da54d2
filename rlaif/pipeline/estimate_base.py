"""What every part of the ``--dry-run`` estimate shares: the per-step rows, the whole
estimate, the models' token counters (no weights loaded) and a read-only view of a run dir.

:mod:`rlaif.pipeline.estimate` counts the data stages, :mod:`rlaif.pipeline.estimate_eval`
the evaluations and :mod:`rlaif.pipeline.estimate_train` the training steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.backends.base import Conversation
from rlaif.calls.budget import Usage
from rlaif.calls.caller import max_completion_tokens, prompt_copies
from rlaif.config.schema import BudgetConfig, ModelConfig
from rlaif.store import StageStore
from rlaif.store.jsonl import JsonlReader, decode_line, read_line_at

FAILED = "failed"  # a step whose record is an error: the prompt's chain ends there


def _rough_count(conversation: Conversation) -> int:
    return sum(len(m.get("content", "")) for m in conversation) // 4


@dataclass
class StageEstimate:
    """The remaining work of one step of the run.

    Attributes:
        name: the step (``respond``, ``critique-1``, ``sample``, ``judge``, ``judge-2``...).
        model: the model that answers it.
        calls: requests still to send.
        done: requests already answered (records or call cache): no cost.
        prompt_tokens: prompt tokens of the remaining calls.
        completion_tokens: the most completion tokens the remaining calls may generate.
        bounded: whether ``prompt_tokens`` holds upper bounds (unknown model outputs).
    """

    name: str
    model: str
    calls: int = 0
    done: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bounded: bool = False

    @property
    def usage(self) -> Usage:
        return Usage(self.calls, self.prompt_tokens, self.completion_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def add_call(st: StageEstimate, count: Callable[[Conversation], int], req: Any, known: bool,
             bound: int) -> None:  # fmt: skip
    """Count one request still to send: its prompt (plus ``bound`` tokens standing for model
    outputs missing from it when not ``known``) and the most it may generate."""
    st.calls += 1
    st.prompt_tokens += (count(req.messages) + bound) * prompt_copies(req)
    st.completion_tokens += max_completion_tokens(req)
    st.bounded = st.bounded or not known


@dataclass
class RowsBound:
    """The most rows an export of a data step not finished yet will have, and their mean
    length in tokens (a model output not made yet counted at its ``max_new_tokens``).

    Attributes:
        rows: at most this many rows (filters and test splits only remove rows).
        tokens_per_row: prompt and response(s) of a row (a pair: both sequences).
        prompt_tokens: the prompt alone.
        basis: where the bound comes from, for the report.
    """

    rows: int
    tokens_per_row: float
    prompt_tokens: float
    basis: str


@dataclass
class Estimate:
    """What a run of a pipeline still needs, per step, and what its run dir has spent.

    ``stages`` are the model calls of the data stages and of the evaluation (``eval ...``
    rows); ``train`` the training steps (:class:`rlaif.pipeline.estimate_train.TrainEstimate`);
    ``exports`` bound the rows each export of the data stages will have; ``notes`` say what
    runs besides the counted calls.
    """

    pipeline: str
    run_dir: Path
    prompts: int
    started: bool  # the run dir holds an earlier run's work
    stages: list[StageEstimate] = field(default_factory=list)
    counting: dict[str, str] = field(default_factory=dict)  # model -> how tokens are counted
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    spent: Usage = field(default_factory=Usage)  # already used by this run dir (call cache)
    train: list[Any] = field(default_factory=list)  # TrainEstimate per training step
    exports: dict[str, RowsBound] = field(default_factory=dict)  # sft / pairs / preferences
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> Usage:
        return sum((s.usage for s in self.stages), Usage())

    @property
    def done(self) -> int:
        return sum(s.done for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "run_dir": str(self.run_dir),
            "prompts": self.prompts,
            "started": self.started,
            "stages": [s.to_dict() for s in self.stages],
            "total": self.total.to_dict(),
            "done": self.done,
            "counting": dict(self.counting),
            "spent": self.spent.to_dict(),
            "train": [t.to_dict() for t in self.train],
            "notes": list(self.notes),
        }


@dataclass
class CountingModel:
    """A model as the runner identifies it (for record ids and cache keys), and a counter."""

    model: str
    revision: str | None
    count: Callable[[Conversation], int]
    how: str


class Models:
    """Each model section identified once (:func:`identify`), by backend, id, revision and
    options; ``counting`` says how each one's tokens are counted."""

    def __init__(self) -> None:
        self.found: dict[str, CountingModel] = {}

    def __call__(self, m: ModelConfig) -> CountingModel:
        key = repr((m.backend, m.id, m.revision, sorted(m.options.items(), key=str)))
        if key not in self.found:
            self.found[key] = identify(m)
        return self.found[key]

    def counting(self) -> dict[str, str]:
        return {m.model: m.how for m in self.found.values()}


def _hf_model(m: ModelConfig) -> CountingModel:
    """The model's identity and tokenizer without loading weights (a GGUF is not converted:
    its tokenizer is read from the converted copy if there is one, else from the file)."""
    from transformers import AutoTokenizer

    from rlaif.backends import resolve as R
    from rlaif.backends.local import prompt_ids

    model = m.id.strip()
    local = Path(model).expanduser()
    gguf: Path | None = None
    if local.is_file() and local.suffix == ".gguf":
        gguf = local.resolve()
    elif (
        model == R.DEFAULT_MODEL
        and m.revision is None
        and not local.is_dir()
        and R._hub_cached(model, None) is None  # the order of resolve_model's lookups
    ):
        gguf = R.default_gguf()
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if gguf is not None:
        sha = R.file_sha256(gguf)
        revision: str | None = "sha256:" + sha
        converted = R.cache_dir() / "models" / f"{gguf.stem}-{sha[:16]}"  # as convert_gguf
        if converted.is_dir():
            folder = converted
        else:  # slower (the GGUF's metadata is parsed) but loads no weights
            folder, kwargs["gguf_file"] = gguf.parent, gguf.name
    else:
        resolved = R.resolve_model(
            model, revision=m.revision, trust_remote_code=m.trust_remote_code
        )
        model, revision, folder = resolved.model_id, resolved.revision, resolved.path
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    return CountingModel(
        model,
        revision,
        lambda conv: len(prompt_ids(tokenizer, conv)),
        "its tokenizer, chat template included (as the backend counts)",
    )


def identify(m: ModelConfig) -> CountingModel:
    if m.backend == "fake":
        from rlaif.backends.fake import FakeBackend

        # its count does not depend on its options (canned replies, failure markers)
        return CountingModel(
            m.id, None, FakeBackend().count_tokens, "whitespace words (fake backend)"
        )
    if m.backend in ("transformers", "vllm", "auto"):
        return _hf_model(m)
    # A served model: no local tokenizer to ask, so the base backend's rough count.
    return CountingModel(
        m.id, m.revision, _rough_count, "characters / 4 (no local tokenizer; rough)"
    )


class RunDirView:
    """Read-only view of what a run dir already holds: step records and cached answers."""

    def __init__(self, path: Path, retry_errors: bool) -> None:
        self.path = path
        self.retry_errors = retry_errors
        self._stores: dict[str, StageStore | None] = {}
        self._fd: int | None = None
        self.cache_path = path / "cache" / "calls.jsonl"
        self.cache: dict[str, int] = {}
        for offset, entry in JsonlReader(self.cache_path, tail="ignore"):
            if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                self.cache.setdefault(entry["key"], offset)

    def record(self, stage: str, rid: str) -> dict[str, Any] | None:
        """The record ``rid`` of ``stage`` if a resumed run would reuse it, else None."""
        if stage not in self._stores:
            exists = (self.path / "stages" / stage).is_dir()
            self._stores[stage] = (
                StageStore(self.path, stage, readonly=True, retry_errors=self.retry_errors)
                if exists
                else None
            )
        store = self._stores[stage]
        return store.get(rid) if store is not None and store.is_done(rid) else None

    def cached(self, key: str) -> Any:
        offset = self.cache.get(key)
        if offset is None:
            return None
        if self._fd is None:
            self._fd = os.open(self.cache_path, os.O_RDONLY)
        return decode_line(read_line_at(self._fd, offset))["value"]

    def close(self) -> None:
        for store in self._stores.values():
            if store is not None:
                store.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
