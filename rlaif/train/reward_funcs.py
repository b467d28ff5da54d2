"""Reward functions for online RL (GRPO, RLOO through TRL; rlaif's PPO): every judge kind of
a pipeline is also a reward.

* ``judge`` (:class:`JudgeReward`): the AI judge, P(completion better than a reference).
* ``rule`` (:class:`RuleReward`): the constitution's code-checked principles
  (``check:``): the mean check score of the completion, in [0, 1]; the prompt's label (a
  ``label`` column) selects per-label refusal rules.
* ``python`` (:class:`PythonReward`): the user's function (``reward.function``), allowed by
  ``reward.allow_code``.

Each is called as TRL calls reward functions: ``f(prompts, completions, **columns)``, one
number per completion, None where it cannot score (TRL and the PPO loop then give that
completion no advantage, never a guess).
"""

from __future__ import annotations

from typing import Any

from rlaif.errors import ConfigError, DataError


def _text(value: Any) -> str:
    """A response as text: a string, or the last message of a message list."""
    if isinstance(value, list):
        return str(value[-1]["content"]) if value else ""
    return str(value)


class JudgeReward:
    """A TRL reward function: P(completion better than the reference) from the AI judge.

    Args:
        backend: the judge model (any :class:`rlaif.backends.Backend`).
        constitution: where judge principles are drawn from (per completion, seeded).
        book: the prompt templates.
        cfg: a :class:`rlaif.stages.judge.JudgeConfig`.
        reference: the dataset column with the response to beat.
        seed: seed of the principle draw.
        system: system prompt of the judged conversation.
    """

    __name__ = "judge"  # TRL logs each reward function under its name

    def __init__(
        self,
        backend: Any,
        constitution: Any,
        book: Any,
        cfg: Any,
        *,
        reference: str = "chosen",
        seed: int = 0,
        system: str | None = None,
    ) -> None:
        self.backend, self.constitution, self.book, self.cfg = backend, constitution, book, cfg
        self.reference, self.seed, self.system = reference, seed, system
        self.calls = 0
        self.errors = 0

    def __call__(
        self, prompts: list[Any], completions: list[Any], **kwargs: Any
    ) -> list[float | None]:
        """One reward per completion; None where the judge failed."""
        from rlaif.stages.judge import (
            ensemble,
            judge_principles,
            judge_requests,
            verdict_from_logprobs,
            verdict_from_texts,
        )
        from rlaif.store import content_hash

        refs = kwargs.get(self.reference)
        if refs is None:
            raise DataError(f"the data has no '{self.reference}' column", field="reward.reference")
        jobs = []  # (completion index, principle id, order-1 request, order-2 request)
        for i, (prompt, completion, ref) in enumerate(zip(prompts, completions, refs, strict=True)):
            convo = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            a, b = _text(completion), _text(ref)
            pair_id = content_hash([convo, a, b])
            k = self.cfg.principles_k
            for principle in judge_principles(self.constitution, k, self.seed, pair_id, "ai"):
                r1, r2 = judge_requests(
                    self.book, convo, a, b, principle, self.cfg, system=self.system
                )
                jobs.append((i, principle.id, r1, r2))
        requests = [r for job in jobs for r in job[2:]]
        if self.cfg.mode == "logprob":
            scores = self.backend.score_choices(
                [r.messages for r in requests], list(self.cfg.options)
            )
            answers: list[Any] = scores
        else:
            gens = self.backend.generate([r.messages for r in requests], self.cfg.sampling)
            answers = [g[0].text if g else "" for g in gens]
        model = getattr(self.backend, "model_id", None)
        verdicts: dict[int, list[Any]] = {}
        for n, (i, pid, _, _) in enumerate(jobs):
            one, two = answers[2 * n], answers[2 * n + 1]
            make = verdict_from_logprobs if self.cfg.mode == "logprob" else verdict_from_texts
            verdicts.setdefault(i, []).append(
                make(one, two, self.cfg, principle_id=pid, model=model)
            )
        rewards: list[float | None] = []
        for i in range(len(completions)):
            v = verdicts[i][0] if len(verdicts[i]) == 1 else ensemble(verdicts[i], self.cfg)
            ok = v.status == "ok" and v.p_a_better is not None
            rewards.append(float(v.p_a_better) if ok else None)
        self.calls += len(completions)
        self.errors += sum(r is None for r in rewards)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("judge/error_rate", sum(r is None for r in rewards) / max(1, len(rewards)))
        return rewards


