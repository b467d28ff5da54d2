"""``rlaif train ppo``: PPO against a reward model or the AI judge, with a KL penalty to the
reference policy, the method of the RLHF / RLAIF papers.

TRL 1.x removed its ``PPOTrainer``, so this is a compact loop of our own that keeps the
semantics of TRL's former PPOv2 and of "The N Implementation Details of RLHF with PPO"
(Huang et al., 2024). The tensor pieces are in :mod:`rlaif.train.ppo_math`. One step:

1. **Rollout.** Sample one completion per prompt (plain softmax sampling at ``temperature``,
   no top-k / top-p, stop at EOS, at most ``max_completion_length`` tokens); tokens after the
   first EOS are padding and masked out. Under ``torch.inference_mode`` compute per response
   token the log-probability under the policy (the "old" policy of this step) and under the
   reference (a frozen copy, or the same network with its LoRA adapters disabled), and the
   value head's ``V(s_t)``. Score each completion with ``reward`` (a reward model, the AI
   judge, or ``reward_fn``); subtract ``missing_eos_penalty`` from completions that never
   stopped; optionally whiten the scores across the batch.
2. **Rewards and advantages.** ``r_t = -kl_coef * (logp - logp_ref)`` at every token plus the
   score at the last one; GAE(gamma, lam) backwards over the valid tokens; ``returns =
   advantages + values``; advantages whitened over the batch.
3. **PPO epochs.** ``ppo_epochs`` passes over shuffled minibatches: clipped policy loss plus
   ``vf_coef`` times the clipped value loss, gradient-norm clipping, AdamW.
4. **KL controller.** Fixed, or adaptive (Ziegler et al., 2019) towards ``target_kl``.

The network stays in eval mode throughout, so dropout never makes the rollout and the update
see different policies. Weights are fp32; on a GPU the forward passes run under bf16 autocast.
A completion the judge could not score (None) is left out of that step's update.

Run: ``rlaif train ppo configs/train/ppo.yaml --set dataset=runs/demo``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlaif.backends.resolve import DEFAULT_MODEL
from rlaif.errors import ConfigError, ModelError
from rlaif.progress import Progress
from rlaif.train.common import (
    CurveLogger,
    LoraSettings,
    TrainResult,
    peft_config,
    quiet_bars,
    resolve_model_path,
    save_model,
    set_cpu_threads,
    use_cpu,
    write_metrics,
)
from rlaif.train.online import RewardSource, judge_reward, load_prompts, load_reward_model

__all__ = ["PPOConfig", "RewardFn", "reward_model_fn", "train_ppo"]

# (prompts as chat messages, completions as text, **extra data columns) -> one score per row;
# None marks a row that could not be scored (it is left out of the update).
RewardFn = Callable[..., Sequence[float | None]]


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
    """

    model: str = DEFAULT_MODEL
    revision: str | None = None
    ref_model: str | None = None
    trust_remote_code: bool = False
    dataset: str = ""
    prompts: str = ""
    prompt_field: str = "prompt"
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
            ("reward.kind", r.kind in ("model", "judge"), "must be model or judge"),
            ("reward.mode", r.mode in ("logprob", "reasoning"), "must be logprob or reasoning"),
            ("reward.principles_k", r.principles_k >= 1, "must be >= 1"),
        ]  # fmt: skip
        for name, ok, why in rules:
            if not ok:
                raise ConfigError(why, field=name)
        use_cpu(self.device)
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


# -- rewards ------------------------------------------------------------------------------------


