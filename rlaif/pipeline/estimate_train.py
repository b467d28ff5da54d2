"""The ``--dry-run`` estimate of a training step: optimizer steps, rows, tokens, and for online
RL the completions it samples and the reward calls that score them.

What is exact and what is not:

* **steps**: ``max_steps`` (sft, dpo, reward, grpo, rloo) or ``total_steps`` (ppo) is exactly
  what trains. With ``max_steps: -1`` the trainer derives the steps from ``epochs`` and the
  rows as TRL does on one device (``ceil(epochs x ceil(ceil(rows / batch_size) /
  grad_accum))``); a trainer that drops over-long rows makes fewer, hence ``≈``.
* **rows**: counted in the data when it exists (the train split the trainer reads). Before the
  data step that makes it has run, the estimate of that step bounds them: every candidate pair
  (or prompt, for the SFT rows) becomes at most one row, so ``≤``.
* **tokens**: what the trainer reads, prompt and responses through the starting model's
  tokenizer (each sequence capped at ``max_length``): examples seen x their mean length, so
  ``≈``. Online RL: the prompts of every completion plus ``max_completion_length`` per
  completion, an upper bound.
* **online RL** (grpo, rloo): ``batch_size x grad_accum`` completions per optimizer step
  (``num_generations`` per prompt; divided by ``trl.num_iterations`` when set); ppo:
  ``batch_size`` per step. Each completion is scored once by the reward: a reward-model
  forward pass, ``2 x principles_k`` judge requests (both orders), or a rule / Python check.
  The judge of a reward is called directly (no call cache, no budget).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.pipeline.estimate_base import CountingModel, RowsBound
from rlaif.sources import read_prompts

SAMPLE = 1000  # rows whose lengths are measured; the mean of these stands for the rest


@dataclass
class TrainEstimate:
    """What one training step will do.

    Attributes:
        name, trainer: the step and its recipe.
        steps: optimizer steps (PPO: rollout batches); ``steps_basis`` says where they come from.
        exact_steps: ``steps`` is what trains (``max_steps`` / ``total_steps``).
        rows: training rows (pairs, chat rows or prompts), ``rows_basis`` how they were found;
            None when unknown.
        rows_bound: ``rows`` is an upper bound (the data is not made yet).
        tokens: about how many tokens the trainer reads (None: unknown).
        generations: completions sampled (online RL).
        generated_tokens: the most tokens those completions may have.
        reward_calls: completions scored; ``reward`` says by what.
        judge_requests: requests to a judge model for those scores (``reward.kind: judge``).
        done: the step finished earlier (skipped on resume while its inputs are unchanged).
        resumed: a killed run of the same settings left a complete checkpoint at this step:
            it continues from there (steps, tokens and completions count what is left).
    """

    name: str
    trainer: str
    steps: int | None = None
    steps_basis: str = ""
    exact_steps: bool = False
    rows: int | None = None
    rows_basis: str = ""
    rows_bound: bool = False
    tokens: int | None = None
    generations: int = 0
    generated_tokens: int = 0
    reward_calls: int = 0
    reward: str = ""
    judge_requests: int = 0
    done: bool = False
    resumed: int = 0  # the checkpoint step a killed run continues from (0: from the start)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def _messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        return [{"role": str(m.get("role", role)), "content": str(m.get("content", ""))}
                for m in value if isinstance(m, dict)]  # fmt: skip
    return [{"role": role, "content": str(value)}]


def _offline_rows(trainer: str, tcfg: Any, count: CountingModel) -> tuple[int, float, str]:
    """(train rows, mean tokens per row, source) of an sft / dpo / reward step's data."""
    evaluate = getattr(tcfg, "eval_at_end", True)
    split = tcfg.test_size if evaluate else 0.0
    if trainer == "sft":
        from rlaif.train.sft import load_sft_rows

        data, source, _ = load_sft_rows(tcfg.dataset, split, tcfg.seed)
        train = data["train"]
        seqs = [
            [*r["prompt"], *r["completion"]] for r in train.select(range(min(SAMPLE, len(train))))
        ]
        lengths = [min(count.count(s), tcfg.max_length) for s in seqs]
        return len(train), _mean(lengths), str(source)
    from rlaif.train.data import held_out_from, load_preferences

    data = load_preferences(tcfg.dataset, split, tcfg.seed)
    if getattr(tcfg, "eval_dataset", "") and (trainer == "reward" or evaluate):
        data = held_out_from(data, tcfg.eval_dataset, tcfg.test_size, tcfg.seed)
    train = data["train"]
    lengths = []
    for row in train.select(range(min(SAMPLE, len(train)))):
        prompt = _messages(row["prompt"], "user")
        lengths.append(sum(
            min(count.count(prompt + _messages(row[side], "assistant")), tcfg.max_length)
            for side in ("chosen", "rejected")
        ))  # fmt: skip
    return len(train), _mean(lengths), str(tcfg.dataset)


