"""The ``stages.train`` steps of a pipeline: how each is wired to the run, and running one.

Wiring, so a step needs no more than a name and a trainer:

* every step writes to ``train/<step>`` with the pipeline's seed; a policy step (dpo, ppo,
  grpo, rloo) starts from the previous policy step's model, the first one and every
  ``reward`` step from the pipeline's model;
* ``reward`` / ``dpo`` read ``export/preferences`` (the judged pairs) when ``stages.judge``
  runs, else ``export/pairs`` (CAI-SL: the revision chosen over the initial response);
* ``ppo`` / ``grpo`` / ``rloo`` score with the last earlier ``reward`` step's model and
  sample on the run's prompts;
* then the step's ``set`` overrides, so anything wired can be replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rlaif.config.schema import PipelineConfig, TrainStepConfig
from rlaif.errors import DataError
from rlaif.pipeline.done import (
    DONE,
    clean,
    data_hash,
    model_identity,
    now,
    read_done,
    write_json,
)
from rlaif.sources import PromptItem
from rlaif.store import content_hash
from rlaif.store.atomic import write_atomic
from rlaif.train.config import load_train_config
from rlaif.train.recipes import ONLINE_TRAINERS, POLICY_TRAINERS, RECIPES

PROMPTS = "prompts.jsonl"
# metrics.json keys worth repeating in the summary and the manifest, when a recipe has them
HEADLINE = (
    "steps",
    "train_pairs",
    "prompts",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_rewards/accuracies",
    "reward_first",
    "reward_last",
    "reward_first_steps_mean",
    "reward_last_steps_mean",
    "kl_max",
    "final_kl",
    "seconds",
)


@dataclass
class StepResult:
    """What one training step did (``status``: ``trained`` or ``skipped``, already done)."""

    name: str
    trainer: str
    status: str
    out_dir: Path
    hash: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["metrics"] = {k: self.metrics[k] for k in HEADLINE if k in self.metrics}
        return d


def data_path(run_dir: Path, kind: str) -> Path:
    """The exported dataset a reward / dpo step reads: ``preferences`` or ``pairs``."""
    base = run_dir / "export"
    if kind == "preferences":
        candidates = [
            base / "preferences" / v / s for v in ("conversational", "text") for s in ("disk", "")
        ]
    else:
        candidates = [base / "pairs", base / "pairs.jsonl", base / "pairs.parquet"]
    return next((p for p in candidates if p.exists()), candidates[0])


def _data_kind(cfg: PipelineConfig, step: TrainStepConfig) -> str:
    if step.data != "auto":
        return step.data
    return "preferences" if cfg.stages.judge is not None else "pairs"


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{lora: {r: 4}}`` -> ``[("lora.r", 4)]``; an empty mapping stays a value."""
    out: list[tuple[str, Any]] = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _wiring(cfg: PipelineConfig, index: int, run_dir: Path) -> dict[str, Any]:
    """The fields the pipeline sets on step ``index`` before its own ``set``."""
    steps = cfg.stages.train
    step = steps[index]
    user = {k for k, _ in _flatten(step.set)}
    wired: dict[str, Any] = {"output": str(run_dir / "train" / step.name), "seed": cfg.seed}
    earlier = [s for s in steps[:index] if s.trainer in POLICY_TRAINERS]
    if step.trainer in POLICY_TRAINERS and earlier:
        wired.update(model=str(run_dir / "train" / earlier[-1].name), revision=None)
    else:
        wired.update(model=cfg.model.id, revision=cfg.model.revision)
    wired["trust_remote_code"] = cfg.model.trust_remote_code
    if step.trainer not in ONLINE_TRAINERS:  # reads preference data
        wired["dataset"] = str(data_path(run_dir, _data_kind(cfg, step)))
    else:
        reward = step.set.get("reward")
        judge = isinstance(reward, dict) and reward.get("kind") == "judge"
        if not user & {"dataset", "prompts"}:
            # exactly one of the two, whatever the step's config file names
            if judge:  # the judge compares with the `chosen` response of the preference data
                wired.update(dataset=str(data_path(run_dir, _data_kind(cfg, step))), prompts="")
            else:
                prompts = str(run_dir / "train" / PROMPTS)
                wired.update(prompts=prompts, prompt_field="prompt", dataset="")
        rewards = [s for s in steps[:index] if s.trainer == "reward"]
        if not judge and rewards:
            wired["reward.kind"] = "model"
            wired["reward.model"] = str(run_dir / "train" / rewards[-1].name)
    return {k: v for k, v in wired.items() if k not in user}


