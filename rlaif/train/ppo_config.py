"""The settings of ``rlaif train ppo``: :class:`PPOConfig`, its fields' meaning and its
value checks. No torch, no training; :mod:`rlaif.train.ppo` is the recipe that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlaif.backends.resolve import DEFAULT_MODEL
from rlaif.errors import ConfigError
from rlaif.train.config import LoraSettings, use_cpu
from rlaif.train.online import REWARD_KINDS, RewardSource
from rlaif.train.trackers import check_trackers

__all__ = ["PPOConfig"]


@dataclass
class PPOConfig:
    """Settings of ``rlaif train ppo``; the YAML maps onto these fields.

    Names shared with the other recipes (``model``, ``dataset``, ``prompts``, ``reward``,
    ``output``, ``lora``, ...) mean the same thing there.

    Attributes:
        model: the policy to train: hub id, local folder or ``.gguf`` file.
        revision: hub revision of ``model``.
        ref_model: reference policy of the KL penalty; None is the starting policy.
        trust_remote_code: allow models that ship their own Python code.
        dataset: preference data whose ``prompt`` column gives the prompts (and whose
            ``reward.reference`` column the judge compares with); a run directory, a
            ``save_to_disk`` folder or a JSONL / Parquet file.
        prompts: a prompt file instead of ``dataset`` (JSONL / CSV / Parquet / saved dataset).
        prompt_field: the column of ``prompts`` holding the prompt.
        label_field: a column of ``prompts`` with each prompt's label, passed to the reward
            as ``label`` (per-label rule checks).
        limit: use at most this many prompts.
        reward: where scores come from: ``kind: model`` (a reward-model folder with one
            output) or ``kind: judge`` (the AI judge: P(completion beats the reference)).
        output: folder for the trained policy, ``metrics.json`` and the curves.
        seed: seed of the prompt order, sampling and minibatch shuffles.
        device: ``auto`` (a GPU if visible), ``cpu`` or ``cuda``.
        total_steps: rollout batches to train on (each followed by ``ppo_epochs`` passes).
        batch_size: prompts (one completion each) per rollout batch.
        mini_batch_size: rows per gradient step; must divide ``batch_size``. Also the chunk
            size of the rollout's forward passes.
        ppo_epochs: passes over each rollout batch.
        learning_rate: AdamW learning rate (eps 1e-5, no weight decay).
        max_grad_norm: gradient-norm clip of each minibatch step.
        max_length: longest prompt + completion in tokens; longer prompts are dropped.
        max_completion_length: tokens per completion at most.
        temperature: sampling temperature of the rollouts, also applied to the logits when
            log-probabilities are computed, so both see the same distribution.
        gamma: discount of GAE (1: none inside a completion).
        lam: lambda of GAE.
        cliprange: epsilon of the clipped policy loss.
        cliprange_value: epsilon of the clipped value loss.
        vf_coef: weight of the value loss in the total loss.
        kl_coef: KL penalty coefficient beta (the start value when adaptive).
        adaptive_kl: adapt ``kl_coef`` towards ``target_kl`` (Ziegler et al., 2019).
        target_kl: the adaptive target of the per-completion KL, in nats.
        horizon: the adaptive horizon, in completions.
        whiten_rewards: whiten the scores across each rollout batch before the KL penalty is
            added, so the penalty weighs the same against any reward model's scale.
        whiten_rewards_shift_mean: with ``whiten_rewards``, also move the scores' mean to 0
            (false only rescales them).
        whiten_advantages: whiten the advantages over the valid tokens of each batch.
        missing_eos_penalty: subtracted from the score of a completion that reached
            ``max_completion_length`` without an EOS; None for no penalty.
        lora: train LoRA adapters instead of all weights; the reference is then the same
            network with its adapters disabled (no second copy in memory).
        quiet: print no progress lines.
        checkpoint_every: save a checkpoint every this many steps (0: never): trainable
            weights, optimizer, KL coefficient, RNG states, prompt order and the curve so far;
            a killed run started again with the same settings and ``output`` resumes from its
            last complete one (see :mod:`rlaif.train.checkpoints`).
        keep_checkpoints: complete checkpoints kept on disk; all go once the model is saved.
        report_to: trackers that get each step's numbers too: ``tensorboard`` (event files in
            ``<output>/tensorboard``), ``trackio``, ``wandb``; keys from the environment only.
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    ref_model: str | None = None
    trust_remote_code: bool = False
    dataset: str = ""
    prompts: str = ""
    prompt_field: str = "prompt"
    label_field: str | None = None
    limit: int | None = None
    reward: RewardSource = field(default_factory=RewardSource)
    output: str = "runs/train/ppo"
    seed: int = 0
    device: str = "auto"
    total_steps: int = 20
    batch_size: int = 8
    mini_batch_size: int = 4
    ppo_epochs: int = 4
    learning_rate: float = 1e-5
    max_grad_norm: float = 1.0
    max_length: int = 384
    max_completion_length: int = 64
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0
    horizon: int = 10000
    whiten_rewards: bool = False
    whiten_rewards_shift_mean: bool = True
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    quiet: bool = False
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    report_to: list[str] = field(default_factory=list)

    def check(self, *, need_reward: bool = True) -> None:
        """Value checks that types alone do not catch.

        Args:
            need_reward: whether ``reward`` must name a source (not when a ``reward_fn`` is
                given in Python).

        Raises:
            ConfigError: naming the field.
        """
        r = self.reward
        rules = [
            ("total_steps", self.total_steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("mini_batch_size", self.mini_batch_size >= 1, "must be >= 1"),
            ("mini_batch_size", self.batch_size % max(1, self.mini_batch_size) == 0,
             f"must divide batch_size ({self.batch_size})"),
            ("ppo_epochs", self.ppo_epochs >= 1, "must be >= 1"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "must be > 0"),
            ("max_completion_length", self.max_completion_length >= 1, "must be >= 1"),
            ("max_length", self.max_length > self.max_completion_length,
             "must be > max_completion_length"),
            ("temperature", self.temperature > 0, "must be > 0 (PPO samples)"),
            ("gamma", 0 <= self.gamma <= 1, "must be in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "must be in [0, 1]"),
            ("cliprange", self.cliprange > 0, "must be > 0"),
            ("cliprange_value", self.cliprange_value > 0, "must be > 0"),
            ("vf_coef", self.vf_coef >= 0, "must be >= 0"),
            ("kl_coef", self.kl_coef >= 0, "must be >= 0"),
            ("target_kl", self.target_kl > 0, "must be > 0"),
            ("horizon", self.horizon >= 1, "must be >= 1"),
            ("limit", self.limit is None or self.limit >= 1, "must be >= 1"),
            ("lora.r", self.lora.r >= 1, "must be >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0 (0: no checkpoints)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("reward.kind", r.kind in REWARD_KINDS, f"must be one of {', '.join(REWARD_KINDS)}"),
            ("reward.mode", r.mode in ("logprob", "reasoning"), "must be logprob or reasoning"),
            ("reward.principles_k", r.principles_k >= 1, "must be >= 1"),
        ]  # fmt: skip
        for name, ok, why in rules:
            if not ok:
                raise ConfigError(why, field=name)
        use_cpu(self.device)
        check_trackers(self.report_to)
        if bool(self.dataset) == bool(self.prompts):
            raise ConfigError("set exactly one of dataset and prompts", field="dataset")
        if need_reward and r.kind == "model" and not r.model:
            raise ConfigError("missing: the reward model folder", field="reward.model")
        if need_reward and r.kind == "judge" and self.prompts:
            raise ConfigError(
                f"the judge needs a reference response: use `dataset` with a '{r.reference}' "
                "column instead of `prompts`",
                field="reward.kind",
            )
