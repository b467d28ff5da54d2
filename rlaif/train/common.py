"""Building blocks shared by the training recipes: config files, data, models, saving.

A recipe (``reward.py``, ``dpo.py``, ``online.py``, ``ppo.py``) is one readable function that
loads its config with :func:`load_train_config`, its data with :func:`load_preferences`, hands
the work to a TRL trainer (or its own loop), watches it with :class:`CurveCallback`, and saves
with :func:`save_model`. Nothing here knows which algorithm runs. Progress, curves and
``metrics.json`` live in :mod:`rlaif.train.curves` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from rlaif.errors import ConfigError, DataError, ModelError
from rlaif.pipeline.config import _apply_override, _build
from rlaif.train.curves import CurveLogger, quiet_bars, watch, write_metrics
from rlaif.yamlio import LineDict, load_yaml

T = TypeVar("T")

# CurveCallback is here too, built on first access (see __getattr__ at the end).
__all__ = [
    "BaseTrainConfig",
    "CurveLogger",
    "LoraSettings",
    "TrainResult",
    "load_preferences",
    "load_train_config",
    "peft_config",
    "quiet_bars",
    "require_trl",
    "resolve_model_path",
    "save_model",
    "set_cpu_threads",
    "trl_args",
    "use_cpu",
    "watch",
    "write_metrics",
]

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
RUN_DIR_DATASETS = ("export/preferences/conversational/disk", "export/pairs")


# -- configs ---------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """LoRA through peft; ``enabled: false`` means full fine-tuning.

    Attributes:
        enabled: train low-rank adapters instead of all weights.
        r: adapter rank.
        alpha: scaling numerator (``lora_alpha``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt; ``all-linear`` adapts every linear layer.
    """

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class BaseTrainConfig:
    """Fields every recipe shares; a recipe's config subclasses this and adds its own.

    Attributes:
        model: the starting model: a hub id, a local folder or a ``.gguf`` file.
        revision: hub revision of ``model``.
        trust_remote_code: allow models that ship their own Python code.
        dataset: preference data (see :func:`load_preferences`): a run directory, a
            ``save_to_disk`` folder, or a JSONL / Parquet file.
        output: folder for the trained model, ``metrics.json`` and curves.
        seed: seed of the model head, data order, split and sampling.
        device: ``auto`` (a GPU if visible), ``cpu`` or ``cuda``.
        max_steps: optimizer steps; ``-1`` trains for ``epochs`` instead.
        epochs: passes over the data when ``max_steps`` is -1.
        batch_size: rows per device per step.
        grad_accum: micro-batches per optimizer step.
        learning_rate: peak learning rate.
        max_length: longest prompt + response in tokens.
        test_size: share held out when the data has no test split (0 keeps all).
        lora: LoRA settings (off: full fine-tuning).
        quiet: print no progress lines.
        trl: extra fields of the TRL config, passed through as they are.
    """

    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    revision: str | None = None
    trust_remote_code: bool = False
    dataset: str = ""
    output: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    max_steps: int = 10
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 5e-5
    max_length: int = 512
    test_size: float = 0.1
    lora: LoraSettings = field(default_factory=LoraSettings)
    quiet: bool = False
    trl: dict[str, Any] = field(default_factory=dict)

    # "module:Class" of the TRL config that ``trl:`` extras go to; set by each recipe.
    trl_config: ClassVar[str | None] = None

    def check(self) -> None:
        """Value checks that types alone do not catch.

        Raises:
            ConfigError: naming the field.
        """
        rules = [
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "must be -1 or >= 1"),
            ("epochs", self.epochs > 0, "must be > 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("test_size", 0 <= self.test_size < 1, "must be in [0, 1)"),
            ("lora.r", self.lora.r >= 1, "must be >= 1"),
            ("lora.dropout", 0 <= self.lora.dropout < 1, "must be in [0, 1)"),
        ]
        for name, ok, why in rules:
            if not ok:
                raise ConfigError(why, field=name)
        use_cpu(self.device)
        module, _, name = (self.trl_config or "").partition(":")
        # Without TRL installed the recipe stops at require_trl() with the install command.
        if self.trl and module and importlib.util.find_spec(module) is not None:
            config_cls = getattr(importlib.import_module(module), name)
            names = {f.name for f in dataclasses.fields(config_cls) if f.init}
            for key in self.trl:
                if key not in names:
                    raise ConfigError(f"unknown {name} field '{key}'", field=f"trl.{key}")

    def training_kwargs(self) -> dict[str, Any]:
        """The TrainingArguments fields these settings map to (see :func:`trl_args`)."""
        return {
            "output_dir": str(self.output),
            "seed": self.seed,
            "data_seed": self.seed,
            "use_cpu": use_cpu(self.device),
            "max_steps": self.max_steps,
            "num_train_epochs": self.epochs,
            "per_device_train_batch_size": self.batch_size,
            "per_device_eval_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "learning_rate": self.learning_rate,
        }


def load_train_config(path: str | Path | None, cls: type[T], overrides: list[str] | None) -> T:
    """Read a training YAML onto the dataclass ``cls`` and apply ``key=value`` overrides.

    Unknown keys and wrong types are rejected with the file, line and dotted field (an
    override is reported as coming from ``--set``). ``path=None`` starts from the defaults.
    When ``cls`` has a ``check()`` method it is called, and the :class:`ConfigError` it
    raises (with ``field`` set) gets the file and line of that field.

    Args:
        path: the YAML file, or None.
        cls: the config dataclass (nested dataclasses become YAML sections).
        overrides: ``["lora.enabled=true", "max_steps=3", ...]``.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: unreadable or invalid file, unknown key, wrong type.
    """
    where = str(path) if path is not None else "--set"
    if path is None:
        raw: Any = LineDict()
        raw.line, raw.key_lines = 0, {}
    else:
        raw = load_yaml(path)
        if raw is None:  # an empty file is all defaults
            raw = LineDict()
            raw.line, raw.key_lines = 1, {}
        if not isinstance(raw, LineDict):
            raise ConfigError("top level must be a mapping", file=where, line=1)
    for item in overrides or []:
        _apply_override(raw, item)
    _floats_from_text(cls, raw)
    cfg = _build(cls, raw, where, "")
    check = getattr(cfg, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as exc:
            file, line = _where(raw, exc.field or "", where)
            raise ConfigError(exc.message, file=file, line=line, field=exc.field) from None
    return cfg


def _floats_from_text(cls: type, raw: Any) -> None:
    """Read ``1e-5`` as a number in float fields.

    YAML 1.1 (PyYAML) only resolves exponents written with a dot (``1.0e-5``), so the way
    everyone writes a learning rate arrives as a string.
    """
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(cls):
        return
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        tp = hints.get(str(key))
        args = set(typing.get_args(tp)) - {type(None)} if typing.get_args(tp) else {tp}
        if float in args and isinstance(value, str):
            with contextlib.suppress(ValueError):
                raw[key] = float(value.strip())
        elif len(args) == 1 and dataclasses.is_dataclass(next(iter(args))):
            _floats_from_text(next(iter(args)), value)


def _where(raw: Any, dotted: str, default_file: str) -> tuple[str, int | None]:
    """File and line of a dotted field in the loaded YAML (``--set`` for an override)."""
    node, file, line = raw, default_file, None
    for part in dotted.split(".") if dotted else []:
        if not isinstance(node, LineDict) or part not in node:
            break
        n = node.key_lines.get(part, node.line)
        file, line = ("--set", None) if n == 0 else (default_file, n)
        node = node[part]
    return file, line


def peft_config(lora: LoraSettings, task_type: str) -> Any:
    """A ``peft.LoraConfig`` for the settings, or None when LoRA is off.

    Args:
        lora: the settings.
        task_type: ``"CAUSAL_LM"`` or ``"SEQ_CLS"`` (the latter also trains the score head).
    """
    if not lora.enabled:
        return None
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ModelError("LoRA needs peft: pip install peft", field="lora.enabled") from exc
    targets: Any = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's shorthand must be a plain string
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
        # A reward head starts random: it must be trained and saved in full, not adapted.
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def require_trl() -> None:
    """Fail with one line when TRL (the optional ``train`` extra) is not installed.

    Raises:
        ModelError: naming the install command.
    """
    if importlib.util.find_spec("trl") is None:
        raise ModelError("training needs TRL: pip install 'rlaif[train]'")


def use_cpu(device: str = "auto") -> bool:
    """Whether to train on the CPU: ``device`` is ``auto`` (a GPU if visible), ``cpu``, ``cuda``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"'{device}' is not one of auto, cpu, cuda", field="device")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no GPU is visible", field="device")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def set_cpu_threads(device: str = "auto") -> None:
    """On a CPU run, use one torch thread per idle core (see ``cpu_threads``): spinning
    OpenMP threads on busy cores made small training steps 2-3x slower in our runs."""
    if use_cpu(device):
        import torch

        from rlaif.backends.transformers_backend import cpu_threads

        torch.set_num_threads(cpu_threads())


