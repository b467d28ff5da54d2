"""Load a pipeline file: bind it to the schema, apply ``--set`` overrides, check it whole.

:mod:`rlaif.config.binder` checks keys and types as it builds :class:`PipelineConfig`; this
module checks what needs more than one field or another part of the package: value ranges,
one stage's settings against another's, the judge and export settings by the classes that
use them, and each training step's config built once with placeholder paths. Every problem is
one :class:`ConfigError` naming the file, the line and the dotted field, raised before any
model loads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlaif.config.binder import apply_override, bind, locate
from rlaif.config.schema import (
    CHOICES,
    EvalStageConfig,
    ModelConfig,
    PipelineConfig,
    StagesConfig,
    StepConfig,
)
from rlaif.constitution import load_constitution, parse_check
from rlaif.errors import ConfigError, DataError
from rlaif.export.filters import PreferenceExportConfig
from rlaif.pipeline.judges import check_kind
from rlaif.pipeline.plan import KEYS, PlannedStep, plan_steps
from rlaif.pipeline.train_steps import build_config, step_config, wire
from rlaif.sources import check_prompt_source
from rlaif.stages.contrast import PLACEMENTS
from rlaif.stages.judge import judge_config, judged_by
from rlaif.train.recipes import ONLINE_TRAINERS, POLICY_TRAINERS, TRAINERS
from rlaif.yamlio import LineDict, load_yaml

MAX_ROUNDS = 100  # critique-revise rounds; the step list is built up front
MAX_SAMPLES = 128  # sampled responses per prompt (8,128 judged pairs per prompt)
_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # becomes a folder name


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline file, apply ``key=value`` overrides, validate, return the config.

    Raises:
        ConfigError: with file, line and dotted field for every problem.
    """
    path = Path(path)
    raw = load_yaml(path)
    if raw is None:
        raise ConfigError("file is empty", file=path)
    if not isinstance(raw, LineDict):
        raise ConfigError("top level must be a mapping", file=path, line=1)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = bind(PipelineConfig, raw, str(path))
    cfg.path = str(path)
    _resolve_auto_backends(cfg)
    if cfg.steps:
        _check_steps(cfg, raw, str(path))
    else:
        _check(cfg, raw, str(path))
    return cfg


def _resolve_auto_backends(cfg: PipelineConfig) -> None:
    """``backend: auto`` becomes the concrete kind here, so records, manifests and every
    stage see what actually runs (see :func:`rlaif.backends.auto_backend_kind`)."""
    models = [cfg.model]
    sections = [(cfg.stages.judge, cfg.stages.eval)]
    sections += [(s.judge, s.eval) for s in _all_steps(cfg.steps)]
    for judge, ev in sections:
        if judge is not None:
            models += [judge.model, *judge.extra_models]
        if ev is not None:
            models.append(ev.judge)
    if any(isinstance(m, ModelConfig) and m.backend == "auto" for m in models):
        from rlaif.backends import auto_backend_kind

        kind = auto_backend_kind()
        for m in models:
            if isinstance(m, ModelConfig) and m.backend == "auto":
                m.backend = kind


