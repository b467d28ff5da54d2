"""The tensor side of PPO for language models: masks, whitening, KL rewards, GAE, clipped
losses, the KL controllers, and the model-facing pieces they need (left padding, a forward pass
over prompt + response, a value head on a causal LM, a plain sampler). No config, no files;
:mod:`rlaif.train.ppo` is the recipe around them.

The math functions take tensors and nothing else, so each is tested on numbers worked out by
hand (``tests/test_ppo.py``).

Shapes: ``B`` rollouts (one completion per prompt) by ``T`` response tokens. ``mask`` is 1.0 on
a response's valid tokens (up to and including its first EOS) and 0.0 on the padding after it.
Token ``t`` is the action taken in state ``s_t`` = prompt + response[:t]; ``values[:, t]`` is
``V(s_t)``. The semantics follow "The N Implementation Details of RLHF with PPO" (Huang et al.,
2024) and TRL's former ``PPOTrainer`` (PPOv2):

* per-token reward ``r_t = -kl_coef * (log pi(a_t|s_t) - log ref(a_t|s_t))``, plus the
  sequence's score at its last valid token (:func:`kl_rewards`);
* GAE over the valid tokens, with ``V = 0`` after the last one (:func:`gae`);
* clipped policy and value losses as masked means over all valid tokens of a minibatch;
* an adaptive KL coefficient as in Ziegler et al. (2019) (:class:`AdaptiveKLController`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "PolicyWithValueHead",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_estimates",
    "kl_rewards",
    "last_token_index",
    "left_pad",
    "lm_forward",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "response_mask",
    "sample_responses",
    "value_loss",
    "whiten",
]


# -- masks and masked statistics ----------------------------------------------------------------


def response_mask(tokens: Tensor, eos_ids: int | Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """Mask of the valid response tokens: everything up to and including the first EOS.

    The EOS token itself is an action the policy chose, so it is kept; every token after it is
    padding (whatever id it has: with ``pad == eos`` the ids alone cannot tell them apart).

    Args:
        tokens: ``(B, T)`` sampled response ids.
        eos_ids: the stop token id (or ids, e.g. ``<|im_end|>`` and ``<|endoftext|>``);
            ``None`` or empty means no stop token (every token is valid).

    Returns:
        ``(mask, has_eos)``: a float ``(B, T)`` mask and a bool ``(B,)`` telling which rows
        stopped with an EOS (rows that did not were cut at ``T``, max_new_tokens).

    Example: tokens ``[[5, 2, 2, 7], [5, 6, 7, 8]]`` with ``eos_ids=2`` give mask
    ``[[1, 1, 0, 0], [1, 1, 1, 1]]`` and ``has_eos = [True, False]``.
    """
    ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or [])
    is_eos = torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
    # eos_before[t] counts the EOS tokens strictly before t: a token is valid while it is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).float(), is_eos.any(dim=1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of each row's last valid token, ``(B,)`` long (0 for an empty row).

    Valid tokens form a prefix of the row, so the last one is at ``sum(mask) - 1``.
    """
    return (mask.sum(dim=1).long() - 1).clamp(min=0)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1 (over ``dim``, or over everything)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked entries; Bessel-corrected when ``unbiased`` (n > 1).

    Example: ``x = [1, 2, 3, 100]`` with mask ``[1, 1, 1, 0]`` has mean 2, squared deviations
    ``1, 0, 1``, so the biased variance is 2/3 and the unbiased one 2/2 = 1.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the mean and (unbiased) variance of its masked entries.

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back, so only
    the scale changes. Entries outside the mask are transformed too but mean nothing; callers
    multiply by the mask where it matters.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def whiten(x: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """:func:`masked_whiten` over every entry of ``x`` (e.g. a batch of sequence scores).

    A single entry has no variance; it is left as is (or moved to 0 when ``shift_mean``).
    """
    if x.numel() < 2:
        return x - x if shift_mean else x.clone()
    return masked_whiten(x, torch.ones_like(x), shift_mean=shift_mean, eps=eps)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over valid tokens (NaN if returns are flat).

    1 means the value head predicts the returns exactly, 0 no better than their mean.
    """
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns


# -- log-probabilities ---------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)[token]`` per position: ``(B, T, V), (B, T) -> (B, T)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax at each position, ``(B, T, V) -> (B, T)``, in nats."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


# -- rewards ------------------------------------------------------------------------------------


def kl_estimates(logprobs: Tensor, ref_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token estimates of KL(pi || ref) from tokens sampled from pi.

    ``k1 = log pi - log ref`` is unbiased but can be negative per token; it is the one that
    goes into the reward (its sum over a sequence is the sequence's log-ratio).
    ``k3 = (r - 1) - log r`` with ``r = ref / pi`` is unbiased too, never negative and has lower
    variance (Schulman, "Approximating KL divergence", 2020); it is reported, not optimized.

    Example: ``log pi = -1``, ``log ref = -2`` give ``k1 = 1`` and
    ``k3 = (e^-1 - 1) + 1 = e^-1 = 0.3679``.
    """
    k1 = logprobs - ref_logprobs
    log_ratio = ref_logprobs - logprobs
    k3 = torch.expm1(log_ratio) - log_ratio
    return k1, k3


def kl_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: a KL penalty at every valid token plus the score at the last one.

    Args:
        scores: ``(B,)`` sequence scores (reward model or reward function, after penalties
            and optional whitening).
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens under the rollout policy.
        ref_logprobs: ``(B, T)`` the same under the reference model.
        mask: ``(B, T)`` valid-token mask.
        kl_coef: the KL coefficient beta.

    Returns:
        ``(rewards, kl)``, both ``(B, T)`` and zero on padding: ``kl`` is the per-token k1
        estimate, ``rewards = -kl_coef * kl`` with ``scores`` added at each last valid token.

    Example: logprobs ``[-1, -2, -3]``, ref ``[-1.5, -1.5, -3]``, all valid, score 2,
    beta 0.1: kl ``[0.5, -0.5, 0]``, rewards ``[-0.05, 0.05, 2.0]``.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, kl


# -- advantages ---------------------------------------------------------------------------------


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016), backwards over valid tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    where ``V`` and ``A`` past the last valid token are 0 (the episode ends there).

    Args:
        rewards: ``(B, T)`` per-token rewards (0 on padding).
        values: ``(B, T)`` value estimates ``V(s_t)`` from the rollout.
        mask: ``(B, T)`` valid-token mask (a prefix of each row).
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, ``(B, T)``, zero on padding; ``returns = advantages +
        values`` (the value head's regression target).
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # On padding delta is 0 and the recursion restarts from 0 at the last valid token.
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


# -- losses -------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate, negated to be minimized, as a masked mean over tokens.

    ``ratio = exp(logp - logp_old)``; per token ``max(-A * ratio, -A * clip(ratio, 1 - eps,
    1 + eps))``. With ``A > 0`` the gain stops growing above ``1 + eps``; with ``A < 0`` below
    ``1 - eps``; the pessimistic (larger) loss is always kept.

    Returns:
        ``(loss, stats)`` where stats hold ``clipfrac`` (share of tokens where the clipped term
        won) and ``approx_kl`` (``0.5 * mean((logp - logp_old)^2)``, as PPOv2 reported), both
        detached.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * max((V - R)^2, (clip(V, V_old +- eps_v) - R)^2)``, masked mean.

    The clip keeps one update from moving a value estimate more than ``cliprange_value`` away
    from its rollout value; taking the max makes the clip a pessimistic bound, as for the policy.

    Returns:
        ``(loss, stats)`` with ``vf_clipfrac``, the share of tokens where the clipped error won.
    """
    clipped_values = old_values + torch.clamp(
        values - old_values, -cliprange_value, cliprange_value
    )
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, stats


# -- KL coefficient -----------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Keep the coefficient; returns it."""
        return self.value


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. (2019), "Fine-Tuning LMs from Human Preferences".

    After each rollout batch: ``e = clip(kl / target - 1, -0.2, 0.2)`` and
    ``kl_coef *= 1 + e * n_steps / horizon``. Above the target the penalty grows, below it
    shrinks, by at most 20 % per ``horizon`` samples.

    Args:
        init_kl_coef: starting coefficient.
        target: the sequence-level KL aimed at (nats).
        horizon: samples over which a 20 % correction is made.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient after a batch of ``n_steps`` samples; returns the new value.

        Example: coef 0.1, target 6, horizon 10000: a batch of 256 with KL 9 gives
        ``e = clip(0.5) = 0.2`` and ``0.1 * (1 + 0.2 * 256 / 10000) = 0.100512``.
        """
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


# -- the model side -----------------------------------------------------------------------------


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Tensor, Tensor]:
    """``(ids, attention_mask)`` of token lists padded on the left to the longest, so every
    row's next token is sampled at the same column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _accepts_logits_to_keep(lm: Any) -> bool:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # through peft
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def lm_forward(
    lm: Any, input_ids: Tensor, attention_mask: Tensor, n: int, hidden: bool = False
) -> Any:
    """A causal-LM forward pass over left-padded rows whose last ``n`` tokens are a response.

    Positions count only attended tokens (as during sampling), and only the last ``n + 1``
    logits are computed when the model supports ``logits_to_keep``: the full-vocabulary logits
    of a long prompt would be most of the memory. ``out.logits[:, -(n + 1) : -1]`` predict the
    response tokens.
    """
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "position_ids": position_ids}
    if _accepts_logits_to_keep(lm):
        kwargs["logits_to_keep"] = n + 1
    return lm(input_ids=input_ids, output_hidden_states=hidden, use_cache=False, **kwargs)