def trl_args(config_cls: type, base: dict[str, Any], extra: dict[str, Any] | None = None) -> Any:
    """Build a TRL / transformers config with rlaif's defaults, then the user's ``trl:`` extras.

    The defaults suit small runs anywhere: no reporting integrations, no checkpoints, fp32
    and no gradient checkpointing on a CPU (TRL defaults to bf16 and checkpointing).

    Args:
        config_cls: e.g. ``trl.DPOConfig``.
        base: fields the recipe sets (``output_dir``, ``max_steps``, ...). A ``use_cpu`` key
            chooses the precision defaults.
        extra: the config file's ``trl:`` section, passed through as is.

    Raises:
        ConfigError: a key in ``extra`` that ``config_cls`` does not have, or a value it refuses.
    """
    cpu = bool(base.get("use_cpu", False))
    kwargs: dict[str, Any] = {
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,  # CurveCallback prints progress lines that suit logs and TTYs
        "gradient_checkpointing": False,
        "bf16": False if cpu else None,
        "dataloader_num_workers": 0,
    }
    kwargs.update(base)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key, value in (extra or {}).items():
        if key not in names:
            raise ConfigError(f"unknown {config_cls.__name__} field '{key}'", field=f"trl.{key}")
        kwargs[key] = value
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config_cls.__name__}: {exc}", field="trl") from None


