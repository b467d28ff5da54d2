"""After the data stages: the ``stages.train`` steps in order, then ``stages.eval``.

Layout of a run directory::

    train/prompts.jsonl      the run's prompts, for the online RL steps (ppo, grpo, rloo)
    train/<step>/            model, metrics.json, curves.jsonl + curves.png, done.json
    train/summary.json       every step: status, folder, seconds, headline metrics
    eval/                    eval.json, responses.jsonl, plots, cache/, done.json

Wiring, so a step needs no more than a name and a trainer:

* every step writes to ``train/<step>`` with the pipeline's seed; a policy step (dpo, ppo,
  grpo, rloo) starts from the previous policy step's model, the first one and every
  ``reward`` step from the pipeline's model;
* ``reward`` / ``dpo`` read ``export/preferences`` (the judged pairs) when ``stages.judge``
  runs, else ``export/pairs`` (CAI-SL: the revision chosen over the initial response);
* ``ppo`` / ``grpo`` / ``rloo`` score with the last earlier ``reward`` step's model and
  sample on the run's prompts;
* then the step's ``set`` overrides, so anything wired can be replaced.

Resume: ``done.json`` is written last, atomically, and holds the step's hash: its resolved
training config, its input data and the hashes of the steps it builds on. A step whose
``done.json`` matches is skipped without loading anything; any other step's folder is removed
and the step trains again from the start (the recipes keep no checkpoints), and so does every
later step that uses its output. The evaluation works the same way, and its model calls are
cached in ``eval/cache/``, so a killed evaluation resumes without repeating them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from rlaif.errors import DataError
from rlaif.pipeline.config import POLICY_TRAINERS, PipelineConfig, TrainStepConfig
from rlaif.pipeline.sources import PromptItem
from rlaif.store import content_hash
from rlaif.store.jsonl import fsync_dir

# trainer -> (module, config class, train function)
RECIPES: dict[str, tuple[str, str, str]] = {
    "reward": ("rlaif.train.reward", "RewardTrainConfig", "train_reward"),
    "dpo": ("rlaif.train.dpo", "DPOTrainConfig", "train_dpo"),
    "grpo": ("rlaif.train.online", "GRPOTrainConfig", "train_grpo"),
    "rloo": ("rlaif.train.online", "RLOOTrainConfig", "train_rloo"),
    "ppo": ("rlaif.train.ppo", "PPOConfig", "train_ppo"),
}
DONE = "done.json"
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


@dataclass
class PostResult:
    """The training steps, the evaluation (None without ``stages.eval``) and its model calls."""

    steps: list[StepResult] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps], "eval": self.eval}


# -- wiring ------------------------------------------------------------------------------------


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
    if step.trainer in ("reward", "dpo"):
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
    from rlaif.train.common import load_train_config

    step = cfg.stages.train[index]
    module, cls_name, _ = RECIPES[step.trainer]
    cls = getattr(importlib.import_module(module), cls_name)
    pairs = list(_wiring(cfg, index, run_dir).items()) + _flatten(step.set)
    # JSON is YAML: every value keeps its type through the override parser
    overrides = [f"{k}={json.dumps(v)}" for k, v in pairs]
    path = Path(os.path.normpath(cfg.resolve_path(step.config))) if step.config else None
    return load_train_config(path, cls, overrides)


# -- hashing -----------------------------------------------------------------------------------


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def data_hash(path: Path) -> str | None:
    """A content hash of a data file or folder (None when it does not exist).

    A ``save_to_disk`` folder is rewritten by every export with a fresh ``state.json``
    fingerprint, so only its data and schema files count; the rows decide, not the write.
    """
    if path.is_file():
        return _file_hash(path)
    if not path.is_dir():
        return None
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.name != "state.json" and not p.name.startswith(".")
    )
    return content_hash([[str(p.relative_to(path)), _file_hash(p)] for p in files])


def _model_identity(
    model: str, revision: str | None, upstream: dict[str, str], backend: str = ""
) -> Any:
    """A trained step's model is known by that step's hash; any other by its revision."""
    if model in upstream:
        return {"step": upstream[model]}
    if backend == "fake":  # no weights to resolve
        return {"model": model, "backend": backend}
    from rlaif.backends import resolve_model

    return {"model": model, "revision": resolve_model(model, revision=revision).revision}


def _step_hash(trainer: str, tcfg: Any, run_dir: Path, upstream: dict[str, str]) -> str:
    settings = dataclasses.asdict(tcfg)
    settings.pop("quiet", None)  # progress output changes nothing
    inputs: dict[str, Any] = {"model": _model_identity(tcfg.model, tcfg.revision, upstream)}
    for key in ("dataset", "prompts"):
        value = getattr(tcfg, key, "")
        if value:
            inputs[key] = data_hash(Path(value))
    reward = getattr(tcfg, "reward", None)
    if reward is not None and reward.kind == "model" and reward.model:
        inputs["reward_model"] = upstream.get(reward.model) or _model_identity(
            reward.model, None, {}
        )
    # the run directory may move: its path is no part of what a step computes
    text = json.dumps(settings, sort_keys=True, default=str).replace(str(run_dir), "RUN_DIR")
    return content_hash({"trainer": trainer, "settings": text, "inputs": inputs})


# -- files -------------------------------------------------------------------------------------


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temp file, fsync and rename, so readers see all of it or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(json.dumps(_clean(data), indent=1, sort_keys=True, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_done(folder: Path) -> dict[str, Any] | None:
    """The ``done.json`` of a step or of the evaluation, or None (missing or unreadable)."""
    try:
        data = json.loads((folder / DONE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_prompts(items: list[PromptItem], path: Path) -> None:
    """The run's prompts as chat messages; rewritten only when they change."""
    text = "".join(
        json.dumps({"id": it.id, "prompt": it.messages()}, ensure_ascii=False) + "\n"
        for it in items
    )
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- running -----------------------------------------------------------------------------------


