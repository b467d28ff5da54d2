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
from rlaif.train.checkpoints import CHECKPOINTS, NOT_HASHED, complete
from rlaif.train.config import load_train_config
from rlaif.train.recipes import ONLINE_TRAINERS, POLICY_TRAINERS, RECIPES

PROMPTS = "prompts.jsonl"
STARTED = "started.json"  # a training step's hash, written before it trains
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
    """The exported dataset a step reads: ``preferences``, ``pairs`` or ``sft``."""
    base = run_dir / "export"
    if kind == "preferences":
        candidates = [
            base / "preferences" / v / s for v in ("conversational", "text") for s in ("disk", "")
        ]
    else:
        candidates = [base / kind, base / f"{kind}.jsonl", base / f"{kind}.parquet"]
    return next((p for p in candidates if p.exists()), candidates[0])


def _data_kind(cfg: PipelineConfig, step: TrainStepConfig) -> str:
    if step.data != "auto":
        return step.data
    if step.trainer == "sft":
        return "sft"
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


def wire(
    trainer: str,
    user_set: dict[str, Any],
    *,
    output: Path,
    seed: int,
    model: str,
    revision: str | None,
    trust_remote_code: bool,
    dataset: Path | None,
    prompts: Path | None,
    reward_model: Path | None,
    labelled: bool = False,
    eval_dataset: Path | None = None,
) -> dict[str, Any]:
    """The fields a pipeline sets on a training step before the step's own ``set``.

    Args:
        trainer: the recipe.
        user_set: the step's ``set`` (what it names, the pipeline leaves alone).
        output, seed: where the model goes, and the pipeline's seed.
        model, revision, trust_remote_code: the model the step starts from.
        dataset: the export a reward / dpo / sft step trains on, or that an online step's
            judge reward compares with.
        prompts: the prompts an online RL step samples on.
        reward_model: the reward step's model an online RL step scores with.
        labelled: the prompts carry labels (``prompts.label_field``): a rule or python reward
            gets them as its ``label`` column.
        eval_dataset: the export whose held-out pairs a reward / dpo step is scored on.
    """
    user = {k for k, _ in _flatten(user_set)}
    wired: dict[str, Any] = {"output": str(output), "seed": seed}
    wired.update(model=model, revision=revision, trust_remote_code=trust_remote_code)
    if trainer not in ONLINE_TRAINERS:  # reads preference or SFT data
        wired["dataset"] = str(dataset)
        if eval_dataset is not None:
            wired["eval_dataset"] = str(eval_dataset)
    else:
        reward = user_set.get("reward")
        kind = reward.get("kind") if isinstance(reward, dict) else None
        judge = kind == "judge"
        if kind in ("rule", "python") and labelled:
            wired["label_field"] = "label"
        if not user & {"dataset", "prompts"}:
            # exactly one of the two, whatever the step's config file names
            if judge:  # the judge compares with the `chosen` response of the preference data
                wired.update(dataset=str(dataset), prompts="")
            else:
                wired.update(prompts=str(prompts), prompt_field="prompt", dataset="")
        if kind in (None, "model") and reward_model is not None:
            wired["reward.kind"] = "model"
            wired["reward.model"] = str(reward_model)
    return {k: v for k, v in wired.items() if k not in user}


def _wiring(cfg: PipelineConfig, index: int, run_dir: Path) -> dict[str, Any]:
    """The fields the pipeline sets on ``stages.train[index]`` before its own ``set``."""
    steps = cfg.stages.train
    step = steps[index]
    earlier = [s for s in steps[:index] if s.trainer in POLICY_TRAINERS]
    if step.trainer in POLICY_TRAINERS and earlier:
        model, revision = str(run_dir / "train" / earlier[-1].name), None
    else:
        model, revision = cfg.model.id, cfg.model.revision
    rewards = [s for s in steps[:index] if s.trainer == "reward"]
    return wire(
        step.trainer,
        step.set,
        output=run_dir / "train" / step.name,
        seed=cfg.seed,
        model=model,
        revision=revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dataset=data_path(run_dir, _data_kind(cfg, step)),
        prompts=run_dir / "train" / PROMPTS,
        reward_model=run_dir / "train" / rewards[-1].name if rewards else None,
        labelled=cfg.prompts.label_field is not None,
    )


def build_config(
    cfg: PipelineConfig, trainer: str, config: str | None, wired: dict[str, Any], user_set: dict
) -> Any:
    """A training step's config: its file (or the recipe's defaults), the pipeline's wiring,
    then the step's ``set`` overrides.

    Raises:
        ConfigError: from the step's file or its ``set`` (reported as ``--set``).
    """
    cls, _ = RECIPES[trainer].load()
    pairs = list(wired.items()) + _flatten(user_set)
    # JSON is YAML: every value keeps its type through the override parser
    overrides = [f"{k}={json.dumps(v)}" for k, v in pairs]
    path = Path(os.path.normpath(cfg.resolve_path(config))) if config else None
    return load_train_config(path, cls, overrides)