def step_config(cfg: PipelineConfig, index: int, run_dir: Path) -> Any:
    """The training config of step ``index``: its file (or the recipe's defaults), the
    pipeline's wiring, then its ``set`` overrides.

    Raises:
        ConfigError: from the step's file or its ``set`` (reported as ``--set``).
    """
    step = cfg.stages.train[index]
    cls, _ = RECIPES[step.trainer].load()
    pairs = list(_wiring(cfg, index, run_dir).items()) + _flatten(step.set)
    # JSON is YAML: every value keeps its type through the override parser
    overrides = [f"{k}={json.dumps(v)}" for k, v in pairs]
    path = Path(os.path.normpath(cfg.resolve_path(step.config))) if step.config else None
    return load_train_config(path, cls, overrides)


def _step_hash(trainer: str, tcfg: Any, run_dir: Path, upstream: dict[str, str]) -> str:
    settings = dataclasses.asdict(tcfg)
    settings.pop("quiet", None)  # progress output changes nothing
    inputs: dict[str, Any] = {"model": model_identity(tcfg.model, tcfg.revision, upstream)}
    for key in ("dataset", "prompts"):
        value = getattr(tcfg, key, "")
        if value:
            inputs[key] = data_hash(Path(value))
    reward = getattr(tcfg, "reward", None)
    if reward is not None and reward.kind == "model" and reward.model:
        inputs["reward_model"] = upstream.get(reward.model) or model_identity(
            reward.model, None, {}
        )
    # the run directory may move: its path is no part of what a step computes
    text = json.dumps(settings, sort_keys=True, default=str).replace(str(run_dir), "RUN_DIR")
    return content_hash({"trainer": trainer, "settings": text, "inputs": inputs})


def write_prompts(items: list[PromptItem], path: Path) -> None:
    """The run's prompts as chat messages; rewritten only when they change."""
    text = "".join(
        json.dumps({"id": it.id, "prompt": it.messages()}, ensure_ascii=False) + "\n"
        for it in items
    )
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_atomic(path, text)


def train_step(
    cfg: PipelineConfig, index: int, run_dir: Path, upstream: dict[str, str], stream: TextIO
) -> StepResult:
    step = cfg.stages.train[index]
    out = run_dir / "train" / step.name
    tcfg = step_config(cfg, index, run_dir)
    data = getattr(tcfg, "dataset", "")
    if data and not Path(data).exists():
        msg = f"step '{step.name}' has no data: the run exported nothing here"
        raise DataError(msg, file=data, field=f"stages.train[{index}]")
    digest = _step_hash(step.trainer, tcfg, run_dir, upstream)
    label = f"train {step.name} ({step.trainer})"
    done = read_done(out)
    if done is not None and done.get("hash") == digest:
        print(f"{label}: done earlier, skipped", file=stream, flush=True)
        metrics, seconds = done.get("metrics") or {}, float(done.get("seconds") or 0.0)
        return StepResult(step.name, step.trainer, "skipped", out, digest, metrics, seconds)
    if out.exists():  # a killed or changed step: start it again from nothing
        shutil.rmtree(out)
    print(f"{label}: training -> {out}", file=stream, flush=True)
    _, train = RECIPES[step.trainer].load()
    started = time.perf_counter()
    result = train(tcfg)
    seconds = round(time.perf_counter() - started, 2)
    # metrics.json has the full config too; done.json and the summary keep the numbers
    metrics = clean({k: v for k, v in result.metrics.items() if k != "config"})
    done = {"hash": digest, "trainer": step.trainer, "finished_at": now(), "seconds": seconds}
    write_json(out / DONE, {**done, "metrics": metrics})  # last: the step is done
    return StepResult(step.name, step.trainer, "trained", out, digest, metrics, seconds)
