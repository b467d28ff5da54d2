"""Run a pipeline of ``steps:``: data, training and evaluation steps in order, each able to use
the models earlier steps trained (:mod:`rlaif.pipeline.plan` says what runs).

Layout of a run directory::

    steps/<step>/            a data step: a run directory of its own (records, caches,
                             exports, manifest.json); a training step: the model, metrics,
                             curves; an evaluation: eval.json, responses, plots
    steps/<block>/<k>/<step> the same for round k of a block of rounds
    steps/prompts.jsonl      the pipeline's prompts, for online RL steps (ppo, grpo, rloo)
    steps.json               every step: kind, status, folder, hash, seconds, headline numbers
    rounds.json, rounds.png  each evaluation metric by round, per block (when a block evaluates)
    evals.json, evals.png    every evaluation side by side (when there are several)

Resume is exact: every step has a hash over its settings and its inputs (the hashes of the
steps whose models or data it uses, the prompts, the base model's revision). ``done.json``,
written last, holds it; a step whose ``done.json`` matches is skipped without loading
anything. A data step whose hash changed starts again from an empty folder; one with the same
hash that was killed continues where it stopped (its records and call cache are kept). A
training step that did not finish continues from its last complete checkpoint (every
``checkpoint_every`` steps; :mod:`rlaif.train.checkpoints`). A changed step therefore
re-runs with every step downstream of it, and nothing upstream.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rlaif.config.schema import JudgeStageConfig, ModelConfig, PipelineConfig, StagesConfig
from rlaif.constitution import load_constitution
from rlaif.evaluate.compare import compare_evals, write_evals
from rlaif.evaluate.rounds import round_metrics, write_rounds
from rlaif.export.card import scrub
from rlaif.pipeline.done import DONE, clean, data_hash, model_identity, now, read_done, write_json
from rlaif.pipeline.eval_step import evaluate_policy
from rlaif.pipeline.gc_tuning import run_gc
from rlaif.pipeline.plan import PlannedStep, plan_steps
from rlaif.pipeline.runner import run_pipeline
from rlaif.pipeline.train_steps import (
    HEADLINE,
    StepResult,
    build_config,
    data_path,
    run_training,
    wire,
    write_prompts,
)
from rlaif.sources import dataset_provenance, read_pipeline_prompts
from rlaif.store import RunLock, content_hash
from rlaif.train.recipes import ONLINE_TRAINERS

STEPS = "steps"
SUMMARY = "steps.json"
STARTED = "step.json"  # a data step's hash, written before it starts


@dataclass
class StepOutcome:
    """What one step did. ``status``: ``ran`` (data, eval), ``trained``, or ``skipped``."""

    name: str
    kind: str
    status: str
    dir: Path
    hash: str
    round: int | None = None
    block: str | None = None
    trainer: str = ""
    model: str = "base"
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)  # headline metrics / row counts

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dir"] = str(self.dir)
        return d


@dataclass
class StepsResult:
    run_dir: Path
    steps: list[StepOutcome]
    rounds: dict[str, Any]
    stats: dict[str, int]
    seconds: float


class _Steps:
    """The state of one run of the steps: what each finished step made."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, retry_errors: bool, stream: TextIO):
        self.cfg, self.run_dir, self.retry_errors, self.stream = cfg, run_dir, retry_errors, stream
        self.results: dict[str, StepOutcome] = {}
        self.trained: dict[str, StepResult] = {}  # training step -> its result
        self.upstream: dict[str, str] = {}  # model folder -> hash of the step that wrote it
        self.stats: dict[str, int] = {}
        self._base_id: Any = None

    def folder(self, name: str) -> Path:
        return self.run_dir / STEPS / name

    def base_identity(self) -> Any:
        if self._base_id is None:
            m = self.cfg.model
            self._base_id = model_identity(m.id, m.revision, {}, m.backend)
        return self._base_id

    def model(self, ref: str) -> ModelConfig:
        """The model a reference names, on the pipeline model's backend and options."""
        if ref == "base":
            return self.cfg.model
        return dataclasses.replace(self.cfg.model, id=str(self.folder(ref)), revision=None)

    def identity(self, ref: str) -> Any:
        return self.base_identity() if ref == "base" else {"step": self.trained[ref].hash}

    def origin(self, ref: str) -> dict[str, Any] | None:
        if ref == "base":
            return None
        return {"step": ref, "hash": self.trained[ref].hash}

    def add_stats(self, stats: dict[str, int]) -> None:
        for k, v in stats.items():
            self.stats[k] = self.stats.get(k, 0) + v


