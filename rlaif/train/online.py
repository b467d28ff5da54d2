"""``rlaif train grpo`` / ``rlaif train rloo``: online RL against a reward model or an AI judge.

The policy samples ``num_generations`` completions per prompt; each is scored and TRL's
``GRPOTrainer`` (group-normalized advantages) or ``RLOOTrainer`` (leave-one-out baseline)
updates the policy, with a KL penalty toward the starting model when ``beta > 0`` (a frozen
copy TRL loads itself for full fine-tuning; the adapter-free base model under LoRA).

The reward (``reward.kind``):

* ``model``: a sequence-classification model folder (``rlaif train reward`` output); TRL
  renders prompt + completion with the reward tokenizer's chat template and takes the score.
* ``judge``: the AI judge of :mod:`rlaif.stages.judge` through any backend: the reward is
  P(completion better than the row's reference response), judged in both orders under a
  principle of the constitution. The reference is a column of the data (``chosen`` of a
  preference dataset by default). A judgement that fails gives no reward (None), which TRL
  treats as unscorable (zero advantage), never as a guess.
* ``rule``: the constitution's code-checked principles (``check:``), scored exactly; a
  prompt file's ``label_field`` gives per-label refusal rules their label.
* ``python``: the user's function ``reward.function`` (needs ``reward.allow_code: true``).

The reward functions are in :mod:`rlaif.train.reward_funcs`.

Prompts come from the train split of a preference dataset's ``prompt`` column (``dataset``;
a test split stays held out) or from a prompt file (``prompts``: JSONL / CSV / Parquet / a
saved dataset, read as the pipeline reads them).

Run: ``rlaif train grpo configs/train/grpo.yaml --set dataset=runs/demo
--set reward.model=runs/train/reward``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlaif.backends.resolve import DEFAULT_MODEL
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
from rlaif.train.data import load_preferences
from rlaif.train.reward_funcs import JudgeReward, build_reward, judge_reward  # noqa: F401


@dataclass
class RewardSource:
    """Where rewards come from.

    Attributes:
        kind: ``model`` (a trained reward model), ``judge`` (the AI judge), ``rule`` (the
            constitution's checks) or ``python`` (``function``).
        model: ``kind: model``: the reward model folder.
        backend: ``kind: judge``: backend kind (transformers, vllm, fake).
        judge_model: ``kind: judge``: the judge model id or path.
        options: ``kind: judge``: backend options (batch_size, dtype, ...).
        constitution: ``kind: judge``: where the judge principles come from.
        templates: ``kind: judge``: a folder of the user's own prompt templates.
        mode: ``kind: judge``: ``logprob`` (one forward pass per order) or ``reasoning``.
        principles_k: ``kind: judge``: judge principles per completion (an ensemble).
        reference: ``kind: judge``: the data column holding the response to beat.
        system: ``kind: judge``: system prompt of the judged conversation, if any.
        max_new_tokens: ``kind: judge``, reasoning mode: length of the judge's reasoning.
        function: ``kind: python``: ``module:name`` of a function scoring completions.
        allow_code: ``kind: python``: the function is your code; it runs only when true.
    """

    kind: str = "model"
    model: str = ""
    backend: str = "transformers"
    judge_model: str = DEFAULT_MODEL
    options: dict[str, Any] = field(default_factory=dict)
    constitution: str = "helpful-harmless"
    templates: str | None = None
    mode: str = "logprob"
    principles_k: int = 1
    reference: str = "chosen"
    system: str | None = None
    max_new_tokens: int = 256
    function: str | None = None
    allow_code: bool = False


REWARD_KINDS = ("model", "judge", "rule", "python")


@dataclass
class OnlineTrainConfig(BaseTrainConfig):
    """An online RL run (GRPO or RLOO); the shared fields are in :class:`BaseTrainConfig`.

    ``batch_size`` counts completions, as in TRL: each optimizer step sees
    ``batch_size * grad_accum`` completions, ``num_generations`` per prompt, so that product
    must be a multiple of ``num_generations``. ``max_length`` bounds prompt + completion:
    longer prompts are dropped (and counted).

    Attributes:
        prompts: a prompt file instead of ``dataset`` (JSONL / CSV / Parquet / saved dataset).
        prompt_field: the column of ``prompts`` holding the prompt.
        label_field: a column of ``prompts`` with each prompt's label (harmful, safe, ...),
            passed to the reward as ``label`` (for per-label rule checks).
        limit: use at most this many prompts.
        reward: where rewards come from (see :class:`RewardSource`).
        num_generations: completions sampled per prompt (the group).
        max_completion_length: tokens per completion.
        temperature: sampling temperature.
        top_p: nucleus sampling.
        beta: KL coefficient toward the starting model (0: no reference model at all).
    """

    prompts: str = ""
    prompt_field: str = "prompt"
    label_field: str | None = None
    limit: int | None = None
    reward: RewardSource = field(default_factory=RewardSource)
    learning_rate: float = 1e-5
    num_generations: int = 4
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04

    def check(self) -> None:
        super().check()
        r = self.reward
        rules = [
            ("num_generations", self.num_generations >= 2, "must be >= 2 (a group to compare)"),
            ("max_completion_length", self.max_completion_length >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0, "must be > 0 (sampling)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("beta", self.beta >= 0, "must be >= 0"),
            ("limit", self.limit is None or self.limit >= 1, "must be >= 1"),
            ("reward.kind", r.kind in REWARD_KINDS, f"must be one of {', '.join(REWARD_KINDS)}"),
            ("reward.mode", r.mode in ("logprob", "reasoning"), "must be logprob or reasoning"),
            ("reward.principles_k", r.principles_k >= 1, "must be >= 1"),
        ]
        for name, ok, why in rules:
            if not ok:
                raise ConfigError(why, field=name)
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ConfigError(
                f"batch_size * grad_accum ({self.batch_size * self.grad_accum}) must be a "
                f"multiple of num_generations ({self.num_generations})",
                field="batch_size",
            )
        if bool(self.dataset) == bool(self.prompts):
            raise ConfigError("set exactly one of dataset and prompts", field="dataset")
        if r.kind == "model" and not r.model:
            raise ConfigError("missing: the reward model folder", field="reward.model")
        if r.kind == "judge" and self.prompts:
            raise ConfigError(
                "the judge compares each completion with a reference response: use `dataset` "
                f"with a '{r.reference}' column instead of `prompts`",
                field="reward.kind",
            )


@dataclass
class GRPOTrainConfig(OnlineTrainConfig):
    """A GRPO run (see :class:`OnlineTrainConfig`)."""

    output: str = "runs/train/grpo"
    trl_config = "trl:GRPOConfig"


@dataclass
class RLOOTrainConfig(OnlineTrainConfig):
    """An RLOO run (see :class:`OnlineTrainConfig`)."""

    output: str = "runs/train/rloo"
    beta: float = 0.05
    trl_config = "trl:RLOOConfig"


# -- rewards ----------------------------------------------------------------------------------


def load_reward_model(folder: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A reward model and its tokenizer; the model must have exactly one output."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rlaif.train.reward import load_tokenizer

    path = resolve_model_path(folder, None, trust_remote_code)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ModelError(f"cannot load the reward model: {exc}", field="reward.model") from None
    if model.config.num_labels != 1:
        raise ModelError(
            f"'{folder}' has {model.config.num_labels} outputs; a reward model has 1 "
            "(train one with `rlaif train reward`)",
            field="reward.model",
        )
    tokenizer = load_tokenizer(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# -- data -------------------------------------------------------------------------------------


def _as_messages(prompt: Any) -> list[dict[str, str]]:
    from rlaif.sources import to_conversation

    return [{"role": r, "content": c} for r, c in to_conversation(prompt, {"field": "prompt"})]


def load_prompts(cfg: OnlineTrainConfig, tokenizer: Any) -> tuple[Any, int]:
    """The prompt dataset (``prompt`` as messages, plus the judge's reference column) and the
    number of prompts dropped for being too long."""
    import datasets

    if cfg.prompts:
        from rlaif.sources import read_prompts

        items, _ = read_prompts(Path(cfg.prompts), field=cfg.prompt_field, limit=cfg.limit,
                                label_field=cfg.label_field)  # fmt: skip
        rows = [{"prompt": item.messages()} for item in items]
        if cfg.label_field:
            rows = [{**row, "label": item.label} for row, item in zip(rows, items, strict=True)]
    else:
        extra = (cfg.reward.reference,) if cfg.reward.kind == "judge" else ()
        split = load_preferences(cfg.dataset, 0.0, cfg.seed, columns=("prompt", *extra))["train"]
        if cfg.limit is not None:
            split = split.select(range(min(cfg.limit, len(split))))
        rows = [
            {"prompt": _as_messages(row["prompt"]), **{c: row[c] for c in extra}} for row in split
        ]
    budget = cfg.max_length - cfg.max_completion_length

    def fits(messages: list[dict[str, str]]) -> bool:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget

    kept = [row for row in rows if fits(row["prompt"])]
    if not kept:
        raise DataError(
            f"no prompt fits max_length - max_completion_length = {budget} tokens",
            file=cfg.prompts or cfg.dataset,
            field="max_length",
        )
    return datasets.Dataset.from_list(kept), len(rows) - len(kept)


# -- the recipe -------------------------------------------------------------------------------


def train_online(
    cfg: OnlineTrainConfig, algorithm: str, *, judge_backend: Any = None
) -> TrainResult:
    """Train a policy with GRPO or RLOO and save it under ``cfg.output``.

    Args:
        cfg: the run's settings.
        algorithm: ``"grpo"`` or ``"rloo"``.
        judge_backend: a ready backend for ``reward.kind: judge`` (default: built from config).

    Returns:
        Where the model went, ``metrics`` (mean reward at the first and last step, KL, ...)
        and the curves file.

    Raises:
        ConfigError, DataError, ModelError: one-line, naming what is wrong.
    """
    with quiet_bars():  # the progress line says what happens
        return _train_online(cfg, algorithm, judge_backend)


def _train_online(cfg: OnlineTrainConfig, algorithm: str, judge_backend: Any) -> TrainResult:
    if algorithm not in ("grpo", "rloo"):
        raise ConfigError(f"unknown algorithm '{algorithm}' (grpo, rloo)")
    cfg.check()
    require_trl()
    started = time.perf_counter()
    from transformers import set_seed

    from rlaif.train.dpo import load_causal_lm
    from rlaif.train.reward import load_tokenizer

    path = resolve_model_path(cfg.model, cfg.revision, cfg.trust_remote_code)
    tokenizer = load_tokenizer(path)
    prompts, dropped = load_prompts(cfg, tokenizer)
    if cfg.reward.kind == "model":
        reward_func, reward_tok = load_reward_model(cfg.reward.model, cfg.trust_remote_code)
    else:
        reward_func, reward_tok = build_reward(cfg.reward, cfg.seed, judge_backend), None

    if algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    out = Path(cfg.output)
    resume = prepare(out, cfg)  # the last complete checkpoint of these settings, if any
    curves = resume.curves()
    set_cpu_threads(cfg.device)
    set_seed(cfg.seed)
    model = load_causal_lm(path, cfg.trust_remote_code)
    args = trl_args(
        Config,
        {
            **cfg.training_kwargs(),
            "trust_remote_code": cfg.trust_remote_code,  # TRL loads the KL reference itself
            "num_generations": cfg.num_generations,
            "max_completion_length": cfg.max_completion_length,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "beta": cfg.beta,
        },
        cfg.trl,
    )
    trainer = Trainer(
        model=model,
        reward_funcs=reward_func,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        reward_processing_classes=reward_tok,
        peft_config=peft_config(cfg.lora, "CAUSAL_LM"),
    )
    callback = watch(trainer, curves, algorithm, quiet=cfg.quiet)
    output = fit(trainer, resume, curves, callback, cfg.report_to)

    rewards = [row["reward"] for row in curves.rows() if row.get("reward") is not None]
    metrics: dict[str, Any] = {
        "recipe": algorithm,
        "model": cfg.model,
        "data": cfg.dataset or cfg.prompts,
        "reward_kind": cfg.reward.kind,
        "prompts": len(prompts),
        "prompts_dropped_long": dropped,
        "lora": cfg.lora.enabled,
        "reference_copy": getattr(trainer, "ref_model", None) is not None,
        "steps": trainer.state.global_step,
        "resumed_from_step": resume.step,
        "train_loss": output.training_loss,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "last": dict(callback.last),
    }
    if cfg.reward.kind != "model":
        metrics["judge_calls"], metrics["judge_errors"] = reward_func.calls, reward_func.errors
    save_model(trainer.model, tokenizer, out)
    curves.plot()
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["config"] = asdict(cfg)
    write_metrics(out, metrics)
    resume.finish()
    return TrainResult(out, metrics, curves.path)


def train_grpo(cfg: OnlineTrainConfig, **kwargs: Any) -> TrainResult:
    """GRPO (see :func:`train_online`)."""
    return train_online(cfg, "grpo", **kwargs)


def train_rloo(cfg: OnlineTrainConfig, **kwargs: Any) -> TrainResult:
    """RLOO (see :func:`train_online`)."""
    return train_online(cfg, "rloo", **kwargs)
