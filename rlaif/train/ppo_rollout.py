"""One PPO step's two halves on the model: the rollout (sample completions, then the
policy's and reference's log-probabilities and the values of their tokens) and the PPO epochs
(clipped minibatch updates over that batch). :mod:`rlaif.train.ppo` scores the rollout and
computes the advantages in between; the tensor math is in :mod:`rlaif.train.ppo_math`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlaif.train.ppo_config import PPOConfig

__all__ = ["Rollout", "ppo_epochs", "rollout"]


@dataclass
class Rollout:
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


def rollout(
    policy: Any,
    ref_lm: Any,
    tok: Any,
    prompt_ids: Any,
    prompt_mask: Any,
    cfg: PPOConfig,
    eos_ids: list[int],
    gen: Any,
    autocast: Callable[[], Any],
) -> Rollout:
    """Sample one completion per prompt and score its tokens under the policy and reference.

    Args:
        policy: the :class:`~rlaif.train.ppo_math.PolicyWithValueHead` being trained.
        ref_lm: the frozen reference LM; None when it is ``policy.lm`` with its LoRA adapters
            disabled.
        tok: the tokenizer (its ``pad_token_id`` pads, its decoder gives ``texts``).
        prompt_ids: left-padded prompt token ids, ``(B, P)``.
        prompt_mask: their attention mask, ``(B, P)``.
        cfg: the run's settings (chunk size, temperature, completion length).
        eos_ids: the token ids that end a completion.
        gen: the ``torch.Generator`` of the sampling.
        autocast: a context factory for the forward passes (bf16 on a GPU, else a no-op).

    Returns:
        The batch as :class:`Rollout`, its tensors plain ones that backward may save.
    """
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
    return Rollout(
        input_ids.clone(), attn.clone(), prompt_ids.shape[1], response.clone(), mask.clone(),
        has_eos.clone(), torch.cat(logp).clone(), torch.cat(ref_logp).clone(),
        torch.cat(values).clone() * mask, texts,
    )  # fmt: skip


def ppo_epochs(
    policy: Any,
    optimizer: Any,
    ro: Rollout,
    adv: Any,
    returns: Any,
    cfg: PPOConfig,
    shuffle_gen: Any,
    autocast: Callable[[], Any],
) -> dict[str, float]:
    """``cfg.ppo_epochs`` passes of minibatch updates over one rollout batch.

    Args:
        policy: the policy with value head; its trainable parameters are updated in place.
        optimizer: the optimizer of those parameters.
        ro: the rollout batch (rows with an all-zero mask are skipped).
        adv: advantages, ``(B, R)``.
        returns: value targets, ``(B, R)``.
        cfg: the run's settings (minibatch size, clip ranges, ``vf_coef``, ...).
        shuffle_gen: the ``torch.Generator`` of the minibatch shuffles.
        autocast: a context factory for the forward passes (bf16 on a GPU, else a no-op).

    Returns:
        The mean over all minibatch steps of each statistic (losses, entropy, grad norm, ...).
    """
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
