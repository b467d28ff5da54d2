"""``rlaif train dpo``: direct preference optimization on AI preference pairs (TRL DPOTrainer).

The reference model, as TRL 1.16 handles it:

* **full fine-tuning**: a second, frozen copy of the starting model is loaded here and passed
  as ``ref_model`` (TRL would otherwise load the same copy itself from ``config._name_or_path``).
* **LoRA** (``lora.enabled: true``): no copy. TRL wraps the model with the adapter and, with
  ``ref_model=None``, computes reference log-probs with the adapters disabled
  (``use_adapter(model, None)`` -> ``disable_adapter()``), i.e. with the frozen base weights,
  which equal the starting model while the adapter is fresh.

The held-out split, when present, is evaluated once at the end (``eval_loss``,
``eval_rewards/accuracies``: the share of test pairs whose implicit reward prefers chosen).
The saved folder is a plain causal LM (LoRA merged).

Run: ``rlaif train dpo configs/train/dpo.yaml --set dataset=runs/demo``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlaif.errors import ConfigError, DataError, ModelError
from rlaif.train.checkpoints import fit, prepare
from rlaif.train.common import (
    TrainResult,
    peft_config,
    require_trl,
    resolve_model_path,
    save_model,
    set_cpu_threads,
    trl_args,
)
from rlaif.train.config import BaseTrainConfig
from rlaif.train.curves import quiet_bars, watch, write_metrics
from rlaif.train.data import held_out_from, load_preferences

# TRL 1.16's DPOConfig.loss_type values.
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip


@dataclass
class DPOTrainConfig(BaseTrainConfig):
    """A DPO run; the shared fields are in :class:`BaseTrainConfig`.

    Attributes:
        beta: how far the policy may move from the reference (higher: less).
        loss_type: one or more of :data:`LOSS_TYPES` (several are summed with ``loss_weights``).
        loss_weights: weights of several loss types; None gives each 1.
        label_smoothing: robust DPO / EXO label noise (0 is off).
        eval_at_end: evaluate the held-out split after training.
        eval_dataset: take the held-out split from this dataset's test split instead of the
            training data's own (every arm of an experiment scored on the same labels).
    """

    output: str = "runs/train/dpo"
    learning_rate: float = 5e-6
    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    eval_at_end: bool = True
    eval_dataset: str = ""

    trl_config = "trl:DPOConfig"

    def check(self) -> None:
        super().check()
        if self.beta <= 0:
            raise ConfigError("must be > 0", field="beta")
        for name in self.loss_type:
            if name not in LOSS_TYPES:
                raise ConfigError(
                    f"'{name}' is not one of {', '.join(LOSS_TYPES)}", field="loss_type"
                )
        if not self.loss_type:
            raise ConfigError("needs at least one loss type", field="loss_type")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(
                f"has {len(self.loss_weights)} weights for {len(self.loss_type)} loss types",
                field="loss_weights",
            )
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("must be in [0, 0.5)", field="label_smoothing")


def load_causal_lm(path: str, trust_remote_code: bool = False) -> Any:
    """A causal LM in float32 (the trainer's mixed precision, if any, casts on the fly)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ModelError(f"cannot load as a causal LM: {exc}", file=path) from None


def train_dpo(cfg: DPOTrainConfig) -> TrainResult:
    """Fine-tune a policy with DPO on a preference dataset and save it under ``cfg.output``.

    Args:
        cfg: the run's settings (see :class:`DPOTrainConfig`).

    Returns:
        Where the model went, ``metrics`` (train loss, reward accuracy on train and test,
        whether a reference copy was loaded) and the curves file.

    Raises:
        ConfigError, DataError, ModelError: one-line, naming what is wrong.
    """
    with quiet_bars():  # the progress line says what happens
        return _train_dpo(cfg)


def _train_dpo(cfg: DPOTrainConfig) -> TrainResult:
    cfg.check()
    require_trl()
    started = time.perf_counter()
    data = load_preferences(cfg.dataset, cfg.test_size if cfg.eval_at_end else 0.0, cfg.seed)
    if cfg.eval_at_end and cfg.eval_dataset:
        data = held_out_from(data, cfg.eval_dataset, cfg.test_size, cfg.seed)
    keep = ["prompt", "chosen", "rejected"]
    train_set = data["train"].select_columns(keep)
    test_set = None
    if cfg.eval_at_end and "test" in data:
        test_set = data["test"].select_columns(keep)

    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from rlaif.train.reward import load_tokenizer

    path = resolve_model_path(cfg.model, cfg.revision, cfg.trust_remote_code)
    out = Path(cfg.output)
    resume = prepare(out, cfg)  # the last complete checkpoint of these settings, if any
    curves = resume.curves()
    set_cpu_threads(cfg.device)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, cfg.trust_remote_code)
    lora = peft_config(cfg.lora, "CAUSAL_LM")
    ref_model = None
    if lora is None:
        # Full fine-tuning: the reference is a frozen copy of the starting weights.
        ref_model = load_causal_lm(path, cfg.trust_remote_code).eval()
        ref_model.requires_grad_(False)

    args = trl_args(
        DPOConfig,
        {
            **cfg.training_kwargs(),
            "beta": cfg.beta,
            "loss_type": list(cfg.loss_type),
            "loss_weights": cfg.loss_weights,
            "label_smoothing": cfg.label_smoothing,
            "max_length": cfg.max_length,
        },
        cfg.trl,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=train_set,
        eval_dataset=test_set,
        processing_class=tokenizer,
        peft_config=lora,
    )
    if len(trainer.train_dataset) == 0:
        raise DataError("no training pairs left after tokenizing", file=cfg.dataset)
    callback = watch(trainer, curves, "dpo", quiet=cfg.quiet)
    output = fit(trainer, resume, curves, callback, cfg.report_to)

    metrics: dict[str, Any] = {
        "recipe": "dpo",
        "model": cfg.model,
        "dataset": cfg.dataset,
        "train_pairs": len(trainer.train_dataset),
        "lora": cfg.lora.enabled,
        # True: a frozen copy; False: the LoRA base with adapters disabled (or precomputed).
        "reference_copy": trainer.ref_model is not None,
        "steps": trainer.state.global_step,
        "resumed_from_step": resume.step,
        "checkpoint_seconds": round(resume.seconds, 2),
        "train_loss": output.training_loss,
        "last": dict(callback.last),
    }
    if test_set is not None and len(test_set):
        evaluation = trainer.evaluate()
        metrics.update({k: v for k, v in evaluation.items() if isinstance(v, (int, float))})
        metrics["test_pairs"] = len(test_set)
    save_model(trainer.model, tokenizer, out)
    curves.plot()
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["config"] = asdict(cfg)
    write_metrics(out, metrics)
    resume.finish()
    return TrainResult(out, metrics, curves.path)