def judge_reward(src: Any, seed: int = 0, backend: Any = None) -> JudgeReward:
    """Build a :class:`JudgeReward` from the config (loading the backend unless given)."""
    from rlaif.backends import load_backend
    from rlaif.backends.base import SamplingParams
    from rlaif.constitution import load_constitution
    from rlaif.prompts import PromptBook
    from rlaif.stages.judge import JudgeConfig

    cfg = JudgeConfig(
        mode=src.mode,
        principles_k=src.principles_k,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=src.max_new_tokens),
    )
    if backend is None:
        backend = load_backend(src.backend, src.judge_model, **src.options)
    return JudgeReward(
        backend,
        load_constitution(src.constitution),
        PromptBook(src.templates),
        cfg,
        reference=src.reference,
        seed=seed,
        system=src.system,
    )


class _Tally:
    """Counts of a reward function's calls and of the completions it could not score."""

    calls = 0
    errors = 0

    def _tally(self, out: list[float | None]) -> list[float | None]:
        self.calls += len(out)
        self.errors += sum(r is None for r in out)
        return out

    def _labels(self, kwargs: dict[str, Any], n: int) -> list[Any]:
        return list(kwargs.get(self.label_column) or [None] * n)  # type: ignore[attr-defined]


class RuleReward(_Tally):
    """A TRL reward function: a completion's mean score over the constitution's checks.

    Args:
        principles: the principles with a ``check``.
        label_column: the data column with each prompt's label (absent: no label).
    """

    __name__ = "rule"

    def __init__(self, principles: Any, label_column: str = "label") -> None:
        self.principles = [p for p in principles if getattr(p, "check", None) is not None]
        if not self.principles:
            raise ConfigError("the constitution has no principle with a check",
                              field="reward.constitution")  # fmt: skip
        self.label_column = label_column

    def __call__(
        self, prompts: list[Any], completions: list[Any], **kwargs: Any
    ) -> list[float | None]:
        from rlaif.stages.scored import rule_reward

        labels = self._labels(kwargs, len(completions))
        return self._tally([
            rule_reward(self.principles, _text(c), None if lab is None else str(lab))
            for c, lab in zip(completions, labels, strict=True)
        ])  # fmt: skip


class PythonReward(_Tally):
    """A TRL reward function over the user's :class:`rlaif.stages.scored.PythonScorer`."""

    __name__ = "python"

    def __init__(self, scorer: Any, label_column: str = "label") -> None:
        self.scorer, self.label_column = scorer, label_column

    def __call__(
        self, prompts: list[Any], completions: list[Any], **kwargs: Any
    ) -> list[float | None]:
        convos = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        texts = [_text(c) for c in completions]
        return self._tally(self.scorer(convos, texts, self._labels(kwargs, len(completions))))


def build_reward(src: Any, seed: int = 0, judge_backend: Any = None) -> Any:
    """The reward function of a ``reward:`` section whose kind is not ``model``."""
    if src.kind == "judge":
        return judge_reward(src, seed, judge_backend)
    if src.kind == "rule":
        from rlaif.constitution import load_constitution

        return RuleReward(load_constitution(src.constitution).principles)
    if src.kind == "python":
        from rlaif.stages.scored import load_function

        if not src.function:
            raise ConfigError("missing: the function, as module:name", field="reward.function")
        return PythonReward(load_function(src.function, src.allow_code))
    raise ConfigError(f"no reward function for kind {src.kind!r}", field="reward.kind")