def _check(cfg: PipelineConfig, raw: LineDict, f: str) -> None:
    """Value checks that types alone do not catch."""

    def fail(msg: str, dotted: str) -> None:
        file, line = locate(raw, dotted, f)
        raise ConfigError(msg, file=file, line=line, field=dotted)

    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            fail(f"'{value}' is not one of {', '.join(allowed)}", dotted)
    if cfg.batch_size < 1:
        fail("must be at least 1", "batch_size")
    for key, problem in cfg.budget.problems():
        fail(problem, f"budget.{key}")
    ex = cfg.execution
    if ex.workers < 1:
        fail("must be at least 1", "execution.workers")
    if ex.batch_size is not None and ex.batch_size < 1:
        fail("must be at least 1", "execution.batch_size")
    for key in ("num_cpus_per_worker", "num_gpus_per_worker"):
        if getattr(ex, key) < 0:
            fail("must be 0 or more", f"execution.{key}")
    if ex.start_timeout <= 0:
        fail("must be more than 0", "execution.start_timeout")
    if not 0 <= cfg.seed < 2**62:  # per-request seeds add offsets; torch takes < 2**64
        fail("must be between 0 and 2**62", "seed")
    if cfg.prompts.offset < 0:
        fail("must be 0 or more", "prompts.offset")
    if not (cfg.prompts.path or cfg.prompts.dataset or cfg.prompts.data_files is not None):
        fail("missing: the file or folder with the prompts", "prompts.path")
    if cfg.prompts.limit is not None and cfg.prompts.limit < 1:
        fail("must be at least 1", "prompts.limit")
    try:  # a dataset by name: it exists, with that config and split (no model loads first)
        check_prompt_source(cfg)
    except DataError as exc:
        fail(exc.message, exc.field or "prompts")
    cr = cfg.stages.critique_revise
    if cr is not None:
        if cr.rounds < 1:
            fail("must be at least 1", "stages.critique_revise.rounds")
        if cr.rounds > MAX_ROUNDS:
            fail(f"must be at most {MAX_ROUNDS}", "stages.critique_revise.rounds")
        if cr.few_shot < 0:
            fail("must be 0 or more", "stages.critique_revise.few_shot")
        for step in ("respond", "critique", "revise"):
            try:
                getattr(cr, step).params(cfg.seed)
            except ValueError as exc:
                fail(str(exc), f"stages.critique_revise.{step}")
    if cfg.stages.sample is not None:
        try:
            cfg.stages.sample.params(cfg.seed)
        except ValueError as exc:
            fail(str(exc), "stages.sample")
        if cfg.stages.sample.n < 2 and cfg.stages.judge is not None:
            fail("judging sampled responses needs n >= 2", "stages.sample.n")
        if cfg.stages.sample.n > MAX_SAMPLES:
            # every pair is judged: n * (n - 1) / 2 pairs per prompt
            fail(f"must be at most {MAX_SAMPLES}", "stages.sample.n")
    if cfg.stages.contrast is not None:
        _check_contrast(cfg, fail)
    j = cfg.stages.judge
    if j is not None:
        if j.pairs not in ("all", "best_vs_worst"):
            fail(f"'{j.pairs}' is not one of all, best_vs_worst", "stages.judge.pairs")
        judges = [("stages.judge.model", j.model)] + [
            (f"stages.judge.extra_models[{n}]", m) for n, m in enumerate(j.extra_models)
        ]
        for where, m in judges:
            if m is not None and m.backend not in CHOICES["model.backend"]:
                fail(
                    f"'{m.backend}' is not one of {', '.join(CHOICES['model.backend'])}",
                    f"{where}.backend",
                )
        try:
            judge_config(j)
            check_kind(j)
        except ConfigError as exc:
            field = exc.field or "judge"
            fail(exc.message, f"stages.{field}" if field.startswith("judge") else
                 f"stages.judge.{field}")  # fmt: skip
        if j.kind in ("python", "reward_model") and j.extra_models:
            fail(f"a {j.kind} judge takes no extra judge models", "stages.judge.extra_models")
        if j.kind in ("rule", "ai"):  # the constitution must have principles of that kind
            constitution = load_constitution(cfg.constitution_ref())
            if not any(judged_by(p, j.kind) for p in constitution.principles):
                what = "a check" if j.kind == "rule" else "a judge question"
                fail(f"constitution '{constitution.name}' has no principle with {what}",
                     "stages.judge.kind")  # fmt: skip
        crs = j.cai_sl and cfg.stages.critique_revise
        if cfg.stages.sample is None and not crs and cfg.stages.contrast is None:
            fail(
                "nothing to judge: add stages.sample (n >= 2), stages.critique_revise or "
                "stages.contrast",
                "stages.judge",
            )
    if (cfg.stages.critique_revise, cfg.stages.sample, cfg.stages.contrast) == (None,) * 3:
        fail(
            "no generation stage: add stages.critique_revise and/or stages.sample, or "
            "stages.contrast",
            "stages",
        )
    try:
        PreferenceExportConfig.from_section(cfg.stages.export.preferences)
    except ConfigError as exc:
        fail(exc.message, f"stages.export.preferences.{exc.field}")
    for fmt in cfg.stages.export.formats:
        if fmt not in ("jsonl", "disk", "parquet"):
            fail(f"unknown export format '{fmt}' (jsonl, disk, parquet)", "stages.export.formats")
    _check_post(cfg, raw, f)