def _train_step(
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
    module, _, fn = RECIPES[step.trainer]
    started = time.perf_counter()
    result = getattr(importlib.import_module(module), fn)(tcfg)
    seconds = round(time.perf_counter() - started, 2)
    # metrics.json has the full config too; done.json and the summary keep the numbers
    metrics = _clean({k: v for k, v in result.metrics.items() if k != "config"})
    done = {"hash": digest, "trainer": step.trainer, "finished_at": _now(), "seconds": seconds}
    write_json_atomic(out / DONE, {**done, "metrics": metrics})  # last: the step is done
    return StepResult(step.name, step.trainer, "trained", out, digest, metrics, seconds)


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
    if any(s.trainer in ("ppo", "grpo", "rloo") for s in cfg.stages.train):
        _write_prompts(items, run_dir / "train" / PROMPTS)
    upstream: dict[str, str] = {}  # model folder -> hash of the step that wrote it
    for index in range(len(cfg.stages.train)):
        step = _train_step(cfg, index, run_dir, upstream, stream)
        upstream[str(step.out_dir)] = step.hash
        result.steps.append(step)
        write_json_atomic(run_dir / "train" / "summary.json", result.to_dict())
    if cfg.stages.eval is not None:
        result.eval, result.stats = run_stage_eval(cfg, run_dir, result.steps, stream)
        if cfg.stages.train:
            write_json_atomic(run_dir / "train" / "summary.json", result.to_dict())
    return result


# -- evaluation --------------------------------------------------------------------------------


def _eval_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The rates a reader wants first: win rate, then policy vs baseline safety."""

    def r(x: Any) -> Any:
        return x.get("rate") if isinstance(x, dict) else None

    out: dict[str, Any] = {"win_rate": r(metrics["win_rate"]["all"]["win_rate"])}
    for role in ("policy", "baseline"):
        m = metrics[role]
        for key in ("red_team_judged_harmless_rate", "red_team_refusal_rate", "over_refusal_rate"):
            if key in m:
                out[f"{role}_{key}"] = r(m[key])
    return out


def run_stage_eval(
    cfg: PipelineConfig, run_dir: Path, steps: list[StepResult], stream: TextIO
) -> tuple[dict[str, Any], dict[str, int]]:
    """Evaluate the last trained policy against the pipeline's model (``stages.eval``).

    Returns:
        The evaluation's summary (status, folder, headline rates) and its model-call counts.
    """
    from rlaif import __version__
    from rlaif.constitution import load_constitution
    from rlaif.evaluate.policy_eval import (
        DEFINITIONS,
        HARM_TEMPLATE_HASH,
        eval_metrics,
        format_summary,
        run_eval,
        write_eval,
    )
    from rlaif.pipeline.sources import read_prompts
    from rlaif.pipeline.steps import make_caller
    from rlaif.prompts import PromptBook
    from rlaif.stages.judge import JudgeConfig
    from rlaif.store import CallCache

    ev = cfg.stages.eval
    assert ev is not None
    out = run_dir / "eval"
    policy = [s for s in steps if s.trainer in POLICY_TRAINERS][-1]
    rewards = [s for s in steps if s.trainer == "reward"] if ev.reward_model else []
    judge_m = ev.judge or (cfg.stages.judge.model if cfg.stages.judge else None) or cfg.model
    files = {k: getattr(ev, k) for k in ("prompts", "red_team", "safe") if getattr(ev, k)}
    paths = {k: cfg.resolve_path(v) for k, v in files.items()}
    constitution = load_constitution(cfg.constitution_ref())
    # the pipeline judge's tie rule also decides the win rate (the eval judges in logprob mode)
    js = cfg.stages.judge
    jcfg = JudgeConfig(tie_threshold=js.tie_threshold, flip_margin=js.flip_margin) if js else None
    settings = {
        "tie_rule": jcfg.to_dict() if jcfg else None,
        **dataclasses.asdict(ev),
        "seed": cfg.seed,
        "policy": policy.hash,
        "reward": rewards[-1].hash if rewards else None,
        "baseline": _model_identity(cfg.model.id, cfg.model.revision, {}),
        "judge": _model_identity(judge_m.id, judge_m.revision, {}, judge_m.backend),
        "backend": [cfg.model.backend, judge_m.backend],
        "data": {k: _file_hash(p) for k, p in paths.items()},
        "constitution": constitution.content_hash,
    }
    digest = content_hash(settings)
    done = read_done(out)
    if done is not None and done.get("hash") == digest:
        print("eval: done earlier, skipped", file=stream, flush=True)
        return {"status": "skipped", "dir": str(out), **(done.get("summary") or {})}, {}
    (out / DONE).unlink(missing_ok=True)
    print(f"eval: {policy.name} vs {cfg.model.id} -> {out}", file=stream, flush=True)
    started = time.perf_counter()
    sets, data = {}, {}
    for name, path in paths.items():
        items, skipped = read_prompts(path, field=ev.field, limit=ev.limit)
        sets[name] = items
        data[name] = {
            "path": str(path),
            "sha256": settings["data"][name],
            "prompts": len(items),
            "skipped": len(skipped),
        }
    cache = CallCache(out / "cache" / "calls.jsonl")
    policy_m = dataclasses.replace(cfg.model, id=str(policy.out_dir), revision=None)
    # one caller (one loaded model) per distinct model, run where the data stages ran
    callers: dict[str, Any] = {}
    by_model: dict[tuple[str, str | None, str], Any] = {}
    for role, m in (("policy", policy_m), ("baseline", cfg.model), ("judge", judge_m)):
        key = (m.id, m.revision, m.backend)
        if key not in by_model:
            by_model[key] = make_caller(m, cfg.batch_size, cache, execution=cfg.execution)
        callers[role] = by_model[key]
    reward_fn, reward_info = None, None
    if rewards:
        from rlaif.evaluate.rewards import reward_fn_for  # the cached scorer `rlaif eval` uses

        scores = out / "cache" / "reward.jsonl"
        reward_fn, reward_info = reward_fn_for(str(rewards[-1].out_dir), scores)
    book = PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None)
    try:
        rows = run_eval(
            sets,
            callers["policy"],
            callers["baseline"],
            callers["judge"],
            constitution,
            max_new_tokens=ev.max_new_tokens,
            seed=cfg.seed,
            reward_fn=reward_fn,
            book=book,
            stream=stream,
            judge_config=jcfg,
        )
    finally:
        for c in by_model.values():
            c.close()
        cache.close()
    metrics = eval_metrics(rows)
    stats: dict[str, int] = {}
    for c in by_model.values():
        for k, v in c.stats.to_dict().items():
            stats[k] = stats.get(k, 0) + v
    report = {
        "rlaif_version": __version__,
        "pipeline": cfg.name,
        "models": {
            role: {"model": c.model, "revision": c.revision, "backend": m.backend}
            for (role, c), m in zip(callers.items(), (policy_m, cfg.model, judge_m), strict=True)
        },
        "policy_step": policy.name,
        "reward_model": reward_info,
        "data": data,
        "config": {
            **dataclasses.asdict(ev),
            "decoding": "greedy",
            "seed": cfg.seed,
            "judge_mode": "logprob",
            "judge_tie_rule": settings["tie_rule"],
            "constitution": constitution.provenance(),
            "templates": {
                "respond": book.template_hash("respond"),
                "judge_mc": book.template_hash("judge_mc"),
                "harm_check": HARM_TEMPLATE_HASH,
            },
        },
        "metrics": metrics,
        "definitions": DEFINITIONS,
        "calls": stats,
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_eval(out, report, rows, plots=ev.plots)
    print(format_summary(metrics), file=stream, flush=True)
    summary = {"headline": _eval_headline(metrics), "seconds": report["seconds"]}
    write_json_atomic(out / DONE, {"hash": digest, "finished_at": _now(), "summary": summary})
    return {"status": "evaluated", "dir": str(out), **summary}, stats
