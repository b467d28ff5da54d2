"""The ``steps:`` form of a pipeline, unrolled into the flat list of steps that runs.

A pipeline's ``steps`` run in order. Each is a data step (critique-revise, sample and/or judge
on a model, with its exports), a training step (a recipe of
:data:`rlaif.train.recipes.RECIPES` on an earlier data step's export), an evaluation, or a
block of rounds: its steps repeated ``rounds`` times, as in iterative DPO.

:func:`plan_steps` resolves every reference before anything runs, so a step that names a model
no earlier step makes is a one-line :class:`ConfigError` at load time. References:

* ``base``: the pipeline's ``model``;
* ``policy``: the newest policy an earlier training step produced (sft, dpo, ppo, grpo,
  rloo), else the base; in round k of a block that is where round k-1 ended;
* a step's name: an earlier training step (``model``, ``reward``) or data step (``data``),
  looked up first in the current round, then among the steps outside the block; a step in
  a block is also reachable from after the block by its full name (``iter/2/dpo``).

Every step's folder is ``RUN_DIR/steps/<full name>``, the full name of a step in round k of
block B being ``B/k/<name>``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from rlaif.config.schema import PipelineConfig, PromptSourceConfig, StepConfig
from rlaif.errors import ConfigError
from rlaif.train.recipes import ONLINE_TRAINERS, POLICY_TRAINERS, TRAINERS

MAX_BLOCK_ROUNDS = 50
STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # becomes a folder name
DATASETS = ("auto", "sft", "preferences", "pairs")
# the keys each kind of step may set, besides `name`
KEYS = {
    "data": {
        "model",
        "critique_revise",
        "sample",
        "contrast",
        "judge",
        "export",
        "judge_model",
        "prompts",
        "samples_from",
    },
    "train": {"model", "trainer", "config", "data", "dataset", "reward", "set", "eval_data"},
    "eval": {"model", "eval", "baseline"},
    "rounds": {"rounds", "rotate_prompts", "steps"},
}


@dataclass
class PlannedStep:
    """One step of the unrolled plan, with every reference resolved.

    Attributes:
        name: the full name (``sft``, ``iter/2/dpo``); the folder is ``RUN_DIR/steps/<name>``.
        kind: ``data``, ``train`` or ``eval``.
        step: the step's section as written.
        at: where it is in the file, for errors (``steps[2].steps[0]``).
        round: the round of its block (1-based), or None outside a block.
        block: the block's name, or None.
        model: ``base`` or the full name of the training step whose model it uses.
        judge_model: a data step's judge: ``base`` or a training step (None: no judge, or
            ``judge.model`` names one outright).
        data: a training step's data step (full name), or None (online RL on prompts).
        dataset: ``sft``, ``preferences`` or ``pairs``; ``""`` for online RL on prompts.
        eval_data: a reward / dpo step's data step whose held-out pairs it is scored on.
        reward: an online RL step's reward step (full name), or None (a judge reward).
        baseline: an evaluation's baseline: ``base`` or a training step.
        prompts: a data step's prompts (with the round's offset applied).
        samples_from: the data step whose samples a judge-only data step judges, or None.
        scorer: the reward step a ``judge.kind: reward_model`` data step scores with (when
            ``judge.reward_model`` names one), or None.
    """

    name: str
    kind: str
    step: StepConfig
    at: str
    round: int | None = None
    block: str | None = None
    model: str = "base"
    judge_model: str | None = None
    data: str | None = None
    dataset: str = ""
    eval_data: str | None = None
    reward: str | None = None
    baseline: str = "base"
    prompts: PromptSourceConfig | None = None
    samples_from: str | None = None
    scorer: str | None = None

    @property
    def trainer(self) -> str:
        return self.step.trainer


def step_kind(step: StepConfig) -> list[str]:
    """The kinds a step's keys say it is (one, when the step is well formed)."""
    kinds = []
    data = (step.critique_revise, step.sample, step.contrast, step.judge)
    if any(section is not None for section in data):
        kinds.append("data")
    if step.trainer:
        kinds.append("train")
    if step.eval is not None:
        kinds.append("eval")
    if step.rounds is not None or step.steps:
        kinds.append("rounds")
    return kinds


