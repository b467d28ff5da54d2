"""What every training recipe's config shares, and how a config file is read.

A recipe's config dataclass subclasses :class:`BaseTrainConfig` and adds its own fields;
:func:`load_train_config` reads a YAML file onto it through the package's one YAML binder
(:mod:`rlaif.config.binder`), so errors name the file, line and field like a pipeline's do.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rlaif.config.binder import load_config
from rlaif.errors import ConfigError
from rlaif.train.trackers import check_trackers

# A training YAML reads like any other config (``1e-5`` is a number in a float field, an
# empty file is all defaults, ``check()`` errors get the field's line).
load_train_config = load_config


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
        checkpoint_every: save a checkpoint every this many optimizer steps (0: never); a
            killed run started again with the same settings and ``output`` resumes from its
            last complete checkpoint (see :mod:`rlaif.train.checkpoints`).
        keep_checkpoints: complete checkpoints kept on disk (older ones are removed); all go
            once the final model is saved.
        report_to: trackers that get the metrics too, beside ``curves.jsonl``:
            ``tensorboard`` (event files in ``<output>/tensorboard``), ``trackio``, ``wandb``.
            Their keys and tokens come from the environment only (``WANDB_API_KEY``, ...).
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
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    report_to: list[str] = field(default_factory=list)
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
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0 (0: no checkpoints)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
        ]
        for name, ok, why in rules:
            if not ok:
                raise ConfigError(why, field=name)
        use_cpu(self.device)
        check_trackers(self.report_to)
        module, _, name = (self.trl_config or "").partition(":")
        # Without TRL installed the recipe stops at require_trl() with the install command.
        if self.trl and module and importlib.util.find_spec(module) is not None:
            config_cls = getattr(importlib.import_module(module), name)
            names = {f.name for f in dataclasses.fields(config_cls) if f.init}
            for key in self.trl:
                if key not in names:
                    raise ConfigError(f"unknown {name} field '{key}'", field=f"trl.{key}")

    def training_kwargs(self) -> dict[str, Any]:
        """The TrainingArguments fields these settings map to (see :func:`trl_args`).

        transformers writes its checkpoints under ``<output>/checkpoints`` (renamed into place
        by :func:`rlaif.train.checkpoints.trl_checkpoints`, which also prunes them).
        """
        every = self.checkpoint_every
        return {
            "output_dir": str(Path(self.output) / "checkpoints"),
            "save_strategy": "steps" if every else "no",
            "save_steps": every or 500,
            "save_total_limit": None,
            # TensorBoard gets rlaif's own writer (rlaif.train.trackers.trl_trackers)
            "report_to": [n for n in self.report_to if n != "tensorboard"],
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


def use_cpu(device: str = "auto") -> bool:
    """Whether to train on the CPU: ``device`` is ``auto`` (a GPU if visible), ``cpu``, ``cuda``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"'{device}' is not one of auto, cpu, cuda", field="device")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no GPU is visible", field="device")
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())
