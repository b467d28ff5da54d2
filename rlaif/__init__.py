"""rlaif: Constitutional AI and RLAIF, from a YAML constitution to an aligned model.

The public API, importable from here (heavy libraries such as torch load only when a model
backend is actually used)::

    from rlaif import load_constitution, PromptBook, load_pipeline, run_pipeline
"""

from rlaif.backends import (
    DEFAULT_MODEL,
    Backend,
    FakeBackend,
    SamplingParams,
    load_backend,
    resolve_model,
)
from rlaif.constitution import (
    Constitution,
    Principle,
    diff_constitutions,
    import_constitution,
    load_constitution,
)
from rlaif.errors import ConfigError, DataError, ModelError, RlaifError
from rlaif.pipeline import PipelineConfig, load_pipeline, read_prompts, run_pipeline
from rlaif.prompts import PromptBook, RenderedPrompt
from rlaif.stages.judge import JudgeConfig, Verdict
from rlaif.version import __version__

__all__ = [
    "DEFAULT_MODEL",
    "Backend",
    "ConfigError",
    "Constitution",
    "DataError",
    "FakeBackend",
    "JudgeConfig",
    "ModelError",
    "PipelineConfig",
    "Principle",
    "PromptBook",
    "RenderedPrompt",
    "RlaifError",
    "SamplingParams",
    "Verdict",
    "__version__",
    "diff_constitutions",
    "import_constitution",
    "load_backend",
    "load_constitution",
    "load_pipeline",
    "read_prompts",
    "resolve_model",
    "run_pipeline",
]