def reward_kind(step: StepConfig) -> str:
    """Where an online RL step's reward comes from: ``model`` (a reward step, the default) or
    what ``set: {reward: {kind: ...}}`` says (``judge``, ``rule``, ``python``)."""
    reward = step.set.get("reward")
    kind = reward.get("kind") if isinstance(reward, dict) else None
    return kind if isinstance(kind, str) else "model"


def judge_reward(step: StepConfig) -> bool:
    """Whether an online RL step scores with the AI judge (``set: {reward: {kind: judge}}``)."""
    return reward_kind(step) == "judge"


def _fail(msg: str, field: str) -> ConfigError:
    return ConfigError(msg, field=field)


@dataclass
class _Scope:
    """What the steps so far made, for resolving references."""

    done: dict[str, PlannedStep] = dataclasses.field(default_factory=dict)  # full name -> step
    policy: str = "base"

    def find(self, ref: str, local: dict[str, str], at: str) -> PlannedStep:
        full = local.get(ref, ref)
        found = self.done.get(full)
        if found is None:
            earlier = ", ".join(self.done) or "none"
            raise _fail(f"no earlier step named '{ref}' (earlier steps: {earlier})", at)
        return found

    def model(self, ref: str | None, default: str, local: dict[str, str], at: str) -> str:
        ref = ref or default
        if ref == "base":
            return "base"
        if ref == "policy":
            return self.policy
        found = self.find(ref, local, at)
        if found.kind != "train":
            raise _fail(f"'{ref}' is a {found.kind} step, not a training step: no model", at)
        if found.trainer not in POLICY_TRAINERS:
            raise _fail(f"'{ref}' trains a reward model, not a language model", at)
        return found.name


def plan_steps(cfg: PipelineConfig) -> list[PlannedStep]:
    """The pipeline's ``steps`` unrolled and resolved, in the order they run.

    Raises:
        ConfigError: a malformed step or a reference to no earlier step; ``field`` is the
            dotted place in the file (``steps[2].model``), without file and line.
    """
    out: list[PlannedStep] = []
    scope = _Scope()
    _plan(cfg, cfg.steps, "steps", None, None, {}, scope, out)
    return out


def _plan(
    cfg: PipelineConfig,
    steps: list[StepConfig],
    where: str,
    block: str | None,
    round_: int | None,
    local: dict[str, str],
    scope: _Scope,
    out: list[PlannedStep],
) -> None:
    names: set[str] = set()
    prefix = f"{block}/{round_}/" if block is not None else ""
    for i, step in enumerate(steps):
        at = f"{where}[{i}]"
        if not step.name:
            raise _fail("missing: the step's name (its folder under steps/)", f"{at}.name")
        if not STEP_NAME.fullmatch(step.name):
            raise _fail("use letters, digits, '.', '_' and '-' (at most 64)", f"{at}.name")
        if step.name in names or (block is None and step.name in scope.done):
            raise _fail(f"duplicate step name '{step.name}'", f"{at}.name")
        names.add(step.name)
        kinds = step_kind(step)
        if len(kinds) != 1:
            raise _fail(
                "a step is one of: a data step (critique_revise / sample / contrast / judge), a "
                "training step (trainer), an evaluation (eval) or a block (rounds + steps)"
                + (f"; this one sets keys of {' and '.join(kinds)}" if kinds else ""),
                at,
            )
        kind = kinds[0]
        if kind == "rounds":
            _plan_block(cfg, step, at, block, scope, out)
            continue
        full = prefix + step.name
        p = PlannedStep(full, kind, step, at, round_, block)
        if kind == "data":
            _plan_data(cfg, p, local, scope, round_)
        elif kind == "train":
            _plan_train(p, local, scope)
        else:
            p.model = scope.model(step.model, "policy", local, f"{at}.model")
            p.baseline = scope.model(step.baseline, "base", local, f"{at}.baseline")
            if p.model == "base":
                raise _fail("no trained policy to evaluate: add a training step before it",
                            f"{at}.model")  # fmt: skip
            if p.model == p.baseline:
                raise _fail(
                    f"the evaluation compares '{p.model}' with itself: train a policy first or "
                    "name another baseline",
                    f"{at}.model",
                )
        out.append(p)
        scope.done[full] = p
        local[step.name] = full