def _check_contrast(cfg: PipelineConfig, fail: Callable[[str, str], None]) -> None:
    """Checks of ``stages.contrast`` (RLCD): it makes its own pairs, so it runs alone; a
    ``judge`` section beside it is its filter."""
    c = cfg.stages.contrast
    assert c is not None
    for other in ("critique_revise", "sample"):
        if getattr(cfg.stages, other) is not None:
            fail(f"contrast makes its own pairs: drop stages.{other} (or use a second step)",
                 f"stages.{other}")  # fmt: skip
    if c.placement not in PLACEMENTS:
        fail(f"'{c.placement}' is not one of {', '.join(PLACEMENTS)}", "stages.contrast.placement")
    try:
        c.generation.params(cfg.seed)
    except ValueError as exc:
        fail(str(exc), "stages.contrast.generation")
    if c.generation.n != 1:
        fail("one response per side: must be 1", "stages.contrast.generation.n")
    if not 0 <= c.filter.min_p <= 1:
        fail(f"must be in [0, 1], got {c.filter.min_p!r}", "stages.contrast.filter.min_p")
    where = "stages.contrast.filter.check"
    if isinstance(c.filter.check, dict):
        try:
            parse_check(c.filter.check, where)
        except ConfigError as exc:
            fail(exc.message, exc.field or where)
    elif c.filter.check not in (None, "principle"):
        fail("must be a check (a mapping of rules), 'principle' or null", where)
    if cfg.stages.judge is not None and cfg.stages.judge.extra_models:
        fail("the contrast filter takes one judge model", "stages.judge.extra_models")
    constitution = load_constitution(cfg.constitution_ref())
    if not constitution.contrast_principles:
        fail(f"constitution '{constitution.name}' has no principle with a contrast pair",
             "stages.contrast")  # fmt: skip