def _prompts(tcfg: Any, count: CountingModel, items: list | None) -> tuple[int, float, str]:
    """(prompts, mean prompt tokens, source) of an online RL step; the trainer leaves out
    those longer than ``max_length - max_completion_length``, which are counted here."""
    if tcfg.prompts:
        source = "the pipeline's prompts" if items is not None else tcfg.prompts
        if items is None:  # the step's own prompt file
            items, _ = read_prompts(Path(tcfg.prompts), field=tcfg.prompt_field, limit=tcfg.limit)
        convs = [it.messages() for it in items[: tcfg.limit]]
    else:
        from rlaif.train.data import load_preferences

        train = load_preferences(tcfg.dataset, 0.0, tcfg.seed, columns=("prompt",))["train"]
        n = len(train) if tcfg.limit is None else min(tcfg.limit, len(train))
        convs = [_messages(r["prompt"], "user") for r in train.select(range(min(SAMPLE, n)))]
        convs += [[]] * (n - len(convs))  # counted at the measured mean below
        source = str(tcfg.dataset)
    measured = [count.count(c) for c in convs[:SAMPLE] if c]
    return len(convs), _mean(measured), source


def estimate_training(
    name: str,
    trainer: str,
    tcfg: Any,
    count: CountingModel,
    *,
    upstream: RowsBound | None = None,
    items: list | None = None,
    done: bool = False,
    out: Path | None = None,
) -> TrainEstimate:
    """What a training step with config ``tcfg`` will do.

    Args:
        name, trainer: the step and its recipe.
        tcfg: its training config, as the pipeline builds it.
        count: the starting model's token counter.
        upstream: the bound of the rows its data step will export, when that data does not
            exist yet (None: read the data).
        items: the pipeline's prompts, which an online step on ``prompts`` samples on.
        done: the step finished earlier.
        out: its folder, where a killed run of it left checkpoints (None: not looked for).
    """
    est = TrainEstimate(name, trainer, done=done)
    if trainer in ("sft", "dpo", "reward"):
        _offline(est, tcfg, count, upstream)
    else:
        _online(est, tcfg, count, upstream, items)
    step = resumed_at(out, tcfg) if out is not None and not done else 0
    if est.steps and 0 < step < est.steps:
        left = (est.steps - step) / est.steps
        est.resumed, est.steps = step, est.steps - step
        est.steps_basis += f"; {step} done before a kill (resumes from its checkpoint)"
        est.tokens = None if est.tokens is None else round(est.tokens * left)
        est.generations = round(est.generations * left)
        est.generated_tokens = round(est.generated_tokens * left)
        est.reward_calls = round(est.reward_calls * left)
        est.judge_requests = round(est.judge_requests * left)
    return est


def resumed_at(out: Path, tcfg: Any) -> int:
    """The step of the last complete checkpoint a killed run of ``tcfg`` left in ``out``
    (:mod:`rlaif.train.checkpoints`), 0 when there is none of these settings."""
    import json

    from rlaif.train.checkpoints import CHECKPOINTS, RUN, STATE, complete, settings_hash

    root = Path(out) / CHECKPOINTS
    try:
        if json.loads((root / RUN).read_text(encoding="utf-8"))["settings"] != settings_hash(tcfg):
            return 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return next((step for step, path in reversed(complete(root)) if (path / STATE).is_file()), 0)