def _plan_block(
    cfg: PipelineConfig,
    step: StepConfig,
    at: str,
    block: str | None,
    scope: _Scope,
    out: list[PlannedStep],
) -> None:
    if block is not None:
        raise _fail("a block of rounds cannot hold another block", at)
    if step.rounds is None or not 1 <= step.rounds <= MAX_BLOCK_ROUNDS:
        raise _fail(f"must be between 1 and {MAX_BLOCK_ROUNDS}", f"{at}.rounds")
    if not step.steps:
        raise _fail("missing: the steps each round runs", f"{at}.steps")
    if step.model is not None:
        raise _fail("a block has no model: set it on the steps inside", f"{at}.model")
    for k in range(1, step.rounds + 1):
        # names outside the block stay reachable; the round's own names shadow them
        local = {s.name: s.name for s in scope.done.values() if s.block is None}
        _plan(cfg, step.steps, f"{at}.steps", step.name, k, local, scope, out)
    if step.rotate_prompts:
        for p in out:
            if p.block == step.name and p.kind == "data":
                src = p.prompts or cfg.prompts
                if src.limit is None:
                    raise _fail("rotate_prompts needs prompts.limit (the prompts per round)",
                                f"{at}.rotate_prompts")  # fmt: skip
                shift = (p.round - 1) * src.limit  # type: ignore[operator]
                p.prompts = dataclasses.replace(src, offset=src.offset + shift)


def _plan_data(
    cfg: PipelineConfig, p: PlannedStep, local: dict[str, str], scope: _Scope, round_: int | None
) -> None:
    s = p.step
    p.model = scope.model(s.model, "policy", local, f"{p.at}.model")
    if s.samples_from is not None:
        _plan_samples_from(p, local, scope)
    if s.judge is not None and s.judge.kind == "reward_model" and s.judge.reward_model:
        found = scope.done.get(local.get(s.judge.reward_model, s.judge.reward_model))
        if found is not None:  # else a folder
            if found.kind != "train" or found.trainer != "reward":
                raise _fail(f"'{s.judge.reward_model}' is not a reward step",
                            f"{p.at}.judge.reward_model")  # fmt: skip
            p.scorer = found.name
    if s.judge is not None:
        if s.judge_model is not None and s.judge.model is not None:
            raise _fail("set judge_model or judge.model, not both", f"{p.at}.judge_model")
        if s.judge.model is None:
            p.judge_model = scope.model(s.judge_model, "base", local, f"{p.at}.judge_model")
    elif s.judge_model is not None:
        raise _fail("no judge in this step: add a judge section", f"{p.at}.judge_model")
    if s.samples_from is None:
        p.prompts = s.prompts


def _plan_samples_from(p: PlannedStep, local: dict[str, str], scope: _Scope) -> None:
    s, at = p.step, f"{p.at}.samples_from"
    src = scope.find(s.samples_from or "", local, at)
    if src.kind != "data" or src.step.sample is None:
        raise _fail(f"'{s.samples_from}' is not a data step with a sample section", at)
    extra = [
        k for k in ("critique_revise", "sample", "contrast", "prompts", "model") if getattr(s, k)
    ]
    if extra:
        raise _fail(f"a step with samples_from takes its {extra[0]} from '{s.samples_from}': "
                    f"remove it here", at)  # fmt: skip
    if s.judge is None:
        raise _fail("samples_from needs a judge section (what the step does)", at)
    p.samples_from, p.model, p.prompts = src.name, src.model, src.prompts
    p.step = dataclasses.replace(s, sample=src.step.sample)  # the same requests: found done


