"""After the data stages: the ``stages.train`` steps in order, then ``stages.eval``.

How each training step is wired to the run is :mod:`rlaif.pipeline.train_steps`; the
evaluation is :mod:`rlaif.pipeline.eval_step`; how a finished step is recognised is
:mod:`rlaif.pipeline.done`.

Layout of a run directory::

    train/prompts.jsonl      the run's prompts, for the online RL steps (ppo, grpo, rloo)
    train/<step>/            model, metrics.json, curves.jsonl + curves.png, done.json
    train/summary.json       every step: status, folder, seconds, headline metrics
    eval/                    eval.json, responses.jsonl, plots, cache/, done.json

Resume: ``done.json`` is written last, atomically, and holds the step's hash: its resolved
training config, its input data and the hashes of the steps it builds on. A step whose
``done.json`` matches is skipped without loading anything; a killed step of the same hash
continues from its last checkpoint (``train_steps.run_training``); any other step's folder is
removed and the step trains again from the start, and so does every later step that uses its
output. The evaluation works the same way, and its model calls are
cached in ``eval/cache/``, so a killed evaluation resumes without repeating them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rlaif.config.schema import PipelineConfig
from rlaif.pipeline.done import write_json
from rlaif.pipeline.eval_step import run_stage_eval
from rlaif.pipeline.train_steps import PROMPTS, StepResult, train_step, write_prompts
from rlaif.sources import PromptItem
from rlaif.train.recipes import ONLINE_TRAINERS


@dataclass
class PostResult:
    """The training steps, the evaluation (None without ``stages.eval``) and its model calls."""

    steps: list[StepResult] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps], "eval": self.eval}


def run_post(
    cfg: PipelineConfig, run_dir: Path, items: list[PromptItem], stream: TextIO
) -> PostResult:
    """Run (or resume) the training steps and the evaluation of a pipeline.

    Args:
        cfg: the validated pipeline config.
        run_dir: the run directory, whose exports the steps read.
        items: the run's prompts (the online RL steps sample on them).
        stream: where the step lines go (the recipes print their own progress to stderr).

    Returns:
        The steps, the evaluation summary and the evaluation's model-call counts; also
        written to ``train/summary.json``.

    Raises:
        ConfigError, DataError, ModelError: one line, naming what is wrong.
    """
    run_dir = Path(run_dir)
    result = PostResult()
    if any(s.trainer in ONLINE_TRAINERS for s in cfg.stages.train):
        write_prompts(items, run_dir / "train" / PROMPTS)
    upstream: dict[str, str] = {}  # model folder -> hash of the step that wrote it
    for index in range(len(cfg.stages.train)):
        step = train_step(cfg, index, run_dir, upstream, stream)
        upstream[str(step.out_dir)] = step.hash
        result.steps.append(step)
        write_json(run_dir / "train" / "summary.json", result.to_dict())
    if cfg.stages.eval is not None:
        result.eval, result.stats = run_stage_eval(cfg, run_dir, result.steps, stream)
        if cfg.stages.train:
            write_json(run_dir / "train" / "summary.json", result.to_dict())
    return result