def run_steps(
    cfg: PipelineConfig,
    *,
    out: str | Path | None = None,
    retry_errors: bool = False,
    stream: TextIO | None = None,
) -> StepsResult:
    """Run (or resume) a pipeline of ``steps:``.

    Args:
        cfg: the validated pipeline config (with ``steps``).
        out: run directory (default: ``cfg.output``).
        retry_errors: redo requests that failed in an earlier run.
        stream: where progress goes (default stderr).

    Raises:
        ConfigError, DataError, ModelError, StoreError: one line, naming what is wrong.
    """
    t0 = time.perf_counter()
    run_dir = Path(out or cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _Steps(cfg, run_dir, retry_errors, stream or sys.stderr)
    plan = plan_steps(cfg)
    with RunLock(run_dir), run_gc():
        if any(p.kind == "train" and p.trainer in ONLINE_TRAINERS for p in plan):
            items, _ = read_pipeline_prompts(cfg)
            write_prompts(items, run_dir / STEPS / "prompts.jsonl")
        outcomes: list[StepOutcome] = []
        for n, p in enumerate(plan, 1):
            print(f"[step {n}/{len(plan)}] {p.name} ({p.kind})", file=state.stream, flush=True)
            if p.kind == "data":
                o = _data_step(state, p)
            elif p.kind == "train":
                o = _train_step(state, p)
            else:
                o = _eval_step(state, plan, p)
            state.results[p.name] = o
            outcomes.append(o)
            _write_summary(run_dir, cfg, plan, outcomes)
        rounds = round_metrics([(o.block, o.round, o.dir) for o in outcomes if o.kind == "eval"])
        if rounds:
            write_rounds(rounds, run_dir)
        evals = compare_evals([(o.name, o.dir) for o in outcomes if o.kind == "eval"])
        if len(evals["evals"]) > 1:
            write_evals(evals, run_dir)
    return StepsResult(run_dir, outcomes, rounds, state.stats, time.perf_counter() - t0)


def _write_summary(
    run_dir: Path, cfg: PipelineConfig, plan: list[PlannedStep], done: list[StepOutcome]
) -> None:
    write_json(
        run_dir / SUMMARY,
        {
            "pipeline": cfg.name,
            "config": scrub(cfg.to_dict()),
            "planned": [p.name for p in plan],
            "steps": [o.to_dict() for o in done],
            "updated_at": now(),
        },
    )


def data_config(state: _Steps, p: PlannedStep) -> PipelineConfig:
    """The data step as a pipeline of its own: its stages on its model, into its folder."""
    cfg, s = state.cfg, p.step
    judge: JudgeStageConfig | None = None
    if s.judge is not None:
        judge = dataclasses.replace(s.judge)
        if p.judge_model is not None and p.judge_model != p.model:  # same model: one caller
            judge.model = state.model(p.judge_model)
        if p.scorer is not None:
            judge.reward_model = str(state.folder(p.scorer).resolve())
    origin = {"model": state.origin(p.model)}
    if p.judge_model is not None:
        origin["judge"] = state.origin(p.judge_model)
    stages = StagesConfig(
        critique_revise=s.critique_revise, sample=s.sample, contrast=s.contrast, judge=judge,
        export=s.export,
    )  # fmt: skip
    return dataclasses.replace(
        cfg,
        name=f"{cfg.name}/{p.name}",
        output=str(state.folder(p.name)),
        model=state.model(p.model),
        prompts=p.prompts or cfg.prompts,
        stages=stages,
        steps=[],
        model_from={k: v for k, v in origin.items() if v is not None},
    )


def _prompts_identity(sub: PipelineConfig) -> Any:
    """The prompts a data step reads: a file's content hash, or a dataset's name, config,
    split and resolved revision (streaming or not reads the same prompts)."""
    if sub.prompts.path:
        return data_hash(sub.resolve_path(sub.prompts.path))
    source = dataset_provenance(sub) or {}
    return {k: v for k, v in source.items() if k != "streaming"}


def _data_hashes(state: _Steps, p: PlannedStep, sub: PipelineConfig) -> tuple[str, str]:
    """(inputs, whole) hashes of a data step.

    ``inputs`` covers what comes from outside the step: its models (a trained one by its
    step's hash), the prompts and the constitution. When it changes, the step's records
    belong to other inputs and the step starts from an empty folder. ``whole`` adds the
    step's own settings: a settings change re-runs the step in place, where every record
    whose request did not change is reused (as a re-run of a one-pass pipeline does).
    Settings that change no record (batch sizes, execution, budget) are left out.
    """
    settings = sub.to_dict()
    for key in ("name", "output", "model", "batch_size", "execution", "budget"):
        settings.pop(key)
    if settings["stages"]["judge"] and p.judge_model is not None:
        settings["stages"]["judge"]["model"] = None  # named by identity below
    if p.scorer is not None:
        settings["stages"]["judge"]["reward_model"] = None  # named by identity below
    inputs = content_hash(
        {
            "model": state.identity(p.model),
            "judge": state.identity(p.judge_model) if p.judge_model else None,
            "backend": sub.model.backend,
            "prompts": _prompts_identity(sub),
            "constitution": load_constitution(sub.constitution_ref()).content_hash,
            **({"samples": (read_done(state.folder(p.samples_from)) or {}).get("hash")}
               if p.samples_from else {}),
            **({"scorer": state.identity(p.scorer)} if p.scorer else {}),
        }
    )  # fmt: skip
    return inputs, content_hash({"inputs": inputs, "settings": settings})


def _data_step(state: _Steps, p: PlannedStep) -> StepOutcome:
    sub = data_config(state, p)
    folder = state.folder(p.name)
    inputs, digest = _data_hashes(state, p, sub)
    base = StepOutcome(p.name, "data", "skipped", folder, digest, p.round, p.block, model=p.model)
    done = read_done(folder)
    if done is not None and done.get("hash") == digest:
        print(f"data {p.name}: done earlier, skipped", file=state.stream, flush=True)
        return dataclasses.replace(
            base, seconds=done.get("seconds", 0.0), numbers=done.get("numbers") or {}
        )
    started = read_done(folder, STARTED)
    if folder.exists() and (started is None or started.get("inputs") != inputs):
        shutil.rmtree(folder)  # records of another model or other prompts: start afresh
    folder.mkdir(parents=True, exist_ok=True)
    if p.samples_from is not None and not (folder / "stages" / "sample").exists():
        # the earlier step's sample records: same requests, so this run finds them done
        tmp = folder / "stages" / "sample.copy"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(state.folder(p.samples_from) / "stages" / "sample", tmp)
        tmp.rename(folder / "stages" / "sample")
    (folder / DONE).unlink(missing_ok=True)
    write_json(folder / STARTED, {"inputs": inputs, "started_at": now()})
    result = run_pipeline(sub, retry_errors=state.retry_errors, stream=state.stream)
    state.add_stats(result.stats)
    numbers = {
        f"{name}_rows": info["rows"] for name, info in result.exports.get("files", {}).items()
    }
    prefs = result.exports.get("preferences")
    if prefs:
        numbers.update(preference_pairs=prefs["kept"], judged_pairs=prefs["inputs"])
    seconds = round(result.seconds, 2)
    write_json(folder / DONE, {"hash": digest, "finished_at": now(), "seconds": seconds,
                               "numbers": numbers})  # fmt: skip
    return dataclasses.replace(base, status="ran", seconds=seconds, numbers=numbers)


def train_config(state: _Steps, p: PlannedStep) -> Any:
    """A training step's config: the pipeline's wiring of its model, data and reward, then
    its own file and ``set`` (:func:`rlaif.pipeline.train_steps.build_config`)."""
    cfg, s = state.cfg, p.step
    start = state.model(p.model)
    wired = wire(
        p.trainer,
        s.set,
        output=state.folder(p.name),
        seed=cfg.seed,
        model=start.id,
        revision=start.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dataset=data_path(state.folder(p.data), p.dataset) if p.data else None,
        prompts=state.run_dir / STEPS / "prompts.jsonl",
        reward_model=state.folder(p.reward) if p.reward else None,
        labelled=cfg.prompts.label_field is not None,
        eval_dataset=data_path(state.folder(p.eval_data), "preferences") if p.eval_data else None,
    )
    return build_config(cfg, p.trainer, s.config, wired, s.set)


def _train_step(state: _Steps, p: PlannedStep) -> StepOutcome:
    tcfg = train_config(state, p)
    r = run_training(
        p.name, p.trainer, tcfg, state.folder(p.name), state.run_dir, state.upstream,
        state.stream, p.at,
    )  # fmt: skip
    state.trained[p.name] = r
    state.upstream[str(r.out_dir)] = r.hash
    numbers = {k: r.metrics[k] for k in HEADLINE if k in r.metrics}
    return StepOutcome(p.name, "train", r.status, r.out_dir, r.hash, p.round, p.block,
                       p.trainer, p.model, r.seconds, clean(numbers))  # fmt: skip


def eval_judge(state: _Steps, plan: list[PlannedStep], p: PlannedStep) -> JudgeStageConfig | None:
    """The judge section of an eval step: the newest data step's before it, with its model
    (the eval's own ``judge`` model, when it names one, replaces that model)."""
    judged = [q for q in plan[: plan.index(p)] if q.kind == "data" and q.step.judge is not None]
    if not judged:
        return None
    q = judged[-1]
    js = dataclasses.replace(q.step.judge)  # type: ignore[type-var]
    if q.judge_model is not None:
        js.model = state.model(q.judge_model)
    return js


def eval_reward(plan: list[PlannedStep], p: PlannedStep) -> PlannedStep | None:
    """The reward step whose model scores an eval step's answers, or None."""
    rewards = [q for q in plan[: plan.index(p)] if q.kind == "train" and q.trainer == "reward"]
    return rewards[-1] if rewards and p.step.eval and p.step.eval.reward_model else None


def _eval_step(state: _Steps, plan: list[PlannedStep], p: PlannedStep) -> StepOutcome:
    cfg, ev = state.cfg, p.step.eval
    assert ev is not None
    js = eval_judge(state, plan, p)
    scorer = eval_reward(plan, p)
    reward = state.trained[scorer.name] if scorer else None
    summary, stats = evaluate_policy(
        cfg,
        ev,
        state.folder(p.name),
        state.trained[p.model],
        state.model(p.baseline),
        state.identity(p.baseline),
        reward,
        js,
        state.stream,
    )
    state.add_stats(stats)
    done = read_done(state.folder(p.name)) or {}
    status = "ran" if summary.get("status") == "evaluated" else "skipped"
    return StepOutcome(
        p.name, "eval", status, state.folder(p.name), str(done.get("hash", "")), p.round,
        p.block, model=p.model, seconds=float(summary.get("seconds") or 0.0),
        numbers=summary.get("headline") or {},
    )  # fmt: skip