def _plan_train(p: PlannedStep, local: dict[str, str], scope: _Scope) -> None:
    s, at = p.step, p.at
    if s.trainer not in TRAINERS:
        raise _fail(f"'{s.trainer}' is not one of {', '.join(TRAINERS)}", f"{at}.trainer")
    if s.dataset not in DATASETS:
        raise _fail(f"'{s.dataset}' is not one of {', '.join(DATASETS)}", f"{at}.dataset")
    policy = s.trainer in POLICY_TRAINERS
    p.model = scope.model(s.model, "policy" if policy else "base", local, f"{at}.model")
    online = s.trainer in ONLINE_TRAINERS
    judge = judge_reward(s)
    code = reward_kind(s) in ("rule", "python")  # scores on the prompts, reads no export
    if not online or judge or s.data is not None:  # reads an export
        if s.data is not None:
            src = scope.find(s.data, local, f"{at}.data")
            if src.kind != "data":
                raise _fail(f"'{s.data}' is a {src.kind} step, not a data step", f"{at}.data")
        else:
            earlier = [d for d in scope.done.values() if d.kind == "data"]
            if not earlier:
                raise _fail("no earlier data step to train on", f"{at}.data")
            src = earlier[-1]
        p.data = src.name
        p.dataset = _dataset(s.trainer, s.dataset, src, f"{at}.dataset")
    if s.eval_data is not None:
        if s.trainer not in ("reward", "dpo"):
            raise _fail("only reward and dpo steps are scored on held-out pairs", f"{at}.eval_data")
        ev = scope.find(s.eval_data, local, f"{at}.eval_data")
        if ev.kind != "data" or ev.step.judge is None:
            raise _fail(f"'{s.eval_data}' is not a data step with judged preferences",
                        f"{at}.eval_data")  # fmt: skip
        p.eval_data = ev.name
    if online and not judge and not code:
        if s.reward is not None:
            r = scope.find(s.reward, local, f"{at}.reward")
        else:
            rewards = [d for d in scope.done.values() if d.trainer == "reward"]
            if not rewards:
                raise _fail(f"{s.trainer} needs a reward model: add a 'reward' step before it",
                            f"{at}.trainer")  # fmt: skip
            r = rewards[-1]
        if r.kind != "train" or r.trainer != "reward":
            raise _fail(f"'{r.name}' is not a reward step", f"{at}.reward")
        p.reward = r.name
    elif s.reward is not None:
        raise _fail("only ppo, grpo and rloo score with a reward model", f"{at}.reward")
    if policy:
        scope.policy = p.name


def _dataset(trainer: str, kind: str, src: PlannedStep, at: str) -> str:
    """Which export of data step ``src`` a ``trainer`` step reads."""
    d = src.step
    has = {
        "sft": d.critique_revise is not None and d.export.sft,
        "pairs": d.critique_revise is not None and d.export.pairs,
        "preferences": d.judge is not None or d.contrast is not None,
    }
    if kind == "auto":
        kind = "sft" if trainer == "sft" else "preferences" if has["preferences"] else "pairs"
    if trainer == "sft" and kind != "sft":
        raise _fail(f"sft trains on the final revisions (dataset: sft), not {kind}", at)
    if trainer != "sft" and kind == "sft":
        raise _fail(f"{trainer} trains on preference pairs, not the sft export", at)
    if not has[kind]:
        need = {
            "sft": "critique_revise with export.sft: true",
            "pairs": "critique_revise with export.pairs: true",
            "preferences": "a judge or contrast section",
        }[kind]
        raise _fail(f"step '{src.name}' exports no {kind}: it needs {need}", at)
    return kind
