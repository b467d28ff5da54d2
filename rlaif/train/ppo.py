"""``rlaif train ppo``: PPO against a reward model or the AI judge, with a KL penalty to the
reference policy, the method of the RLHF / RLAIF papers.

TRL 1.x removed its ``PPOTrainer``, so this is a compact loop of our own that keeps the
semantics of TRL's former PPOv2 and of "The N Implementation Details of RLHF with PPO"
(Huang et al., 2024). The settings are :class:`~rlaif.train.ppo_config.PPOConfig`, the
rollout and the minibatch updates are in :mod:`rlaif.train.ppo_rollout`, the tensor math is
in :mod:`rlaif.train.ppo_math`; this module has the rewards, loads the models, runs the loop
and saves. One step:

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlaif.errors import ModelError
from rlaif.progress import Progress
from rlaif.train.checkpoints import load_state, prepare, restore_rng, rng_state, save_state
from rlaif.train.common import (
    TrainResult,
    peft_config,
    resolve_model_path,
    save_model,
    set_cpu_threads,
)
from rlaif.train.config import use_cpu
from rlaif.train.curves import quiet_bars, redacted, write_metrics
from rlaif.train.online import load_prompts, load_reward_model
from rlaif.train.ppo_config import PPOConfig
from rlaif.train.ppo_rollout import ppo_epochs, rollout
from rlaif.train.reward_funcs import build_reward
from rlaif.train.trackers import Tracker

__all__ = ["PPOConfig", "RewardFn", "reward_model_fn", "train_ppo"]

# (prompts as chat messages, completions as text, **extra data columns) -> one score per row;
# None marks a row that could not be scored (it is left out of the update).
RewardFn = Callable[..., Sequence[float | None]]


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
        reward_fn = build_reward(cfg.reward, cfg.seed, judge_backend)
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
    resume = prepare(out, cfg)  # the last complete checkpoint of these settings, if any
    curves = resume.curves()
    order: list[int] = []  # prompt indices still to come in this pass over the prompts
    history: list[dict[str, float]] = []
    streams = {"sample": gen, "shuffle": shuffle_gen}
    if resume.path is not None:
        saved = load_state(resume, policy, optimizer)
        restore_rng(saved["rng"], streams, rng)
        order, history, kl_ctl.value = saved["order"], saved["history"], saved["kl_coef"]
    tracker = Tracker(cfg.report_to, out, redacted(asdict(cfg)), resume.step)
    bar = Progress(cfg.total_steps, "ppo", unit="steps", initial=resume.step, quiet=cfg.quiet)
    with bar:
        for step in range(resume.step + 1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            while len(order) < cfg.batch_size:  # passes over the prompts, each reshuffled
                order += rng.sample(range(len(prompts)), len(prompts))
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            ids, am = M.left_pad([encoded[i] for i in idx], tokenizer.pad_token_id, device)
            ro = rollout(policy, ref_lm, tokenizer, ids, am, cfg, eos_ids, gen, autocast)
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

            stats = ppo_epochs(policy, optimizer, ro, adv, returns, cfg, shuffle_gen, autocast)
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
            tracker.log(step, stats)
            bar.update(1, tokens=int(ro.mask.sum()))
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                state = {"rng": rng_state(streams, rng), "order": order, "history": history,
                         "kl_coef": kl_ctl.value, "curve_rows": len(history)}  # fmt: skip
                save_state(resume, step, policy, optimizer, state)
    tracker.close()

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
        "resumed_from_step": resume.step,
        "checkpoint_seconds": round(resume.seconds, 2),
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
    resume.finish()
    return TrainResult(out, metrics, curves.path)
