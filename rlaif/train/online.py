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
from rlaif.train.curves import CurveLogger, quiet_bars, watch, write_metrics
from rlaif.train.data import load_preferences


@dataclass
class RewardSource:
    """Where rewards come from.

    Attributes:
        kind: ``model`` (a trained reward model) or ``judge`` (the AI judge).
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
            ("reward.kind", r.kind in ("model", "judge"), "must be model or judge"),
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


def _text(value: Any) -> str:
    """A response as text: a string, or the last message of a message list."""
    if isinstance(value, list):
        return str(value[-1]["content"]) if value else ""
    return str(value)


class JudgeReward:
    """A TRL reward function: P(completion better than the reference) from the AI judge.

    Args:
        backend: the judge model (any :class:`rlaif.backends.Backend`).
        constitution: where judge principles are drawn from (per completion, seeded).
        book: the prompt templates.
        cfg: a :class:`rlaif.stages.judge.JudgeConfig`.
        reference: the dataset column with the response to beat.
        seed: seed of the principle draw.
        system: system prompt of the judged conversation.
    """

    __name__ = "judge"  # TRL logs each reward function under its name

    def __init__(
        self,
        backend: Any,
        constitution: Any,
        book: Any,
        cfg: Any,
        *,
        reference: str = "chosen",
        seed: int = 0,
        system: str | None = None,
    ) -> None:
        self.backend, self.constitution, self.book, self.cfg = backend, constitution, book, cfg
        self.reference, self.seed, self.system = reference, seed, system
        self.calls = 0
        self.errors = 0

    def __call__(
        self, prompts: list[Any], completions: list[Any], **kwargs: Any
    ) -> list[float | None]:
        """One reward per completion; None where the judge failed."""
        from rlaif.stages.judge import (
            ensemble,
            judge_principles,
            judge_requests,
            verdict_from_logprobs,
            verdict_from_texts,
        )
        from rlaif.store import content_hash

        refs = kwargs.get(self.reference)
        if refs is None:
            raise DataError(f"the data has no '{self.reference}' column", field="reward.reference")
        jobs = []  # (completion index, principle id, order-1 request, order-2 request)
        for i, (prompt, completion, ref) in enumerate(zip(prompts, completions, refs, strict=True)):
            convo = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            a, b = _text(completion), _text(ref)
            pair_id = content_hash([convo, a, b])
            k = self.cfg.principles_k
            for principle in judge_principles(self.constitution, k, self.seed, pair_id):
                r1, r2 = judge_requests(
                    self.book, convo, a, b, principle, self.cfg, system=self.system
                )
                jobs.append((i, principle.id, r1, r2))
        requests = [r for job in jobs for r in job[2:]]
        if self.cfg.mode == "logprob":
            scores = self.backend.score_choices(
                [r.messages for r in requests], list(self.cfg.options)
            )
            answers: list[Any] = scores
        else:
            gens = self.backend.generate([r.messages for r in requests], self.cfg.sampling)
            answers = [g[0].text if g else "" for g in gens]
        model = getattr(self.backend, "model_id", None)
        verdicts: dict[int, list[Any]] = {}
        for n, (i, pid, _, _) in enumerate(jobs):
            one, two = answers[2 * n], answers[2 * n + 1]
            make = verdict_from_logprobs if self.cfg.mode == "logprob" else verdict_from_texts
            verdicts.setdefault(i, []).append(
                make(one, two, self.cfg, principle_id=pid, model=model)
            )
        rewards: list[float | None] = []
        for i in range(len(completions)):
            v = verdicts[i][0] if len(verdicts[i]) == 1 else ensemble(verdicts[i], self.cfg)
            ok = v.status == "ok" and v.p_a_better is not None
            rewards.append(float(v.p_a_better) if ok else None)
        self.calls += len(completions)
        self.errors += sum(r is None for r in rewards)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("judge/error_rate", sum(r is None for r in rewards) / max(1, len(rewards)))
        return rewards


def judge_reward(src: RewardSource, seed: int = 0, backend: Any = None) -> JudgeReward:
    """Build a :class:`JudgeReward` from the config (loading the backend unless given)."""
    from rlaif.backends import load_backend
    from rlaif.backends.base import SamplingParams
    from rlaif.constitution import load_constitution
    from rlaif.prompts import PromptBook
    from rlaif.stages.judge import JudgeConfig

    cfg = JudgeConfig(
        mode=src.mode,
        principles_k=src.principles_k,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=src.max_new_tokens),
    )
    if backend is None:
        backend = load_backend(src.backend, src.judge_model, **src.options)
    return JudgeReward(
        backend,
        load_constitution(src.constitution),
        PromptBook(src.templates),
        cfg,
        reference=src.reference,
        seed=seed,
        system=src.system,
    )


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

        items, _ = read_prompts(Path(cfg.prompts), field=cfg.prompt_field, limit=cfg.limit)
        rows = [{"prompt": item.messages()} for item in items]
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
        reward_func, reward_tok = judge_reward(cfg.reward, cfg.seed, judge_backend), None

    if algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    out = Path(cfg.output)
    curves = CurveLogger(out, fresh=True)
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
    output = trainer.train()

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
        "train_loss": output.training_loss,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "last": dict(callback.last),
    }
    if isinstance(reward_func, JudgeReward):
        metrics["judge_calls"], metrics["judge_errors"] = reward_func.calls, reward_func.errors
    save_model(trainer.model, tokenizer, out)
    curves.plot()
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["config"] = asdict(cfg)
    write_metrics(out, metrics)
    return TrainResult(out, metrics, curves.path)


def train_grpo(cfg: OnlineTrainConfig, **kwargs: Any) -> TrainResult:
    """GRPO (see :func:`train_online`)."""
    return train_online(cfg, "grpo", **kwargs)


def train_rloo(cfg: OnlineTrainConfig, **kwargs: Any) -> TrainResult:
    """RLOO (see :func:`train_online`)."""
    return train_online(cfg, "rloo", **kwargs)