def _offline(est: TrainEstimate, tcfg: Any, count: CountingModel, up: RowsBound | None) -> None:
    per_step = tcfg.batch_size * tcfg.grad_accum
    if up is not None or not Path(tcfg.dataset).exists():
        if up is None:
            est.rows_basis = f"no data at {tcfg.dataset} and no data step to bound it"
        else:
            est.rows, mean = up.rows, up.tokens_per_row
            est.rows_bound, est.rows_basis = True, up.basis
    else:
        est.rows, mean, source = _offline_rows(est.trainer, tcfg, count)
        est.rows_basis = f"train split of {source}"
    if tcfg.max_steps != -1:
        est.steps, est.exact_steps = tcfg.max_steps, True
        est.steps_basis = f"max_steps; {per_step} rows per step"
        seen = est.steps * per_step
    elif est.rows is not None:
        batches = math.ceil(est.rows / tcfg.batch_size)
        est.steps = math.ceil(tcfg.epochs * max(1, math.ceil(batches / tcfg.grad_accum)))
        est.steps_basis = f"{tcfg.epochs:g} epochs x {est.rows} rows / {per_step} per step"
        seen = tcfg.epochs * est.rows
    else:
        est.steps_basis = f"{tcfg.epochs:g} epochs over rows not known yet"
        return
    if est.rows:
        est.tokens = round(seen * mean)


def _online(
    est: TrainEstimate, tcfg: Any, count: CountingModel, up: RowsBound | None, items: list | None
) -> None:
    judge_data = not tcfg.prompts
    if judge_data and (up is not None or not Path(tcfg.dataset).exists()):
        prompts, mean = (up.rows, up.prompt_tokens) if up is not None else (None, 0.0)
        est.rows_bound, est.rows_basis = True, up.basis if up is not None else "no data yet"
        if prompts is not None and tcfg.limit is not None:
            prompts = min(prompts, tcfg.limit)
    else:
        prompts, mean, source = _prompts(tcfg, count, items)
        est.rows_basis = f"prompts of {source} (less any too long for max_length)"
    est.rows = prompts
    if est.trainer == "ppo":
        est.steps, est.exact_steps = tcfg.total_steps, True
        est.generations = tcfg.total_steps * tcfg.batch_size
        updates = tcfg.total_steps * tcfg.ppo_epochs * (tcfg.batch_size // tcfg.mini_batch_size)
        est.steps_basis = (
            f"total_steps rollout batches of {tcfg.batch_size} completions; {updates} "
            "gradient steps (ppo_epochs x minibatches)"
        )
    else:
        per_step = tcfg.batch_size * tcfg.grad_accum
        iterations = max(1, int(tcfg.trl.get("num_iterations", 1) or 1))
        if tcfg.max_steps != -1:
            est.steps, est.exact_steps = tcfg.max_steps, True
            est.steps_basis = f"max_steps; {per_step} completions per step"
        elif prompts is not None:
            per_epoch = math.ceil(prompts * tcfg.num_generations / per_step)
            est.steps = math.ceil(tcfg.epochs * per_epoch * iterations)
            est.steps_basis = (
                f"{tcfg.epochs:g} epochs x {prompts} prompts x {tcfg.num_generations} "
                f"generations / {per_step} per step"
            )
        if est.steps is not None:
            est.generations = math.ceil(est.steps * per_step / iterations)
    est.generated_tokens = est.generations * tcfg.max_completion_length
    if prompts:
        est.tokens = round(est.generations * mean) + est.generated_tokens
    r = tcfg.reward
    est.reward_calls = est.generations
    if r.kind == "judge":
        est.judge_requests = est.generations * 2 * r.principles_k
        est.reward = f"judge {r.judge_model} ({2 * r.principles_k} requests per completion)"
    elif r.kind == "model":
        est.reward = f"reward model {Path(r.model).name or r.model}"
    else:
        est.reward = f"{r.kind} check (no model call)"
