"""Which judge a pipeline's judge stage runs (``stages.judge.kind``) and the scorers behind
the scored kinds (:mod:`rlaif.stages.scored`): a user's Python function, a trained reward
model. Scores are cached in the run's ``cache/`` like model calls, so a resumed or repeated
run scores nothing twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.config.schema import JudgeStageConfig
from rlaif.errors import ConfigError
from rlaif.stages.calibrate import check_settings
from rlaif.stages.scored import JUDGE_KINDS, PythonScorer, load_function
from rlaif.store import CallCache, content_hash

Scorer = Callable[[Sequence[tuple[list[dict[str, str]], str, str | None]]], list[float | None]]


@dataclass
class JudgeKind:
    """The judge of a stage beyond the AI judge's settings.

    ``scorer`` (python, reward_model) scores (conversation, response, label) triples; ``name``
    stands for it in verdicts' ``models``; ``provenance`` enters record ids, so a changed
    function or reward model judges again.
    """

    kind: str = "auto"
    scale: float = 1.0
    label_noise: float = 0.0
    scorer: Scorer | None = None
    name: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict[str, Any] | None:
        """What a judge record's id needs beyond the AI judge's settings (None for the plain
        default, so records of runs from before judge kinds keep their ids)."""
        if self.kind == "auto" and not self.label_noise and self.scorer is None:
            return None
        return {"kind": self.kind, "scale": self.scale, "label_noise": self.label_noise,
                **self.provenance}  # fmt: skip


def check_kind(stage: JudgeStageConfig) -> None:
    """The one-line errors of a judge section's kind settings (checked at load time)."""
    checks = [
        ("kind", stage.kind in JUDGE_KINDS, f"must be one of {', '.join(JUDGE_KINDS)}"),
        ("label_noise", 0 <= stage.label_noise <= 1, "must be in [0, 1]"),
        ("scale", stage.scale > 0, "must be > 0"),
        ("function", stage.kind != "python" or bool(stage.function), "is required by kind: python"),
        ("reward_model", stage.kind != "reward_model" or bool(stage.reward_model),
         "is required by kind: reward_model"),
    ]  # fmt: skip
    for name, ok, why in checks:
        if not ok:
            raise ConfigError(
                f"judge {name} {why}, got {getattr(stage, name)!r}", field=f"judge.{name}"
            )
    if stage.function and stage.kind != "python":
        raise ConfigError("judge function is used by kind: python only", field="judge.function")
    if stage.kind == "python" and not stage.allow_code:
        raise ConfigError(
            f"judge function '{stage.function}' runs your code: set allow_code: true to allow it",
            field="judge.allow_code",
        )
    check_settings(stage.calibrate, stage.calibration_sample, stage.mode)
    if stage.calibrate != "none" and stage.kind not in ("auto", "ai"):
        raise ConfigError(
            f"judge calibrate removes the AI judge's option prior: it needs kind auto or ai, "
            f"got kind {stage.kind!r}",
            field="judge.calibrate",
        )


def judge_kind(stage: JudgeStageConfig, base_dir: Path, run_dir: Path) -> JudgeKind:
    """The :class:`JudgeKind` of a judge section; loads a Python function now (an error in it
    stops the run before any judging) and a reward model only when a score is missing."""
    check_kind(stage)
    common = {"kind": stage.kind, "scale": stage.scale, "label_noise": stage.label_noise}
    cache = run_dir / "cache" / "scores.jsonl"
    if stage.kind == "python":
        assert stage.function
        fn = load_function(stage.function, stage.allow_code, base_dir)
        return JudgeKind(**common, scorer=_cached_python(fn, cache), name=f"python:{fn.spec}",
                         provenance=fn.provenance())  # fmt: skip
    if stage.kind == "reward_model":
        assert stage.reward_model
        from rlaif.evaluate.rewards import reward_fn_for

        folder = str(Path(stage.reward_model) if Path(stage.reward_model).is_absolute()
                     else base_dir / stage.reward_model)  # fmt: skip
        if not Path(folder).is_dir():
            raise ConfigError(f"no reward model folder at {folder}", field="judge.reward_model")
        score, info = reward_fn_for(folder, cache)

        def rm(triples: Sequence[tuple[list[dict[str, str]], str, str | None]]) -> list:
            return list(score([(c, r) for c, r, _ in triples]))

        # its content hash names it in record ids, so a moved run dir keeps its records
        return JudgeKind(**common, scorer=rm, name=f"reward_model:{Path(folder).name}",
                         provenance={"reward_model": info["revision"] or folder})  # fmt: skip
    return JudgeKind(**common)


def _cached_python(fn: PythonScorer, cache_path: Path) -> Scorer:
    """``fn`` with its scores cached; an exception in the user's code propagates (the judge
    wave records it as the reason of each verdict it leaves unjudged)."""

    def score(triples: Sequence[tuple[list[dict[str, str]], str, str | None]]) -> list:
        keys = [content_hash(["python", fn.spec, fn.source_hash, c, r, lab])
                for c, r, lab in triples]  # fmt: skip
        cache = CallCache(cache_path)
        try:
            got = {k: cache.get(k) for k in keys}
            todo = [i for i, k in enumerate(keys) if got[k] is None]
            if todo:
                new = fn(*([triples[i][n] for i in todo] for n in range(3)))
                fresh = {keys[i]: {"score": s} for i, s in zip(todo, new, strict=True)}
                cache.put_many({k: v for k, v in fresh.items() if v["score"] is not None})
                got.update(fresh)
            return [got[k]["score"] for k in keys]  # type: ignore[index]
        finally:
            cache.close()

    return score
