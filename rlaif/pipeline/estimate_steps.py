"""The ``--dry-run`` estimate of a ``steps:`` pipeline, step by step, in the order they run:
a data step's model calls (:func:`rlaif.pipeline.estimate.estimate_pipeline` of its folder),
a training step's steps, rows and tokens (:mod:`rlaif.pipeline.estimate_train`), an eval
step's model calls (:mod:`rlaif.pipeline.estimate_eval`).

A step is *finished* when its ``done.json`` is there and every step it builds on is finished
(a data step also has nothing left to call). A model no finished step has made yet is counted
as the base model (same tokenizer, same request count, same token bounds), and the rows of a
data step not finished yet are bounded by that step's estimate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rlaif.calls.budget import spent_in_run
from rlaif.config.schema import ModelConfig, PipelineConfig
from rlaif.pipeline.done import read_done
from rlaif.pipeline.estimate import estimate_pipeline
from rlaif.pipeline.estimate_base import CountingModel, Estimate, Models
from rlaif.pipeline.estimate_eval import estimate_eval
from rlaif.pipeline.estimate_post import stand_in
from rlaif.pipeline.estimate_train import estimate_training
from rlaif.pipeline.plan import PlannedStep, plan_steps
from rlaif.pipeline.step_runner import (
    _Steps,
    data_config,
    eval_judge,
    eval_reward,
    train_config,
)
from rlaif.sources import read_pipeline_prompts
from rlaif.train.recipes import ONLINE_TRAINERS


class _Estimating(_Steps):
    """The step runner's wiring, with a model no finished step has made yet counted as the
    base model."""

    def model(self, ref: str) -> ModelConfig:
        if ref != "base" and read_done(self.folder(ref)) is None:
            return self.cfg.model
        return super().model(ref)

    def origin(self, ref: str) -> dict[str, Any] | None:
        return None


def estimate_steps(
    cfg: PipelineConfig, *, out: str | Path | None = None, retry_errors: bool = False
) -> list[tuple[PlannedStep, Estimate]]:
    """Each step of the plan with the estimate of what it still needs.

    Returns:
        (step, estimate) in plan order: a data or eval step's model calls in ``stages``; a
        training step's :class:`~rlaif.pipeline.estimate_train.TrainEstimate` in ``train``.
    """
    run_dir = Path(out or cfg.output)
    state = _Estimating(cfg, run_dir, retry_errors, sys.stderr)
    model = Models()
    base = model(cfg.model)
    plan = plan_steps(cfg)
    items = None
    if any(p.kind == "train" and p.trainer in ONLINE_TRAINERS for p in plan):
        items, _ = read_pipeline_prompts(cfg)
    finished: set[str] = {"base"}
    data: dict[str, Estimate] = {}
    rows: list[tuple[PlannedStep, Estimate]] = []
    for p in plan:
        folder = state.folder(p.name)
        if p.kind == "data":
            sub = data_config(state, p)
            est = estimate_pipeline(sub, out=sub.output, retry_errors=retry_errors)
            if p.samples_from is not None:  # its samples are copied from that step, not drawn
                est.stages = [st for st in est.stages if st.name != "sample"]
            data[p.name] = est
            deps = [p.model, p.judge_model, p.scorer, p.samples_from]
            ok = not est.total.calls
        elif p.kind == "train":
            tcfg = train_config(state, p)
            deps = [p.model, p.data, p.reward, p.eval_data]
            ok = all(d in finished for d in deps if d)
            up = None
            if p.data and p.data not in finished:
                up = data[p.data].exports.get(p.dataset)
            t = estimate_training(p.name, p.trainer, tcfg, base, upstream=up, items=items,
                                  done=ok and read_done(folder) is not None,
                                  out=folder if ok else None)  # fmt: skip
            est = Estimate(cfg.name, folder, 0, read_done(folder) is not None, budget=cfg.budget)
            est.train = [t]
        else:
            est = _eval(cfg, state, plan, p, model, base, finished)
            deps = [p.model, p.baseline]
            ok = True
        if ok and read_done(folder) is not None and all(d in finished for d in deps if d):
            finished.add(p.name)
        est.counting = model.counting() | est.counting
        rows.append((p, est))
    return rows


def _eval(cfg: PipelineConfig, state: _Estimating, plan: list[PlannedStep], p: PlannedStep,
          model: Any, base: CountingModel, finished: set[str]) -> Estimate:  # fmt: skip
    ev = p.step.eval
    assert ev is not None
    folder = state.folder(p.name)
    known = {ref: ref in finished for ref in (p.model, p.baseline)}
    counted = {
        ref: model(state.model(ref)) if known[ref] else stand_in(str(state.folder(ref)), base)
        for ref in (p.model, p.baseline)
    }
    js = eval_judge(state, plan, p)
    judge = model(ev.judge or (js.model if js else None) or cfg.model)
    e = estimate_eval(cfg, ev, folder, counted[p.model], known[p.model], counted[p.baseline],
                      judge, js, eval_reward(plan, p) is not None, known[p.baseline])  # fmt: skip
    cache = folder / "cache" / "calls.jsonl"
    est = Estimate(cfg.name, folder, sum(e.prompts.values()), cache.exists(),
                   budget=cfg.budget, spent=spent_in_run(cache))  # fmt: skip
    est.stages, est.notes = e.stages, e.notes()
    return est