def _check_post(cfg: PipelineConfig, raw: LineDict, f: str) -> None:
    """Checks of ``stages.train`` and ``stages.eval``; each training config is built once
    with placeholder paths, so a bad ``set`` key fails here, before any model call."""

    def fail(msg: str, dotted: str) -> None:
        file, line = locate(raw, dotted, f)
        raise ConfigError(msg, file=file, line=line, field=dotted)

    steps, ev = cfg.stages.train, cfg.stages.eval
    if (steps or ev) and cfg.model.backend not in ("transformers", "vllm"):
        # the policy is trained from the pipeline's model: its weights must be local
        fail(
            f"training needs local weights (backend transformers or vllm), not "
            f"'{cfg.model.backend}'",
            "model.backend",
        )
    seen: set[str] = set()
    reward_before = False
    for i, step in enumerate(steps):
        at = f"stages.train[{i}]"
        if not step.name:
            fail("missing: the step's name (its folder under train/)", f"{at}.name")
        if not _STEP_NAME.fullmatch(step.name):
            fail("use letters, digits, '.', '_' and '-' (at most 64)", f"{at}.name")
        if step.name in seen:
            fail(f"duplicate step name '{step.name}'", f"{at}.name")
        seen.add(step.name)
        if step.trainer not in TRAINERS:
            fail(f"'{step.trainer}' is not one of {', '.join(TRAINERS)}", f"{at}.trainer")
        if step.data not in ("auto", "preferences", "pairs", "sft"):
            fail(f"'{step.data}' is not one of auto, preferences, pairs, sft", f"{at}.data")
        if step.data != "auto" and (step.trainer == "sft") != (step.data == "sft"):
            fail("sft trains on the sft export; the other recipes on pairs", f"{at}.data")
        if step.trainer not in ONLINE_TRAINERS:  # reads preference or SFT data
            judged = cfg.stages.judge is not None
            pairs = cfg.stages.critique_revise is not None and cfg.stages.export.pairs
            data = step.data if step.data != "auto" else ("preferences" if judged else "pairs")
            if step.trainer == "sft":
                data = "sft"
            if data == "sft" and not (cfg.stages.critique_revise and cfg.stages.export.sft):
                fail("no SFT data: add stages.critique_revise with export.sft: true",
                     f"{at}.data")  # fmt: skip
            if data == "preferences" and not judged:
                fail("no judged preferences: add stages.judge", f"{at}.data")
            if data == "pairs" and not pairs:
                fail(
                    "no CAI-SL pairs: add stages.critique_revise with export.pairs: true",
                    f"{at}.data",
                )
        reward_set = step.set.get("reward")
        own_reward = isinstance(reward_set, dict) and reward_set.get("kind") in (
            "judge", "rule", "python"
        )  # fmt: skip
        if step.trainer in ONLINE_TRAINERS and not (reward_before or own_reward):
            fail(
                f"{step.trainer} needs a reward model: add a 'reward' step before it",
                f"{at}.trainer",
            )
        reward_before = reward_before or step.trainer == "reward"
        if step.config is not None and not cfg.resolve_path(step.config).is_file():
            fail(f"no such file: {cfg.resolve_path(step.config)}", f"{at}.config")
        _check_train_config(lambda i=i: step_config(cfg, i, Path("RUN_DIR")), step.set, at, raw, f)
    if ev is None:
        return
    if not any(s.trainer in POLICY_TRAINERS for s in steps):
        fail("no policy to evaluate: add an sft, dpo, ppo, grpo or rloo step to stages.train",
             "stages.eval")  # fmt: skip
    _check_eval(cfg, ev, "stages.eval", fail)


def _check_train_config(
    build: Callable[[], Any], user_set: dict[str, Any], at: str, raw: LineDict, f: str
) -> None:
    """Build a training step's config once with placeholder paths: a bad ``set`` key or a
    bad value in the step's config file fails here, before any model call."""
    try:
        build()
    except ConfigError as exc:
        if exc.file != "--set":  # the step's own config file: its location is exact
            raise
        top = (exc.field or "").split(".")[0]
        inner = f"{at}.set.{exc.field}" if top in user_set else at
        file, line = locate(raw, f"{at}.set.{top}" if top in user_set else at, f)
        raise ConfigError(exc.message, file=file, line=line, field=inner) from None


def _check_eval(
    cfg: PipelineConfig, ev: EvalStageConfig, at: str, fail: Callable[[str, str], None]
) -> None:
    if not (ev.red_team or ev.safe or ev.prompts):
        fail("nothing to evaluate: set red_team, safe and/or prompts", at)
    for key in ("red_team", "safe", "prompts"):
        value = getattr(ev, key)
        if value and not cfg.resolve_path(value).is_file():
            fail(f"no such file: {cfg.resolve_path(value)}", f"{at}.{key}")
    if ev.limit is not None and ev.limit < 1:
        fail("must be at least 1", f"{at}.limit")
    if ev.max_new_tokens < 1:
        fail("must be at least 1", f"{at}.max_new_tokens")
    if ev.judge is not None and ev.judge.backend not in CHOICES["model.backend"]:
        allowed = ", ".join(CHOICES["model.backend"])
        fail(f"'{ev.judge.backend}' is not one of {allowed}", f"{at}.judge.backend")


def _all_steps(steps: list[StepConfig]) -> list[StepConfig]:
    """Every step, the steps of blocks included (each once)."""
    return [x for s in steps for x in (s, *_all_steps(s.steps))]