def reward_model_fn(folder: str, device: str = "cpu", trust_remote_code: bool = False) -> RewardFn:
    """A :data:`RewardFn` scoring with a sequence-classification reward model (one output).

    Each prompt (chat messages) plus the completion as the assistant's turn goes through the
    reward tokenizer's chat template, as TRL's ``RewardTrainer`` formatted its training pairs.

    Args:
        folder: the reward model (``rlaif train reward`` output).
        device: where to run it.
        trust_remote_code: allow custom model code.
    """
    import torch

    model, tok = load_reward_model(folder, trust_remote_code)
    model.to(device).requires_grad_(False)

    def score(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
        texts = [
            tok.apply_chat_template([*p, {"role": "assistant", "content": c}], tokenize=False)
            for p, c in zip(prompts, completions, strict=True)
        ]
        enc = tok(texts, padding=True, add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            return model(**enc.to(device)).logits[:, 0].float().tolist()

    return score


def _scores(reward_fn: RewardFn, prompts: list[Any], texts: list[str], extra: dict) -> list:
    scores = list(reward_fn(prompts, texts, **extra))
    if len(scores) != len(texts):
        raise ModelError(f"the reward gave {len(scores)} scores for {len(texts)} completions")
    out = [None if s is None else float(s) for s in scores]
    if any(s is not None and not math.isfinite(s) for s in out):
        raise ModelError(f"the reward gave a non-finite score: {out}")
    return out


# -- one step -----------------------------------------------------------------------------------


@dataclass
class _Rollout:
    """A batch of sampled completions and what PPO needs of them (``(B, R)`` per token)."""

    input_ids: Any  # left-padded prompt + response
    attn: Any
    n_prompt: int
    response: Any
    mask: Any
    has_eos: Any
    logp: Any  # the rollout ("old") policy
    ref_logp: Any
    values: Any
    texts: list[str]


def _rollout(policy, ref_lm, tok, prompt_ids, prompt_mask, cfg, eos_ids, gen, autocast):
    import torch

    from rlaif.train import ppo_math as M

    lm, pad, mb, T = policy.lm, tok.pad_token_id, cfg.mini_batch_size, cfg.temperature
    with torch.inference_mode(), autocast():
        chunks = [
            M.sample_responses(lm, prompt_ids[s : s + mb], prompt_mask[s : s + mb],
                               cfg.max_completion_length, T, eos_ids, pad, gen)
            for s in range(0, len(prompt_ids), mb)
        ]  # fmt: skip
        R = max(c.shape[1] for c in chunks)
        response = torch.cat([torch.nn.functional.pad(c, (0, R - c.shape[1]), value=pad)
                              for c in chunks])  # fmt: skip
        mask, has_eos = M.response_mask(response, eos_ids)
        input_ids = torch.cat([prompt_ids, response], dim=1)
        attn = torch.cat([prompt_mask, torch.ones_like(response)], dim=1)
        logp, ref_logp, values = [], [], []
        for s in range(0, len(response), mb):
            ids, am, tgt = input_ids[s : s + mb], attn[s : s + mb], response[s : s + mb]
            logits, v = policy(ids, am, R)
            logp.append(M.logprobs_from_logits(logits.float() / T, tgt))
            values.append(v.float())
            if ref_lm is None:  # LoRA: the reference is the base without its adapters
                with lm.disable_adapter():
                    ref_out = M.lm_forward(lm, ids, am, R)
            else:
                ref_out = M.lm_forward(ref_lm, ids, am, R)
            ref_logits = ref_out.logits[:, -(R + 1) : -1]
            ref_logp.append(M.logprobs_from_logits(ref_logits.float() / T, tgt))
    texts = tok.batch_decode(response.masked_fill(mask == 0, pad).tolist(),
                             skip_special_tokens=True)  # fmt: skip
    # Inference tensors cannot be saved for backward: copy them out once.
    return _Rollout(
        input_ids.clone(), attn.clone(), prompt_ids.shape[1], response.clone(), mask.clone(),
        has_eos.clone(), torch.cat(logp).clone(), torch.cat(ref_logp).clone(),
        torch.cat(values).clone() * mask, texts,
    )  # fmt: skip


def _ppo_epochs(policy, optimizer, ro, adv, returns, cfg, shuffle_gen, autocast) -> dict:
    """``cfg.ppo_epochs`` passes of minibatch updates; the mean of each statistic."""
    import torch

    from rlaif.train import ppo_math as M

    acc: dict[str, list[float]] = {}
    rows = torch.nonzero(ro.mask.sum(1) > 0).squeeze(1).cpu()  # rows that were scored
    mb, P = cfg.mini_batch_size, ro.n_prompt
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(cfg.ppo_epochs):
        perm = rows[torch.randperm(len(rows), generator=shuffle_gen)].to(ro.mask.device)
        for s in range(0, len(perm), mb):
            j = perm[s : s + mb]
            r = int(ro.mask[j].sum(1).max())  # drop the padding columns the minibatch shares
            m = ro.mask[j, :r]
            with autocast():
                logits, v = policy(ro.input_ids[j, : P + r], ro.attn[j, : P + r], r)
            logits = logits.float() / cfg.temperature
            logp = M.logprobs_from_logits(logits, ro.response[j, :r])
            pg, pg_stats = M.policy_loss(logp, ro.logp[j, :r], adv[j, :r], m, cfg.cliprange)
            vf, vf_stats = M.value_loss(
                v.float(), ro.values[j, :r], returns[j, :r], m, cfg.cliprange_value
            )
            optimizer.zero_grad(set_to_none=True)
            (pg + cfg.vf_coef * vf).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                entropy = M.masked_mean(M.entropy_from_logits(logits), m)
            row = {"pg_loss": pg, "vf_loss": vf, "entropy": entropy, "grad_norm": grad_norm}
            for k, val in {**row, **pg_stats, **vf_stats}.items():
                acc.setdefault(k, []).append(float(val.detach()))
    return {k: sum(v) / len(v) for k, v in acc.items()}


# -- the recipe ---------------------------------------------------------------------------------


def _load_models(cfg: PPOConfig, device: str) -> tuple[Any, Any, Any]:
    """Tokenizer, policy LM (peft-wrapped with LoRA) and reference LM (None: adapters off)."""
    from rlaif.train.dpo import load_causal_lm
    from rlaif.train.reward import load_tokenizer

    remote = cfg.trust_remote_code
    path = resolve_model_path(cfg.model, cfg.revision, remote)
    tokenizer = load_tokenizer(path)
    lm = load_causal_lm(path, remote).to(device).eval()
    ref_path = resolve_model_path(cfg.ref_model, None, remote) if cfg.ref_model else path
    ref_lm = None
    if ref_path != path:
        ref_lm = load_causal_lm(ref_path, remote)
    elif not cfg.lora.enabled:
        ref_lm = copy.deepcopy(lm)
    if ref_lm is not None:
        ref_lm.to(device).eval().requires_grad_(False)
    if cfg.lora.enabled:
        from peft import get_peft_model

        lm = get_peft_model(lm, peft_config(cfg.lora, "CAUSAL_LM")).eval()
    return tokenizer, lm, ref_lm


def train_ppo(
    cfg: PPOConfig, reward_fn: RewardFn | None = None, *, judge_backend: Any = None
) -> TrainResult:
    """Train ``cfg.model`` with PPO and save it under ``cfg.output``.

    Args:
        cfg: the run's settings.
        reward_fn: ``(prompts, completions, **columns) -> scores`` used instead of
            ``cfg.reward`` (tests, rule-based rewards). Prompts are chat messages, completions
            decoded text; a score of None leaves that completion out of the update.
        judge_backend: a ready backend for ``reward.kind: judge`` (default: from the config).

    Returns:
        The output folder (a plain model folder ``AutoModelForCausalLM.from_pretrained`` loads,
        LoRA merged), the metrics (mean reward at the start and the end, KL, ...) and the
        curves file.

    Raises:
        ConfigError, DataError, ModelError: one line, naming what is wrong.
    """
    with quiet_bars():  # the progress line says what happens
        return _train_ppo(cfg, reward_fn, judge_backend)


def _train_ppo(cfg: PPOConfig, reward_fn: RewardFn | None, judge_backend: Any) -> TrainResult:
    import torch

    from rlaif.train import ppo_math as M

    started = time.perf_counter()
    cfg.check(need_reward=reward_fn is None)
    device = "cpu" if use_cpu(cfg.device) else "cuda"
    set_cpu_threads(cfg.device)
    torch.manual_seed(cfg.seed)
    source = "function" if reward_fn is not None else cfg.reward.kind
    tokenizer, lm, ref_lm = _load_models(cfg, device)
    data, dropped = load_prompts(cfg, tokenizer)  # type: ignore[arg-type]  # same fields
    if reward_fn is None and cfg.reward.kind == "model":
        reward_fn = reward_model_fn(cfg.reward.model, device, cfg.trust_remote_code)
    elif reward_fn is None:
        reward_fn = judge_reward(cfg.reward, cfg.seed, judge_backend)
    prompts = list(data["prompt"])
    columns = {c: list(data[c]) for c in data.column_names if c != "prompt"}
    encoded = [
        tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        for p in prompts
    ]  # fmt: skip
    gen_eos = getattr(lm.generation_config, "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    eos_ids = sorted({tokenizer.eos_token_id, *gen_eos} - {None})

    policy = M.PolicyWithValueHead(lm)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    kl_ctl: Any = (
        M.AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.horizon)
        if cfg.adaptive_kl
        else M.FixedKLController(cfg.kl_coef)
    )
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = random.Random(cfg.seed)
    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()

    def autocast() -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    out = Path(cfg.output)
    curves = CurveLogger(out, fresh=True)
    order: list[int] = []
    history: list[dict[str, float]] = []
    with Progress(cfg.total_steps, "ppo", unit="steps", quiet=cfg.quiet) as bar:
        for step in range(1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            while len(order) < cfg.batch_size:  # passes over the prompts, each reshuffled
                order += rng.sample(range(len(prompts)), len(prompts))
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            ids, am = M.left_pad([encoded[i] for i in idx], tokenizer.pad_token_id, device)
            ro = _rollout(policy, ref_lm, tokenizer, ids, am, cfg, eos_ids, gen, autocast)
            extra = {c: [v[i] for i in idx] for c, v in columns.items()}
            got = _scores(reward_fn, [prompts[i] for i in idx], ro.texts, extra)
            scored = torch.tensor([s is not None for s in got], device=device)
            if not bool(scored.any()):
                raise ModelError(f"step {step}: the reward scored none of the completions")
            raw = torch.tensor([0.0 if s is None else s for s in got], device=device)
            ro.mask *= scored[:, None].float()  # unscored rows drop out of every loss
            ro.values *= ro.mask

            scores = raw.clone()
            if cfg.missing_eos_penalty is not None:
                scores[~ro.has_eos] -= cfg.missing_eos_penalty
            if cfg.whiten_rewards:
                scores[scored] = M.whiten(scores[scored], cfg.whiten_rewards_shift_mean)
            rewards, kl = M.kl_rewards(scores, ro.logp, ro.ref_logp, ro.mask, kl_ctl.value)
            _, k3 = M.kl_estimates(ro.logp, ro.ref_logp)
            adv, returns = M.gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                adv = M.masked_whiten(adv, ro.mask) * ro.mask

            stats = _ppo_epochs(policy, optimizer, ro, adv, returns, cfg, shuffle_gen, autocast)
            n = float(scored.sum())
            seq_kl = float(kl.sum(1).sum()) / n
            stats.update(
                reward_mean=float(raw[scored].mean()),
                reward_std=float(raw[scored].std()) if n > 1 else 0.0,
                kl=seq_kl,
                kl_k3=float((k3 * ro.mask).sum()) / n,
                kl_coef=kl_ctl.value,
                explained_variance=float(M.explained_variance(ro.values, returns, ro.mask)),
                response_length=float(ro.mask.sum()) / n,
                stop_rate=float(ro.has_eos[scored].float().mean()),
                unscored=len(got) - n,
                seconds=time.perf_counter() - t0,
            )
            kl_ctl.update(seq_kl, int(n))
            history.append(stats)
            curves.log(step, **stats)
            bar.update(1, tokens=int(ro.mask.sum()))

    save_model(lm, tokenizer, out)
    with contextlib.suppress(Exception):  # a plot is a convenience, never a failure
        curves.plot()
    k = max(1, len(history) // 5)
    metrics: dict[str, Any] = {
        "recipe": "ppo",
        "model": cfg.model,
        "data": cfg.dataset or cfg.prompts,
        "reward_kind": source,
        "prompts": len(prompts),
        "prompts_dropped_long": dropped,
        "lora": cfg.lora.enabled,
        "reference_copy": ref_lm is not None,
        "steps": len(history),
        "reward_first": history[0]["reward_mean"],
        "reward_last": history[-1]["reward_mean"],
        "reward_first_steps_mean": sum(h["reward_mean"] for h in history[:k]) / k,
        "reward_last_steps_mean": sum(h["reward_mean"] for h in history[-k:]) / k,
        "steps_in_means": k,
        "kl_max": max(h["kl"] for h in history),
        **{f"final_{name}": v for name, v in history[-1].items()},
    }
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["config"] = asdict(cfg)
    write_metrics(out, metrics)
    return TrainResult(out, metrics, curves.path)