class PolicyWithValueHead(nn.Module):
    """A causal LM (possibly a peft model) plus a scalar value head on its last hidden state.

    The head is one ``Linear(hidden, 1)`` in fp32, started at zero as in lm-human-preferences:
    the first values are 0, not noise that GAE would turn into random advantages. It shares the
    LM's body, so the value loss (scaled by ``vf_coef``) also trains the body, as TRL's former
    ``AutoModelForCausalLMWithValueHead`` did.

    Args:
        lm: the causal LM; ``lm.config`` gives the hidden size.
    """

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm
        width = lm.config.get_text_config().hidden_size
        device = next(lm.parameters()).device
        self.v_head = nn.Linear(width, 1, device=device, dtype=torch.float32)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, n_response: int
    ) -> tuple[Tensor, Tensor]:
        """Logits ``(B, n, V)`` predicting the last ``n`` tokens, and the values ``(B, n)`` of
        the states before them (``values[:, t] = V(prompt + response[:t])``)."""
        out = lm_forward(self.lm, input_ids, attention_mask, n_response, hidden=True)
        cut = slice(-(n_response + 1), -1)
        values = self.v_head(out.hidden_states[-1][:, cut].float()).squeeze(-1)
        return out.logits[:, cut], values


def sample_responses(
    lm: Any,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_ids: Sequence[int],
    pad_id: int,
    generator: torch.Generator,
) -> Tensor:
    """Sample completions token by token from ``softmax(logits / temperature)``, with a KV cache.

    Our own loop rather than ``generate()``: a model's ``generation_config.json`` (top-k,
    top-p, repetition penalty, ...) fills in whatever is not set explicitly, and any of them
    would make the tokens come from a distribution other than the one PPO's ratios assume.
    Call it under ``torch.inference_mode()``.

    Args:
        lm: the causal LM.
        prompt_ids: ``(B, P)`` left-padded prompts.
        prompt_mask: ``(B, P)`` their attention mask.
        max_new_tokens: the most tokens to sample per row.
        temperature: softmax temperature (> 0).
        eos_ids: tokens that end a completion.
        pad_id: written after a row's EOS.
        generator: the random stream (on the model's device).

    Returns:
        ``(B, R)`` token ids, ``R <= max_new_tokens`` (fewer when every row stopped early).
    """
    eos = torch.tensor(list(eos_ids), device=prompt_ids.device)
    attn = prompt_mask
    pos = (attn.long().cumsum(1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(lm) else {}
    out = lm(input_ids=prompt_ids, attention_mask=attn, position_ids=pos, use_cache=True, **extra)
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= torch.isin(tok, eos)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = lm(
            input_ids=tok[:, None],
            attention_mask=attn,
            position_ids=next_pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)