# -- models ----------------------------------------------------------------------------------


def resolve_model_path(
    model_id: str, revision: str | None = None, trust_remote_code: bool = False
) -> str:
    """A local folder for a hub id, a local folder or a ``.gguf`` file (see ``resolve_model``).

    Raises:
        ModelError: the model cannot be found offline or needs untrusted remote code.
    """
    from rlaif.backends.resolve import resolve_model

    return str(resolve_model(model_id, revision=revision, trust_remote_code=trust_remote_code).path)


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save a trained model as a plain folder ``from_pretrained`` loads (safetensors).

    LoRA adapters are merged into the base weights first (``merge_and_unload``), so the
    folder needs neither peft nor the base model.

    Args:
        model: a transformers model, possibly a peft model.
        tokenizer: its tokenizer (saved alongside, with the chat template).
        out_dir: the folder to write.

    Returns:
        ``out_dir``.
    """
    from rlaif.train.curves import is_main_process

    out = Path(out_dir)
    if not is_main_process():  # one writer under a distributed launch
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Unwrap a DeepSpeed / DDP / accelerate wrapper if the trainer left one.
    model = getattr(model, "module", model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # Sequence-classification models need the pad id to find the last token of a batch.
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# -- data ------------------------------------------------------------------------------------


def _read_file(path: Path) -> Any:  # -> datasets.Dataset
    """A JSONL / JSON / Parquet file as a Dataset, without the HF datasets cache."""
    import datasets

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return datasets.Dataset(pq.read_table(path))
        except Exception as exc:
            raise DataError(f"cannot read Parquet: {exc}", file=path) from None
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"invalid JSON: {exc.msg}", file=path, line=n) from None
        if not rows:
            raise DataError("no rows", file=path)
        try:
            return datasets.Dataset.from_list(rows)
        except Exception as exc:
            raise DataError(f"rows do not form a table: {exc}", file=path) from None
    raise DataError("expected a .jsonl, .json or .parquet file, or a dataset folder", file=path)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_any(path: Path) -> Any:  # -> Dataset | DatasetDict
    import datasets

    if path.is_file():
        return _read_file(path)
    if _is_saved_dataset(path):
        try:
            return datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"cannot load the saved dataset: {exc}", file=path) from None
    for rel in RUN_DIR_DATASETS:  # a run directory
        if _is_saved_dataset(path / rel):
            return _load_any(path / rel)
    # A folder of split files, as the exporter writes next to disk/: train.jsonl, test.jsonl.
    splits = {}
    for name in ("train", "test"):
        for ext in (".parquet", ".jsonl"):
            if (path / f"{name}{ext}").is_file():
                splits[name] = _read_file(path / f"{name}{ext}")
                break
    if "train" in splits:
        return datasets.DatasetDict(splits)
    raise DataError(
        "not a dataset: expected a save_to_disk folder, a .jsonl/.parquet file, or a run "
        f"directory with {' or '.join(RUN_DIR_DATASETS)}",
        file=path,
    )


def load_preferences(
    path: str | Path,
    split_test: float = 0.1,
    seed: int = 0,
    *,
    columns: tuple[str, ...] = PREFERENCE_COLUMNS,
) -> Any:  # -> datasets.DatasetDict
    """Load a preference dataset as a ``DatasetDict`` with ``train`` (and usually ``test``).

    Accepts a ``save_to_disk`` folder (a Dataset or a DatasetDict), a JSONL / Parquet file,
    a folder with ``train``/``test`` JSONL or Parquet files, or an rlaif run directory
    (``export/preferences/conversational/disk``, else the SL-CAI ``export/pairs``). A dataset
    without a ``test`` split is split deterministically (``seed``) when ``split_test > 0``.

    Args:
        path: where the data is.
        split_test: share of rows held out when there is no test split (0 keeps all).
        seed: seed of that split.
        columns: columns every split must have.

    Raises:
        DataError: missing path, unreadable data, missing columns, no training rows.
    """
    import datasets

    p = Path(path).expanduser()
    if not str(path).strip():
        raise DataError("no dataset given", field="dataset")
    if not p.exists():
        raise DataError("dataset not found", file=p, field="dataset")
    if not 0 <= split_test < 1:
        raise ConfigError(f"must be in [0, 1), got {split_test}", field="test_size")
    data = _load_any(p)
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"no 'train' split (splits: {', '.join(data)})", file=p)
        dd = datasets.DatasetDict({k: data[k] for k in ("train", "test") if k in data})
    else:
        dd = datasets.DatasetDict({"train": data})
    if "test" not in dd and split_test > 0 and len(dd["train"]) >= 2:
        # Always leave at least one row on each side, whatever the share.
        n_test = min(len(dd["train"]) - 1, max(1, math.ceil(split_test * len(dd["train"]))))
        parts = dd["train"].train_test_split(test_size=n_test, seed=seed, shuffle=True)
        dd = datasets.DatasetDict({"train": parts["train"], "test": parts["test"]})
    for name, split in dd.items():
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise DataError(
                f"split '{name}' lacks column(s) {', '.join(missing)} "
                f"(has: {', '.join(split.column_names)})",
                file=p,
            )
    if len(dd["train"]) == 0:
        raise DataError("the train split has no rows", file=p)
    if "test" in dd and len(dd["test"]) == 0:
        dd = datasets.DatasetDict({"train": dd["train"]})
    return dd


# -- results ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a recipe produced.

    Attributes:
        out_dir: the output folder (model files, ``metrics.json``, curves).
        metrics: final numbers (losses, accuracy, steps, seconds, ...).
        curves: ``curves.jsonl`` path (``curves.png`` sits next to it), or None.
    """

    out_dir: Path
    metrics: dict[str, Any]
    curves: Path | None = None


def __getattr__(name: str) -> Any:
    if name == "CurveCallback":  # built on first use, see rlaif.train.curves
        from rlaif.train import curves

        return curves.CurveCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
