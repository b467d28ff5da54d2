"""``rlaif train reward``: a reward model from AI preference pairs, with TRL's RewardTrainer.

The model is the base model with a one-output score head (``num_labels=1``); TRL's loss is
``-log sigmoid(r(chosen) - r(rejected) - margin)``, where ``margin`` is the judge's logit
from the export (scaled by ``margin_scale``; ``use_margin: false`` drops it). After training,
accuracy on the held-out split is measured here: the share of test pairs whose chosen response
scores strictly higher than the rejected one. The saved folder loads with
``AutoModelForSequenceClassification.from_pretrained`` (LoRA merged).

Run: ``rlaif train reward configs/train/reward.yaml --set dataset=runs/demo``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
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


@dataclass
class RewardTrainConfig(BaseTrainConfig):
    """A reward-model run; the shared fields are in :class:`BaseTrainConfig`.

    Attributes:
        use_margin: subtract the dataset's ``margin`` column inside the loss (when present).
        margin_scale: multiply margins by this first (0.1 softens a confident judge).
        center_rewards_coefficient: pull mean rewards toward 0 (TRL's option); None is off.
        eval_batch_size: pairs scored at once when measuring held-out accuracy.
        eval_dataset: measure held-out accuracy on this dataset's test split instead of the
            training data's own (e.g. a rule's labels for a model trained on an AI judge's).
    """

    output: str = "runs/train/reward"
    learning_rate: float = 1e-4
    use_margin: bool = True
    margin_scale: float = 1.0
    center_rewards_coefficient: float | None = None
    eval_batch_size: int = 8
    eval_dataset: str = ""

    trl_config = "trl:RewardConfig"

    def check(self) -> None:
        super().check()
        if self.margin_scale < 0:
            raise ConfigError("must be >= 0", field="margin_scale")
        if self.eval_batch_size < 1:
            raise ConfigError("must be >= 1", field="eval_batch_size")


def reward_text(tokenizer: Any, prompt: Any, response: Any) -> str:
    """The text a reward model scores, built as TRL's RewardTrainer builds it.

    Conversational rows (message lists) go through the chat template as one conversation;
    plain-text rows are ``prompt + response + eos`` (TRL appends the EOS token).
    """
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(list(prompt) + list(response), tokenize=False)
    text = str(prompt) + str(response)
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


def reward_scores(
    model: Any, tokenizer: Any, texts: list[str], *, batch_size: int = 8
) -> list[float]:
    """The reward model's score of each text, in order (no gradient, eval mode).

    Args:
        model: a sequence-classification model with one output (or a peft wrapper of one).
        tokenizer: its tokenizer (needs a pad token).
        texts: full texts from :func:`reward_text`.
        batch_size: texts per forward pass.
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = (
        "right"  # TRL trains with right padding; scores read the last real token
    )
    out: list[float] = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                batch = tokenizer(
                    texts[i : i + batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                out.extend(model(**batch).logits[:, 0].float().tolist())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def pair_accuracy(
    model: Any, tokenizer: Any, rows: Any, *, max_length: int, batch_size: int = 8
) -> dict[str, Any]:
    """Held-out accuracy: the share of pairs where r(chosen) > r(rejected) (ties count wrong).

    Pairs longer than ``max_length`` tokens are skipped, as TRL skips them in training.

    Returns:
        ``accuracy`` (None without pairs), ``pairs`` scored, ``skipped_long``, ``mean_margin``
        (mean of r(chosen) - r(rejected)).
    """
    chosen, rejected = [], []
    skipped = 0
    for row in rows:
        c = reward_text(tokenizer, row["prompt"], row["chosen"])
        r = reward_text(tokenizer, row["prompt"], row["rejected"])
        n = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (c, r))
        if n > max_length:
            skipped += 1
            continue
        chosen.append(c)
        rejected.append(r)
    if not chosen:
        return {"accuracy": None, "pairs": 0, "skipped_long": skipped, "mean_margin": None}
    rc = reward_scores(model, tokenizer, chosen, batch_size=batch_size)
    rr = reward_scores(model, tokenizer, rejected, batch_size=batch_size)
    gaps = [a - b for a, b in zip(rc, rr, strict=True)]
    return {
        "accuracy": sum(g > 0 for g in gaps) / len(gaps),
        "pairs": len(gaps),
        "skipped_long": skipped,
        "mean_margin": sum(gaps) / len(gaps),
    }


def _prepare(split: Any, cfg: RewardTrainConfig) -> tuple[Any, bool]:
    """Keep what the trainer reads; scale or drop the margin. Returns (dataset, margin used)."""
    keep = ["prompt", "chosen", "rejected"]
    use_margin = cfg.use_margin and "margin" in split.column_names
    if use_margin:
        keep.append("margin")
    split = split.select_columns(keep)
    if use_margin and cfg.margin_scale != 1.0:
        scale = cfg.margin_scale
        split = split.map(lambda row: {"margin": float(row["margin"]) * scale})
    return split, use_margin


def load_tokenizer(path: str) -> Any:
    """A tokenizer with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer: {exc}", file=path) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def train_reward(cfg: RewardTrainConfig) -> TrainResult:
    """Train a reward model on a preference dataset and save it under ``cfg.output``.

    Args:
        cfg: the run's settings (see :class:`RewardTrainConfig`).

    Returns:
        Where the model went, ``metrics`` (train loss, held-out ``eval_accuracy``, ...) and
        the curves file.

    Raises:
        ConfigError, DataError, ModelError: one-line, naming what is wrong.
    """
    with quiet_bars():  # the progress line says what happens
        return _train_reward(cfg)


def _train_reward(cfg: RewardTrainConfig) -> TrainResult:
    cfg.check()
    require_trl()
    started = time.perf_counter()
    data = load_preferences(cfg.dataset, cfg.test_size, cfg.seed)
    if cfg.eval_dataset:
        data = held_out_from(data, cfg.eval_dataset, cfg.test_size, cfg.seed)
    train_set, margin_used = _prepare(data["train"], cfg)
    if cfg.use_margin and not margin_used and not cfg.quiet:
        print(
            "reward: the dataset has no 'margin' column; training without margins", file=sys.stderr
        )

    import torch
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig, RewardTrainer

    path = resolve_model_path(cfg.model, cfg.revision, cfg.trust_remote_code)
    out = Path(cfg.output)
    resume = prepare(out, cfg)  # the last complete checkpoint of these settings, if any
    curves = resume.curves()
    set_cpu_threads(cfg.device)
    set_seed(cfg.seed)  # the score head is initialized at random
    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code
        )
    except Exception as exc:
        raise ModelError(f"cannot load as a reward model: {exc}", file=path) from None
    model.config.pad_token_id = tokenizer.pad_token_id

    args = trl_args(
        RewardConfig,
        {
            **cfg.training_kwargs(),
            "max_length": cfg.max_length,
            "center_rewards_coefficient": cfg.center_rewards_coefficient,
        },
        cfg.trl,
    )
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora, "SEQ_CLS"),
    )
    callback = watch(trainer, curves, "reward", quiet=cfg.quiet)
    if len(trainer.train_dataset) == 0:
        raise DataError(
            f"every training pair is longer than max_length={cfg.max_length} tokens",
            file=cfg.dataset,
            field="max_length",
        )
    output = fit(trainer, resume, curves, callback, cfg.report_to)

    metrics: dict[str, Any] = {
        "recipe": "reward",
        "model": cfg.model,
        "dataset": cfg.dataset,
        "train_pairs": len(trainer.train_dataset),
        "margin_used": margin_used,
        "steps": trainer.state.global_step,
        "resumed_from_step": resume.step,
        "train_loss": output.training_loss,
        "last": dict(callback.last),
    }
    if "test" in data:
        acc = pair_accuracy(
            trainer.model,
            tokenizer,
            data["test"],
            max_length=cfg.max_length,
            batch_size=cfg.eval_batch_size,
        )
        metrics.update({f"eval_{k}": v for k, v in acc.items()})
        if acc["accuracy"] is not None:
            curves.log(trainer.state.global_step, eval_accuracy=acc["accuracy"])
    save_model(trainer.model, tokenizer, out)
    curves.plot()
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["config"] = asdict(cfg)
    write_metrics(out, metrics)
    resume.finish()
    return TrainResult(out, metrics, curves.path)
