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
from rlaif.yamlio import LineDict, load_yaml, short_repr


@dataclass
class ModelConfig:
    id: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    backend: str = "transformers"  # transformers | vllm | fake
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


@dataclass
class StagesConfig:
    critique_revise: CritiqueReviseConfig | None = None
    sample: GenerationConfig | None = None  # RL-CAI: n responses per prompt from the policy
    judge: JudgeStageConfig | None = None
    export: ExportConfig = field(default_factory=ExportConfig)


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
    "model.backend": ("transformers", "vllm", "fake"),
    "prompts.format": ("auto", "jsonl", "csv", "parquet", "disk"),
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
    _check(cfg, raw, str(path))
    return cfg


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
        child = node.get(part)
        if child is None:
            child = LineDict()
            child.line, child.key_lines = 0, {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"'{part}' is not a section", file="--set", field=key)
        node = child
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
