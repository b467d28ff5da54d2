"""The model-call layer: every request any part of rlaif sends to a model goes through here.

:class:`~rlaif.calls.caller.ModelCaller` answers from the run's call cache, sends the rest to a
backend in batches, isolates failing requests and charges a :class:`~rlaif.calls.budget.Budget`;
:func:`~rlaif.calls.factory.make_caller` builds one for a pipeline's model section.
"""

from rlaif.calls.budget import Budget, BudgetExceeded, Usage
from rlaif.calls.caller import (
    CallStats,
    GenRequest,
    GenResult,
    ModelCaller,
    ScoreRequest,
    ScoreResult,
    request_key,
)
from rlaif.calls.factory import make_caller

__all__ = [
    "Budget",
    "BudgetExceeded",
    "CallStats",
    "GenRequest",
    "GenResult",
    "ModelCaller",
    "ScoreRequest",
    "ScoreResult",
    "Usage",
    "make_caller",
    "request_key",
]
