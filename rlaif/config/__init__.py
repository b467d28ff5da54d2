"""Configuration: the pipeline file's schema and the one YAML binder every config goes through.

:mod:`rlaif.config.schema` holds the dataclasses a pipeline YAML maps onto;
:mod:`rlaif.config.binder` builds dataclasses from YAML with file, line and field in every
error. Loading and checking a whole pipeline is :func:`rlaif.pipeline.load_pipeline`.
"""

from rlaif.config.binder import apply_override, bind, load_config, locate
from rlaif.config.schema import PipelineConfig

__all__ = ["PipelineConfig", "apply_override", "bind", "load_config", "locate"]
