"""Pipelines: config files, prompt sources, model calls and the resumable runner."""

from rlaif.config.schema import PipelineConfig
from rlaif.pipeline.load import load_pipeline
from rlaif.pipeline.runner import RunResult, run_pipeline
from rlaif.pipeline.step_runner import StepsResult, run_steps
from rlaif.sources import PromptItem, read_prompts

__all__ = [
    "PipelineConfig",
    "PromptItem",
    "RunResult",
    "StepsResult",
    "load_pipeline",
    "read_prompts",
    "run_pipeline",
    "run_steps",
]
