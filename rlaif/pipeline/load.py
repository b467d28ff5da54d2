"""Load a pipeline file: bind it to the schema, apply ``--set`` overrides, check it whole.

:mod:`rlaif.config.binder` checks keys and types as it builds :class:`PipelineConfig`; this
module checks what needs more than one field or another part of the package: value ranges,
one stage's settings against another's, the judge and export settings by the classes that
use them, and each training step's config built once with placeholder paths. Every problem is
one :class:`ConfigError` naming the file, the line and the dotted field, raised before any
model loads.
"""

from __future__ import annotations

import re
from pathlib import Path

from rlaif.config.binder import apply_override, bind, locate
from rlaif.config.schema import CHOICES, ModelConfig, PipelineConfig
from rlaif.errors import ConfigError
from rlaif.export.filters import PreferenceExportConfig
from rlaif.pipeline.train_steps import step_config
from rlaif.stages.judge import judge_config
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
    _check(cfg, raw, str(path))
    return cfg


def _resolve_auto_backends(cfg: PipelineConfig) -> None:
    """``backend: auto`` becomes the concrete kind here, so records, manifests and every
    stage see what actually runs (see :func:`rlaif.backends.auto_backend_kind`)."""
    models = [cfg.model]
    if cfg.stages.judge is not None:
        models += [cfg.stages.judge.model, *cfg.stages.judge.extra_models]
    if cfg.stages.eval is not None:
        models.append(cfg.stages.eval.judge)
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
    if not cfg.prompts.path:
        fail("missing: the file or folder with the prompts", "prompts.path")
    if cfg.prompts.limit is not None and cfg.prompts.limit < 1:
        fail("must be at least 1", "prompts.limit")
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
        except ConfigError as exc:
            fail(exc.message, f"stages.judge.{exc.field}" if exc.field else "stages.judge")
        if cfg.stages.sample is None and not (j.cai_sl and cfg.stages.critique_revise):
            fail(
                "nothing to judge: add stages.sample (n >= 2) or stages.critique_revise",
                "stages.judge",
            )
    if cfg.stages.critique_revise is None and cfg.stages.sample is None:
        fail("no generation stage: add stages.critique_revise and/or stages.sample", "stages")
    try:
        PreferenceExportConfig.from_section(cfg.stages.export.preferences)
    except ConfigError as exc:
        fail(exc.message, f"stages.export.preferences.{exc.field}")
    for fmt in cfg.stages.export.formats:
        if fmt not in ("jsonl", "disk", "parquet"):
            fail(f"unknown export format '{fmt}' (jsonl, disk, parquet)", "stages.export.formats")
    _check_post(cfg, raw, f)


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
        if step.data not in ("auto", "preferences", "pairs"):
            fail(f"'{step.data}' is not one of auto, preferences, pairs", f"{at}.data")
        if step.trainer not in ONLINE_TRAINERS:  # reads preference data
            judged = cfg.stages.judge is not None
            pairs = cfg.stages.critique_revise is not None and cfg.stages.export.pairs
            data = step.data if step.data != "auto" else ("preferences" if judged else "pairs")
            if data == "preferences" and not judged:
                fail("no judged preferences: add stages.judge", f"{at}.data")
            if data == "pairs" and not pairs:
                fail(
                    "no CAI-SL pairs: add stages.critique_revise with export.pairs: true",
                    f"{at}.data",
                )
        reward_set = step.set.get("reward")
        judge_reward = isinstance(reward_set, dict) and reward_set.get("kind") == "judge"
        if step.trainer in ONLINE_TRAINERS and not (reward_before or judge_reward):
            fail(
                f"{step.trainer} needs a reward model: add a 'reward' step before it",
                f"{at}.trainer",
            )
        reward_before = reward_before or step.trainer == "reward"
        if step.config is not None and not cfg.resolve_path(step.config).is_file():
            fail(f"no such file: {cfg.resolve_path(step.config)}", f"{at}.config")
        try:
            step_config(cfg, i, Path("RUN_DIR"))
        except ConfigError as exc:
            if exc.file != "--set":  # the step's own config file: its location is exact
                raise
            top = (exc.field or "").split(".")[0]
            inner = f"{at}.set.{exc.field}" if top in step.set else at
            file, line = locate(raw, f"{at}.set.{top}" if top in step.set else at, f)
            raise ConfigError(exc.message, file=file, line=line, field=inner) from None
    if ev is None:
        return
    if not any(s.trainer in POLICY_TRAINERS for s in steps):
        fail("no policy to evaluate: add a dpo, ppo, grpo or rloo step to stages.train",
             "stages.eval")  # fmt: skip
    if not (ev.red_team or ev.safe or ev.prompts):
        fail("nothing to evaluate: set red_team, safe and/or prompts", "stages.eval")
    for key in ("red_team", "safe", "prompts"):
        value = getattr(ev, key)
        if value and not cfg.resolve_path(value).is_file():
            fail(f"no such file: {cfg.resolve_path(value)}", f"stages.eval.{key}")
    if ev.limit is not None and ev.limit < 1:
        fail("must be at least 1", "stages.eval.limit")
    if ev.max_new_tokens < 1:
        fail("must be at least 1", "stages.eval.max_new_tokens")
    if ev.judge is not None and ev.judge.backend not in CHOICES["model.backend"]:
        allowed = ", ".join(CHOICES["model.backend"])
        fail(f"'{ev.judge.backend}' is not one of {allowed}", "stages.eval.judge.backend")
