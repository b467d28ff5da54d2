"""The ``--dry-run`` estimate of what runs after the data stages of a ``stages:`` pipeline:
its ``stages.train`` steps (:mod:`rlaif.pipeline.estimate_train`) and ``stages.eval``
(:mod:`rlaif.pipeline.estimate_eval`), wired as :mod:`rlaif.pipeline.post` wires them.

A training step counts as done when its ``done.json`` is there, the data stages have nothing
left to call and every earlier step is done too (a changed step, or one downstream of a
change, trains again). Until then its data is bounded by the data stages' estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from rlaif.calls.budget import spent_in_run
from rlaif.config.schema import ModelConfig, PipelineConfig
from rlaif.pipeline.done import read_done
from rlaif.pipeline.estimate_base import CountingModel, Estimate
from rlaif.pipeline.estimate_eval import estimate_eval
from rlaif.pipeline.estimate_train import estimate_training
from rlaif.pipeline.train_steps import step_config
from rlaif.sources import PromptItem
from rlaif.train.recipes import ONLINE_TRAINERS, POLICY_TRAINERS


def stand_in(folder: str, base: CountingModel) -> CountingModel:
    """A model not trained yet: its folder as its name, the base model's token counts."""
    return CountingModel(folder, None, base.count, base.how)


def estimate_post(
    cfg: PipelineConfig,
    est: Estimate,
    items: list[PromptItem],
    model: Callable[[ModelConfig], CountingModel],
) -> None:
    """Add the training steps and the evaluation of ``cfg`` to ``est`` (its data stages are
    already in it); ``model`` identifies a model section as the data estimate did."""
    s, run_dir = cfg.stages, est.run_dir
    base = model(cfg.model)
    fresh = est.total.calls > 0  # the data stages will still change their exports
    all_done = not fresh
    for index, step in enumerate(s.train):
        tcfg = step_config(cfg, index, run_dir)
        kind = step.data
        if kind == "auto":  # as post.train_steps picks it
            kind = "sft" if step.trainer == "sft" else "preferences" if s.judge else "pairs"
        reads_data = step.trainer not in ONLINE_TRAINERS or not tcfg.prompts
        upstream = est.exports.get(kind) if fresh and reads_data else None
        all_done = all_done and read_done(run_dir / "train" / step.name) is not None
        est.train.append(
            estimate_training(
                step.name,
                step.trainer,
                tcfg,
                base,
                upstream=upstream,
                items=items,
                done=all_done,
                out=None if fresh else run_dir / "train" / step.name,
            )
        )
    ev = s.eval
    if ev is None:
        return
    policies = [t for t in est.train if t.trainer in POLICY_TRAINERS]
    trained = bool(policies) and policies[-1].done
    folder = str(run_dir / "train" / policies[-1].name) if policies else "policy"
    policy = (
        model(dataclasses.replace(cfg.model, id=folder, revision=None))
        if trained
        else stand_in(folder, base)
    )
    judge = model(ev.judge or (s.judge.model if s.judge else None) or cfg.model)
    reward = ev.reward_model and any(t.trainer == "reward" for t in est.train)
    e = estimate_eval(cfg, ev, run_dir / "eval", policy, trained, base, judge, s.judge, reward)
    est.stages += e.stages
    est.notes += e.notes()
    cache = run_dir / "eval" / "cache" / "calls.jsonl"
    if cache.exists():  # the budget counts the evaluation's cache with the data stages'
        est.spent = est.spent + spent_in_run(cache)
        est.started = True
