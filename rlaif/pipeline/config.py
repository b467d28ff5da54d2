"""Pipeline files: typed, validated, with ``--set key=value`` overrides.

A pipeline YAML maps onto :class:`PipelineConfig`. Unknown keys, wrong types and bad values
are reported with the file, the line and the dotted field name; an override from the command
line is reported as coming from ``--set``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlaif.backends.base import SamplingParams
from rlaif.errors import ConfigError
from rlaif.yamlio import LineDict, LineList, load_yaml, short_repr


@dataclass
class ModelConfig:
    id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # auto (the fastest installed for this machine: vLLM when its build fits, else
    # transformers; resolved when the pipeline is loaded) | transformers | vllm | openai | fake
    backend: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # passed to the backend


@dataclass
class PromptSourceConfig:
    path: str = ""
    format: str = "auto"  # auto | jsonl | csv | parquet | disk
    field: str = "prompt"  # column holding the prompt: text, messages, or an HH transcript
    id_field: str | None = None
    split: str | None = None  # for a DatasetDict saved with save_to_disk
    limit: int | None = None
    offset: int = 0


@dataclass
class GenerationConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    n: int = 1

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            stop=tuple(self.stop),
            n=self.n,
            seed=seed,
        )


@dataclass
class CritiqueReviseConfig:
    rounds: int = 1
    few_shot: int = 0  # how many of the constitution's examples to show (0 = none)
    respond: GenerationConfig = field(default_factory=GenerationConfig)
    critique: GenerationConfig = field(default_factory=GenerationConfig)
    revise: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class JudgeStageConfig:
    """The AI judge: both orders, soft labels; see :class:`rlaif.stages.judge.JudgeConfig`."""

    mode: str = "logprob"  # logprob | reasoning
    principles_k: int = 1  # judge principles sampled per pair (ensemble size)
    tie_threshold: float = 0.5
    flip_margin: float = 0.05
    band: list[float] = field(default_factory=lambda: [0.4, 0.6])  # reasoning-mode clamp
    max_new_tokens: int = 256  # reasoning mode
    pairs: str = "all"  # sampled responses: all | best_vs_worst
    cai_sl: bool = True  # also judge revision vs initial response when critique_revise ran
    min_p_revision: float = 0.5  # keep a CAI-SL pair only when P(revision better) >= this
    model: ModelConfig | None = None  # judge model; default: the pipeline's model
    # more judge models: each judges every pair, and their verdicts are averaged per pair
    extra_models: list[ModelConfig] = field(default_factory=list)

    def judge_config(self):  # -> rlaif.stages.judge.JudgeConfig
        from rlaif.stages.judge import JudgeConfig

        return JudgeConfig(
            mode=self.mode,
            tie_threshold=self.tie_threshold,
            flip_margin=self.flip_margin,
            band=tuple(self.band),
            principles_k=self.principles_k,
            sampling=SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens),
        )


@dataclass
class ExportConfig:
    sft: bool = True  # prompt + final revision, TRL "messages" format
    pairs: bool = True  # CAI-SL pairs: revision chosen, initial response rejected
    formats: list[str] = field(default_factory=lambda: ["jsonl", "disk"])
    show: int = 3  # rows printed at the end
    # judged preference datasets: see rlaif.export.preferences.PreferenceExportConfig
    preferences: dict[str, Any] = field(default_factory=dict)

    def preferences_config(self):  # -> rlaif.export.preferences.PreferenceExportConfig
        import dataclasses as dc

        from rlaif.export.preferences import PreferenceExportConfig

        names = {f.name for f in dc.fields(PreferenceExportConfig)}
        unknown = sorted(set(self.preferences) - names)
        if unknown:
            raise ConfigError(
                f"unknown key '{unknown[0]}' (allowed: {', '.join(sorted(names))})",
                field=unknown[0],
            )
        try:
            return PreferenceExportConfig(**self.preferences)
        except (TypeError, ValueError) as exc:  # e.g. formats: 5 (not a list)
            raise ConfigError(f"invalid value: {exc}") from None


TRAINERS = ("reward", "dpo", "ppo", "grpo", "rloo")
POLICY_TRAINERS = ("dpo", "ppo", "grpo", "rloo")  # produce a policy; reward produces a scorer
_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # becomes a folder name


@dataclass
class TrainStepConfig:
    """One training step after the data stages; see :mod:`rlaif.pipeline.post`.

    Attributes:
        name: the step's folder under ``RUN_DIR/train/``; unique within the pipeline.
        trainer: reward | dpo | ppo | grpo | rloo.
        config: a training YAML (``configs/train/*.yaml``), relative to the pipeline file;
            None starts from the recipe's defaults.
        data: reward / dpo: ``auto`` (the judged preferences when ``stages.judge`` runs, else
            the CAI-SL pairs), ``preferences`` or ``pairs``.
        set: overrides of the training config (``{max_steps: 20, lora: {r: 4}}``), applied
            after the pipeline's wiring of model, data, reward model and output.
    """

    name: str = ""
    trainer: str = ""
    config: str | None = None
    data: str = "auto"
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalStageConfig:
    """The last trained policy against the pipeline's model; see :mod:`rlaif.pipeline.post`.

    Attributes:
        red_team: harmful prompts (judged harmlessness, refusal rate), relative to the
            pipeline file.
        safe: safe prompts that look unsafe (XSTest-style over-refusal).
        prompts: general held-out prompts (win rate only).
        field: the prompt column of those files.
        limit: first N prompts of each file.
        max_new_tokens: greedy generation budget per response.
        judge: the judge model; default: ``stages.judge.model``, else the pipeline's model.
        reward_model: also score responses with the last ``reward`` step's model.
        plots: write the PNG plots next to ``eval.json``.
    """

    red_team: str | None = None
    safe: str | None = None
    prompts: str | None = None
    field: str = "prompt"
    limit: int | None = None
    max_new_tokens: int = 128
    judge: ModelConfig | None = None
    reward_model: bool = True
    plots: bool = True


@dataclass
class StagesConfig:
    critique_revise: CritiqueReviseConfig | None = None
    sample: GenerationConfig | None = None  # RL-CAI: n responses per prompt from the policy
    judge: JudgeStageConfig | None = None
    export: ExportConfig = field(default_factory=ExportConfig)
    train: list[TrainStepConfig] = field(default_factory=list)  # after export, in order
    eval: EvalStageConfig | None = None  # after train: last policy vs the pipeline's model


@dataclass
class ExecutionConfig:
    """Where model calls run: in this process, or on a pool of Ray workers (docs/scaling.md).

    Records, cache keys and exports are the same in both modes; only speed changes.
    """

    mode: str = "local"  # local | ray
    # ray: null = the cluster in RAY_ADDRESS or a new one on this machine; "auto" = a cluster
    # started with `ray start`; "ray://host:10001" = a remote cluster through Ray Client
    address: str | None = None
    workers: int = 2  # ray: model replicas, each a Ray actor holding its own backend
    batch_size: int | None = None  # ray: requests per worker per call (default: batch_size)
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0  # vLLM with tensor parallelism: = tensor_parallel_size
    start_timeout: float = 900.0  # seconds for every worker to be placed and load its model


@dataclass
class BudgetConfig:
    """A cap on the model usage of a run dir, summed over every invocation of the run
    (:mod:`rlaif.pipeline.budget`). A cap left null is off; cache hits cost nothing."""

    max_calls: int | None = None  # model requests answered by a backend
    max_tokens: int | None = None  # prompt + completion tokens
    max_cost_usd: float | None = None  # needs at least one price below
    price_per_1k_prompt_tokens: float = 0.0
    price_per_1k_completion_tokens: float = 0.0

    @property
    def active(self) -> bool:
        """Whether any cap is set."""
        return any(v is not None for v in (self.max_calls, self.max_tokens, self.max_cost_usd))

    @property
    def priced(self) -> bool:
        """Whether a price is configured (costs can be shown)."""
        return bool(self.price_per_1k_prompt_tokens or self.price_per_1k_completion_tokens)

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for each bad value; empty when the budget is valid."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and value < 0:
                out.append((f.name, "must be 0 or more"))
        if self.max_cost_usd is not None and not self.priced:
            out.append(
                (
                    "max_cost_usd",
                    "needs a price: set budget.price_per_1k_prompt_tokens and/or "
                    "budget.price_per_1k_completion_tokens",
                )
            )
        return out


@dataclass
class PipelineConfig:
    name: str = "pipeline"
    seed: int = 0
    output: str = "runs/pipeline"
    batch_size: int = 16
    constitution: str = "helpful-harmless"
    templates: str | None = None
    system: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptSourceConfig = field(default_factory=PromptSourceConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)  # caps on calls/tokens/$
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    # the pipeline file, for resolving relative paths; set by the loader, not by users
    path: str | None = field(default=None, metadata={"internal": True})

    def resolve_path(self, value: str) -> Path:
        """A path from the pipeline file, relative to that file's folder."""
        p = Path(value).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return Path(self.path).resolve().parent / p

    def constitution_ref(self) -> str:
        """The constitution as a path next to the pipeline file if one exists, else as given
        (a built-in name or a path relative to the working directory)."""
        near = self.resolve_path(self.constitution)
        return str(near) if near.is_file() else self.constitution

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


_CHOICES = {
    "model.backend": ("auto", "transformers", "vllm", "openai", "fake"),
    "prompts.format": ("auto", "jsonl", "csv", "parquet", "disk"),
    "execution.mode": ("local", "ray"),
}


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
        _apply_override(raw, item)
    cfg = _build(PipelineConfig, raw, str(path), "")
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


# Lone surrogates come from command-line bytes that are not UTF-8 (Python's surrogateescape).
_SURROGATE = re.compile("[\ud800-\udfff]")
# Values in one free-form section (backend options, export settings): enough for any real
# config, and a bound on what YAML aliases can expand to (a "billion laughs" file).
MAX_SECTION_VALUES = 10_000
MAX_ROUNDS = 100  # critique-revise rounds; the step list is built up front
MAX_SAMPLES = 128  # sampled responses per prompt (8,128 judged pairs per prompt)


def _apply_override(raw: LineDict, item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"expected key=value, got '{item[:80]}'", file="--set")
    if _SURROGATE.search(item):
        raise ConfigError("value is not valid UTF-8", file="--set", field=key[:80])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML: take it as text
        value = text
    parts = key.split(".")
    node: Any = raw
    for part in parts[:-1]:
        if isinstance(node, list):  # stages.train.0.set.max_steps=3: index into a list
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"no item '{part}' in the list", file="--set", field=key)
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = LineDict()
            child.line, child.key_lines = 0, {}
            node[part] = child
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"'{part}' is not a section", file="--set", field=key)
        node = child
    if not isinstance(node, dict):
        raise ConfigError("set a field of a list item (e.g. train.0.name)", file="--set", field=key)
    node[parts[-1]] = value
    if isinstance(node, LineDict):
        node.key_lines[parts[-1]] = 0  # line 0 marks a command-line value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _build(cls: type, raw: Any, f: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"must be a mapping, got {type(raw).__name__}",
            file=f,
            line=getattr(raw, "line", None),
            field=prefix.rstrip(".") or None,
        )
    hints = typing.get_type_hints(cls)
    names = [fl.name for fl in dataclasses.fields(cls) if not fl.metadata.get("internal")]
    kwargs = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        line = _line(raw, key, f)
        if key not in names:
            raise ConfigError(
                f"unknown key '{key}' (allowed: {', '.join(names)})",
                file=line[0],
                line=line[1],
                field=name,
            )
        kwargs[key] = _convert(hints[key], value, line, name)
    return cls(**kwargs)


def _line(raw: Any, key: str, f: str) -> tuple[str, int | None]:
    if isinstance(raw, LineDict):
        n = raw.key_lines.get(str(key), raw.line)
        return ("--set", None) if n == 0 else (f, n)
    return (f, None)


def _convert(tp: Any, value: Any, where: tuple[str, int | None], name: str) -> Any:
    f, line = where
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, where, name)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return _build(tp, value, f, f"{name}.")
    bad = ConfigError(
        f"must be {_type_name(tp)}, got {type(value).__name__} {short_repr(value)}"[:200],
        file=f,
        line=line,
        field=name,
    )
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            return [value]
        if not isinstance(value, list):
            raise bad
        return [_convert(item_tp, v, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _check_plain(value, where, name)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"must be a finite number, got {value!r}"[:200], **_at(where, name))
        return number
    if tp is str:
        if isinstance(value, (dict, list, set, bytes)) or value is None:
            raise bad
        return str(value)
    return value


def _at(where: tuple[str, int | None], name: str) -> dict[str, Any]:
    return {"file": where[0], "line": where[1], "field": name}


def _check_plain(value: dict, where: tuple[str, int | None], name: str) -> None:
    """A free-form section goes into the manifest and the dataset card as JSON: only text,
    finite numbers, booleans, null, lists and mappings with text keys, and a bounded number of
    values (YAML aliases could otherwise expand one line into billions)."""
    stack: list[tuple[Any, str]] = [(value, name)]
    seen = 0
    while stack:
        v, path = stack.pop()
        seen += 1
        if seen > MAX_SECTION_VALUES:
            raise ConfigError(
                f"more than {MAX_SECTION_VALUES} values (do YAML aliases expand here?)",
                **_at(where, name),
            )
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise ConfigError(f"key {k!r} must be text", **_at(where, path))
                stack.append((x, f"{path}.{k}"))
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"must be a finite number, got {v!r}", **_at(where, path))
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise ConfigError(
                f"must be text, a number, true/false, a list or a mapping, got {type(v).__name__}",
                **_at(where, path),
            )


def _check(cfg: PipelineConfig, raw: LineDict, f: str) -> None:
    """Value checks that types alone do not catch."""

    def fail(msg: str, dotted: str) -> None:
        node: Any = raw
        line: int | None = None
        file = f
        for part in dotted.split("."):
            if isinstance(node, LineDict) and part in node:
                n = node.key_lines.get(part, node.line)
                file, line = ("--set", None) if n == 0 else (f, n)
                node = node[part]
        raise ConfigError(msg, file=file, line=line, field=dotted)

    for dotted, allowed in _CHOICES.items():
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
            if m is not None and m.backend not in _CHOICES["model.backend"]:
                fail(
                    f"'{m.backend}' is not one of {', '.join(_CHOICES['model.backend'])}",
                    f"{where}.backend",
                )
        try:
            j.judge_config()
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
        cfg.stages.export.preferences_config()
    except ConfigError as exc:
        fail(exc.message, f"stages.export.preferences.{exc.field}")
    for fmt in cfg.stages.export.formats:
        if fmt not in ("jsonl", "disk", "parquet"):
            fail(f"unknown export format '{fmt}' (jsonl, disk, parquet)", "stages.export.formats")
    _check_post(cfg, raw, f)


def _locate(raw: Any, dotted: str, f: str) -> tuple[str, int | None]:
    """File and line of a dotted field whose parts may be list items (``train[0].name``)."""
    node, line = raw, None
    for part in re.split(r"\.|(?=\[)", dotted):
        index = re.fullmatch(r"\[(\d+)\]", part)
        if index and isinstance(node, LineList) and int(index[1]) < len(node):
            line, node = node.line_of(int(index[1])), node[int(index[1])]
        elif isinstance(node, LineDict) and part in node:
            line, node = node.key_lines.get(part, node.line), node[part]
        else:
            break
    return ("--set", None) if line == 0 else (f, line)


def _check_post(cfg: PipelineConfig, raw: LineDict, f: str) -> None:
    """Checks of ``stages.train`` and ``stages.eval``; each training config is built once
    with placeholder paths, so a bad ``set`` key fails here, before any model call."""

    def fail(msg: str, dotted: str) -> None:
        file, line = _locate(raw, dotted, f)
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
        if step.trainer in ("reward", "dpo"):
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
        if step.trainer in ("ppo", "grpo", "rloo") and not (reward_before or judge_reward):
            fail(
                f"{step.trainer} needs a reward model: add a 'reward' step before it",
                f"{at}.trainer",
            )
        reward_before = reward_before or step.trainer == "reward"
        if step.config is not None and not cfg.resolve_path(step.config).is_file():
            fail(f"no such file: {cfg.resolve_path(step.config)}", f"{at}.config")
        from rlaif.pipeline.post import step_config  # imports the recipe's config class only

        try:
            step_config(cfg, i, Path("RUN_DIR"))
        except ConfigError as exc:
            if exc.file != "--set":  # the step's own config file: its location is exact
                raise
            top = (exc.field or "").split(".")[0]
            inner = f"{at}.set.{exc.field}" if top in step.set else at
            file, line = _locate(raw, f"{at}.set.{top}" if top in step.set else at, f)
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
    if ev.judge is not None and ev.judge.backend not in _CHOICES["model.backend"]:
        allowed = ", ".join(_CHOICES["model.backend"])
        fail(f"'{ev.judge.backend}' is not one of {allowed}", "stages.eval.judge.backend")