def _node(raw: Any, dotted: str) -> Any:
    """The loaded YAML at ``steps[2].steps[0]``."""
    for part in re.split(r"\.|(?=\[)", dotted):
        index = re.fullmatch(r"\[(\d+)\]", part)
        raw = raw[int(index[1])] if index else raw[part]
    return raw


def _check_steps(cfg: PipelineConfig, raw: LineDict, f: str) -> None:
    """The checks of a ``steps:`` pipeline: each step's keys, every reference (through
    :func:`rlaif.pipeline.plan.plan_steps`), and each step's settings as the stages form
    checks them."""

    def fail(msg: str, dotted: str) -> None:
        file, line = locate(raw, dotted, f)
        raise ConfigError(msg, file=file, line=line, field=dotted)

    if "stages" in raw:
        fail("use stages (one pass) or steps (in order), not both", "stages")
    try:
        plan = plan_steps(cfg)
    except ConfigError as exc:
        fail(exc.message, exc.field or "steps")
    checked: set[str] = set()  # a block's steps repeat in every round: check them once
    for p in plan:
        if p.at in checked:
            continue
        checked.add(p.at)
        node = _node(raw, p.at)
        extra = [k for k in node if k != "name" and k not in KEYS[p.kind]]
        if extra:
            allowed = ", ".join(sorted(KEYS[p.kind] | {"name"}))
            fail(f"'{extra[0]}' does not belong in a {p.kind} step (allowed: {allowed})",
                 f"{p.at}.{extra[0]}")  # fmt: skip
        local = p.kind != "data" or p.model != "base"  # trains, or runs a trained model
        if local and cfg.model.backend not in ("transformers", "vllm"):
            fail(f"training needs local weights (backend transformers or vllm), not "
                 f"'{cfg.model.backend}'", "model.backend")  # fmt: skip
        if p.kind == "data":
            _check_data_step(cfg, p, node, raw, f)
        elif p.kind == "train":
            s = p.step
            if s.config is not None and not cfg.resolve_path(s.config).is_file():
                fail(f"no such file: {cfg.resolve_path(s.config)}", f"{p.at}.config")
            wired = wire(
                s.trainer, s.set, output=Path("RUN_DIR/out"), seed=cfg.seed, model=cfg.model.id,
                revision=None, trust_remote_code=False, dataset=Path("RUN_DIR/data"),
                prompts=Path("RUN_DIR/prompts.jsonl"), reward_model=Path("RUN_DIR/reward"),
            )  # fmt: skip
            _check_train_config(
                lambda s=s, w=wired: build_config(cfg, s.trainer, s.config, w, s.set),
                s.set, p.at, raw, f,
            )  # fmt: skip
        else:
            assert p.step.eval is not None
            _check_eval(cfg, p.step.eval, f"{p.at}.eval", fail)


def _check_data_step(cfg: PipelineConfig, p: PlannedStep, node: LineDict, raw: LineDict,
                     f: str) -> None:  # fmt: skip
    """A data step is checked as the stages form of a pipeline of its own would be."""
    s = p.step
    sub = dataclasses.replace(
        cfg,
        prompts=s.prompts or cfg.prompts,
        stages=StagesConfig(
            critique_revise=s.critique_revise,
            sample=s.sample,
            contrast=s.contrast,
            judge=s.judge,
            export=s.export,
        ),
        steps=[],
    )
    view = LineDict(raw)
    view.line, view.key_lines = raw.line, dict(raw.key_lines)
    view["stages"], view.key_lines["stages"] = node, node.line
    if "prompts" in node:
        view["prompts"], view.key_lines["prompts"] = node["prompts"], node.key_lines["prompts"]
    try:
        _check(sub, view, f)
    except ConfigError as exc:
        field = exc.field or ""
        if field == "stages" or field.startswith("stages."):
            field = p.at + field[len("stages") :]
        elif field.startswith("prompts") and "prompts" in node:
            field = f"{p.at}.{field}"
        raise ConfigError(exc.message, file=exc.file, line=exc.line, field=field) from None
