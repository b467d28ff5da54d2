"""The pipeline file's schema: typed dataclasses a pipeline YAML maps onto.

:func:`rlaif.pipeline.load_pipeline` reads a file onto :class:`PipelineConfig` through
:mod:`rlaif.config.binder` and then checks what types alone cannot (ranges, one stage's
settings against another's, the training steps). The schema sits low in the package so the
model-call layer, stages, export and train can all read their section without importing the
pipeline that runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.backends.base import SamplingParams


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
    """Where the prompts come from: ``path`` (a local file or folder) or ``dataset`` (a
    Hugging Face Hub dataset by name, or a local folder laid out as one, read through
    ``datasets.load_dataset``; see :mod:`rlaif.sources.hub`)."""

    path: str = ""
    format: str = "auto"  # auto | jsonl | csv | parquet | disk
    field: str = "prompt"  # column holding the prompt: text, messages, or an HH transcript
    id_field: str | None = None
    split: str | None = None  # a dataset's split, or a DatasetDict saved with save_to_disk
    limit: int | None = None
    offset: int = 0
    label_field: str | None = None  # a column of labels (harmful, safe, ...) for rule checks
    dataset: str | None = None  # "Anthropic/hh-rlhf", or a folder that is a dataset repo
    config: str | None = None  # the dataset's subset (its config name)
    revision: str | None = None  # a Hub branch, tag or commit; the resolved sha is recorded
    # globs of data files: a list, or {split: globs}; inside the dataset, or (alone) relative
    # to the pipeline file
    data_files: Any = None
    streaming: bool = False  # iterate the data files instead of caching the whole set first


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
    """The AI judge: both orders, soft labels; :func:`rlaif.stages.judge.judge_config` turns it
    into the :class:`~rlaif.stages.judge.JudgeConfig` the judge runs with."""

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
    # who judges (rlaif.stages.scored): auto (principles with a check by rule, the rest by
    # the AI judge) | ai | rule | python (``function``) | reward_model (``reward_model``)
    kind: str = "auto"
    function: str | None = None  # python: "module:name" or "file.py:name" (pipeline-relative)
    allow_code: bool = False  # python: the function is your code; it runs only when true
    reward_model: str | None = None  # a reward model folder (in steps: a reward step's name)
    scale: float = 1.0  # python / reward_model: p = sigmoid(scale * (score_x - score_y))
    label_noise: float = 0.0  # this fraction of verdicts is turned around (seeded per pair)
    # the AI judge's prior for the option labels themselves, removed from every verdict before
    # the tie rule (rlaif.stages.calibrate): none | pride (estimated from the run's own pairs,
    # both orders, no labels) | content_free (from requests whose responses carry no content)
    calibrate: str = "none"
    calibration_sample: int = 64  # pairs (or content-free requests) the prior is estimated on


@dataclass
class ExportConfig:
    sft: bool = True  # prompt + final revision, TRL "messages" format
    pairs: bool = True  # CAI-SL pairs: revision chosen, initial response rejected
    formats: list[str] = field(default_factory=lambda: ["jsonl", "disk"])
    show: int = 3  # rows printed at the end
    # judged preference datasets: the fields of rlaif.export.filters.PreferenceExportConfig,
    # checked when the pipeline is loaded
    preferences: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainStepConfig:
    """One training step after the data stages; see :mod:`rlaif.pipeline.train_steps`.

    Attributes:
        name: the step's folder under ``RUN_DIR/train/``; unique within the pipeline.
        trainer: a recipe of :data:`rlaif.train.recipes.RECIPES` (sft, reward, dpo, grpo,
            rloo, ppo).
        config: a training YAML (``configs/train/*.yaml``), relative to the pipeline file;
            None starts from the recipe's defaults.
        data: reward / dpo: ``auto`` (the judged preferences when ``stages.judge`` runs, else
            the CAI-SL pairs), ``preferences`` or ``pairs``; sft: ``auto`` or ``sft`` (the
            final revisions).
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
    """The last trained policy against the pipeline's model; see :mod:`rlaif.pipeline.eval_step`.

    Attributes:
        red_team: harmful prompts (judged harmlessness, refusal rate), relative to the
            pipeline file.
        safe: safe prompts that look unsafe (XSTest-style over-refusal).
        prompts: general held-out prompts (win rate only).
        field: the prompt column of those files.
        label_field: a column of ``prompts`` with each prompt's label (harmful, safe, ...) for
            the compliance with code-checked principles; ``red_team`` prompts are labelled
            harmful and ``safe`` ones safe.
        limit: first N prompts of each file.
        max_new_tokens: greedy generation budget per response.
        judge: the judge model; default: ``stages.judge.model``, else the pipeline's model.
        reward_model: also score responses with the last ``reward`` step's model.
        plots: write the PNG plots next to ``eval.json``.
        win_rate: judge the policy against the baseline (false: no AI judging for the win
            rate, e.g. when compliance with code-checked principles is what counts).
    """

    red_team: str | None = None
    safe: str | None = None
    prompts: str | None = None
    field: str = "prompt"
    label_field: str | None = None
    limit: int | None = None
    max_new_tokens: int = 128
    judge: ModelConfig | None = None
    reward_model: bool = True
    plots: bool = True
    win_rate: bool = True


@dataclass
class ContrastFilterConfig:
    """Filters of contrast pairs; they only drop pairs, never relabel them. A ``judge`` section
    beside ``contrast`` is the third filter: its verdict drops a pair when P(positive better)
    is below ``min_p`` (RLCD-Rescore's judge, used as a filter)."""

    min_p: float = 0.5
    # a rule check (the `check:` vocabulary of constitutions) every pair must not fail the
    # wrong way: drop the pair when the check prefers the negative response; ``principle``
    # uses the check of the pair's own principle, where it has one
    check: Any = None


@dataclass
class ContrastStageConfig:
    """RLCD (rlaif.stages.contrast): both responses of a pair from the same prompt, one under a
    principle's positive instruction and one under its negative; the positive is chosen by
    construction and the exported prompt is the plain prompt.

    placement: ``assistant`` (the paper: the affix opens the final assistant turn, the
    opposite affix opens earlier assistant turns) or ``system`` (a system message that asks
    for the affix's kind of response).
    """

    placement: str = "assistant"
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(temperature=1.0, top_p=0.95, max_new_tokens=256)
    )
    filter: ContrastFilterConfig = field(default_factory=ContrastFilterConfig)


@dataclass
class StepConfig:
    """One entry of a pipeline's ``steps:`` list (:mod:`rlaif.pipeline.plan`): a data step, a
    training step, an evaluation or a block of rounds, told apart by the keys it sets.

    A model reference (``model``, ``judge_model``, ``baseline``) is ``base`` (the pipeline's
    model), ``policy`` (the newest policy an earlier training step produced, else the base)
    or the name of an earlier training step.

    Attributes:
        name: the step's folder under ``RUN_DIR/steps/``; unique among its siblings.
        model: a data step's policy, the model a training step starts from, or the policy an
            evaluation tests. Default: ``policy`` (``base`` for a reward step).
        critique_revise, sample, judge, export: a data step: the ``stages:`` sections of the
            same names, run on ``model`` (records, caches and exports in the step's folder).
        judge_model: the judge of a data step (default ``base``), unless ``judge.model`` names
            a model outright.
        prompts: a data step's prompts (default: the pipeline's ``prompts``).
        samples_from: a data step with only a ``judge`` section judges the sampled responses of
            this earlier data step (its model, prompts and samples, copied, not sampled
            again): the same candidate pairs under several judges.
        trainer: a training step: a recipe (sft, reward, dpo, grpo, rloo, ppo).
        config, set: the training YAML (relative to the pipeline file) and its overrides.
        data: the data step whose export a training step reads (default: the last one).
        dataset: which export: ``auto`` (sft: the final revisions; reward / dpo: the judged
            preferences when that step judged, else the CAI-SL pairs), ``sft``,
            ``preferences`` or ``pairs``.
        reward: the reward step an online RL step (ppo, grpo, rloo) scores with (default:
            the last earlier one).
        eval_data: a reward or dpo step is scored on the held-out pairs of this data step
            instead of its own (one set of labels for every arm of an experiment).
        eval: an evaluation: ``model`` against ``baseline`` (default ``base``).
        rounds: a block: ``steps`` repeated ``rounds`` times, each round in
            ``RUN_DIR/steps/<name>/<k>/``; ``policy`` in round k starts where round k-1 ended.
        rotate_prompts: in a block, round k's data steps take the next ``prompts.limit``
            prompts (``offset + (k - 1) * limit``) instead of the same ones.
    """

    name: str = ""
    model: str | None = None
    critique_revise: CritiqueReviseConfig | None = None
    sample: GenerationConfig | None = None
    contrast: ContrastStageConfig | None = None
    judge: JudgeStageConfig | None = None
    export: ExportConfig = field(default_factory=ExportConfig)
    judge_model: str | None = None
    prompts: PromptSourceConfig | None = None
    samples_from: str | None = None
    trainer: str = ""
    config: str | None = None
    data: str | None = None
    dataset: str = "auto"
    reward: str | None = None
    eval_data: str | None = None
    set: dict[str, Any] = field(default_factory=dict)
    eval: EvalStageConfig | None = None
    baseline: str = "base"
    rounds: int | None = None
    rotate_prompts: bool = False
    steps: list[StepConfig] = field(default_factory=list)


@dataclass
class StagesConfig:
    critique_revise: CritiqueReviseConfig | None = None
    sample: GenerationConfig | None = None  # RL-CAI: n responses per prompt from the policy
    contrast: ContrastStageConfig | None = None  # RLCD: a positive and a negative response
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
    (:mod:`rlaif.calls.budget`). A cap left null is off; cache hits cost nothing."""

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
    # the ordered form: data, training and evaluation steps (and blocks of rounds) in the
    # order they run, each able to use the models earlier steps trained; instead of `stages`
    steps: list[StepConfig] = field(default_factory=list)
    # the pipeline file, for resolving relative paths; set by the loader, not by users
    path: str | None = field(default=None, metadata={"internal": True})
    # a data step of the `steps:` form: which training steps made its model and judge
    # ({"model": {"step": name, "hash": ...}}); set by the step runner, kept in provenance
    model_from: dict[str, Any] = field(default_factory=dict, metadata={"internal": True})

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
        d.pop("model_from")
        if not d["steps"]:  # the stages form: its manifests stay as they were
            d.pop("steps")
        return d


CHOICES = {  # fields whose value must be one of these
    "model.backend": ("auto", "transformers", "vllm", "openai", "fake"),
    "prompts.format": ("auto", "jsonl", "csv", "parquet", "disk"),
    "execution.mode": ("local", "ray"),
}