def step_config(cfg: PipelineConfig, index: int, run_dir: Path) -> Any:
    """The training config of ``stages.train[index]`` (:func:`build_config`)."""
    step = cfg.stages.train[index]
    return build_config(cfg, step.trainer, step.config, _wiring(cfg, index, run_dir), step.set)


# training-config fields added after steps were first hashed, with their defaults
ADDED = {"eval_dataset": "", "label_field": None, "reward.function": None,
         "reward.allow_code": False}  # fmt: skip


def _step_hash(trainer: str, tcfg: Any, run_dir: Path, upstream: dict[str, str]) -> str:
    settings = dataclasses.asdict(tcfg)
    for key in NOT_HASHED:  # progress output, checkpoints and trackers change no weight
        settings.pop(key, None)
    for key, default in ADDED.items():  # steps trained before these fields keep their hash
        section, _, name = key.rpartition(".")
        node = settings.get(section, {}) if section else settings
        if isinstance(node, dict) and name in node and node[name] == default:
            del node[name]
    inputs: dict[str, Any] = {"model": model_identity(tcfg.model, tcfg.revision, upstream)}
    for key in ("dataset", "prompts", "eval_dataset"):
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
        json.dumps({"id": it.id, "prompt": it.messages(),
                    **({"label": it.label} if it.label is not None else {})},
                   ensure_ascii=False) + "\n"
        for it in items
    )  # fmt: skip
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_atomic(path, text)


def train_step(
    cfg: PipelineConfig, index: int, run_dir: Path, upstream: dict[str, str], stream: TextIO
) -> StepResult:
    """Run (or skip, when done) ``stages.train[index]``."""
    step = cfg.stages.train[index]
    tcfg = step_config(cfg, index, run_dir)
    return run_training(
        step.name,
        step.trainer,
        tcfg,
        run_dir / "train" / step.name,
        run_dir,
        upstream,
        stream,
        f"stages.train[{index}]",
    )


def run_training(
    name: str,
    trainer: str,
    tcfg: Any,
    out: Path,
    run_dir: Path,
    upstream: dict[str, str],
    stream: TextIO,
    where: str,
) -> StepResult:
    """Train one step into ``out``, skip it when its ``done.json`` holds the same hash, or
    continue it from its last checkpoint when it was killed with the same hash.

    Args:
        name, trainer: the step and its recipe.
        tcfg: its training config (:func:`build_config`).
        out: its folder (removed first when it holds a step of another hash; a killed step
            of the same hash keeps its checkpoints, and the recipe resumes from them).
        run_dir: the run directory (its path is left out of the hash, so the run may move).
        upstream: model folder -> hash of the step that wrote it.
        stream: where the step line goes.
        where: the step's place in the pipeline file, for errors.

    Raises:
        DataError: the step's data was never exported.
    """
    data = getattr(tcfg, "dataset", "")
    if data and not Path(data).exists():
        msg = f"step '{name}' has no data: the run exported nothing here"
        raise DataError(msg, file=data, field=where)
    digest = _step_hash(trainer, tcfg, run_dir, upstream)
    label = f"train {name} ({trainer})"
    done = read_done(out)
    if done is not None and done.get("hash") == digest:
        print(f"{label}: done earlier, skipped", file=stream, flush=True)
        metrics, seconds = done.get("metrics") or {}, float(done.get("seconds") or 0.0)
        return StepResult(name, trainer, "skipped", out, digest, metrics, seconds)
    started = read_done(out, STARTED)
    if out.exists() and (started or {}).get("hash") != digest:
        shutil.rmtree(out)  # a changed step (or one from before checkpoints): from nothing
    saved = complete(out / CHECKPOINTS)
    if saved:  # killed earlier: the recipe continues from the last complete checkpoint
        print(f"{label}: resuming from step {saved[-1][0]} -> {out}", file=stream, flush=True)
    else:
        print(f"{label}: training -> {out}", file=stream, flush=True)
    write_json(out / STARTED, {"hash": digest, "trainer": trainer, "started_at": now()})
    _, train = RECIPES[trainer].load()
    started = time.perf_counter()
    result = train(tcfg)
    seconds = round(time.perf_counter() - started, 2)
    # metrics.json has the full config too; done.json and the summary keep the numbers
    metrics = clean({k: v for k, v in result.metrics.items() if k != "config"})
    done = {"hash": digest, "trainer": trainer, "finished_at": now(), "seconds": seconds}
    write_json(out / DONE, {**done, "metrics": metrics})  # last: the step is done
    return StepResult(name, trainer, "trained", out, digest, metrics, seconds)
