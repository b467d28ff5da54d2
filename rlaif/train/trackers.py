"""Trackers beside rlaif's own curves: TensorBoard, trackio and Weights & Biases (``report_to``).

TRL recipes hand the names to transformers' integrations (:func:`trl_trackers`), except
TensorBoard, whose writer rlaif opens itself so the event files land in
``<output>/tensorboard`` and a resumed run drops the steps it redoes (``purge_step``). The PPO
loop logs through :class:`Tracker`. Keys, tokens, projects and hosts come from the
environment only (``WANDB_API_KEY``, ``WANDB_PROJECT``, ``TRACKIO_PROJECT``, ...); nothing of
them is written to configs, logs or cards.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlaif.errors import ConfigError

# tracker -> the package it needs
TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}
TENSORBOARD = "tensorboard"  # the event files' folder under a run's output

__all__ = ["TRACKERS", "Tracker", "check_trackers", "trl_trackers"]


def check_trackers(report_to: Sequence[str]) -> None:
    """Fail with one line for an unknown tracker or one whose package is missing.

    Raises:
        ConfigError: naming the tracker and the install command.
    """
    for name in report_to:
        if name not in TRACKERS:
            raise ConfigError(f"'{name}' is not one of {', '.join(TRACKERS)}", field="report_to")
        package = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{name} is asked for but not installed: pip install {package}", field="report_to"
            )


def _writer(out: Path, resume_step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    # purge_step: events of the steps after the checkpoint (logged before the kill) are hidden
    purge = resume_step + 1 if resume_step else None
    return SummaryWriter(str(out / TENSORBOARD), purge_step=purge)


def trl_trackers(report_to: Sequence[str], out: Path, resume_step: int) -> tuple[list, list]:
    """``(report_to, callbacks)`` for a transformers ``Trainer``: the integrations it starts by
    name, and the TensorBoard callback with rlaif's writer."""
    check_trackers(report_to)
    names = [n for n in report_to if n != "tensorboard"]
    callbacks = []
    if "tensorboard" in report_to:
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=_writer(out, resume_step)))
    return names, callbacks


class Tracker:
    """Metrics of rlaif's own loops (PPO) to the trackers in ``report_to``.

    Args:
        report_to: tracker names (see :data:`TRACKERS`).
        out: the run's output folder (TensorBoard writes under it; its name names the run).
        config: the run's settings, shown by W&B and trackio (credentials already redacted).
        resume_step: the step a resumed run continues after (0: a fresh run).
    """

    def __init__(
        self, report_to: Sequence[str], out: Path, config: dict[str, Any], resume_step: int = 0
    ) -> None:
        check_trackers(report_to)
        self.runs: list[tuple[str, Any]] = []
        for name in report_to:
            if name == "tensorboard":
                self.runs.append((name, _writer(out, resume_step)))
            elif name == "wandb":
                import wandb

                project = os.environ.get("WANDB_PROJECT", "rlaif")
                run = wandb.init(project=project, name=out.name, config=config, reinit=True)
                self.runs.append((name, run))
            elif name == "trackio":
                import trackio

                project = os.environ.get("TRACKIO_PROJECT", "rlaif")
                run = trackio.init(project=project, name=out.name, config=config)
                self.runs.append((name, run))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Log one step's numbers (as ``train/<name>``, transformers' naming)."""
        numbers = {f"train/{k}": float(v) for k, v in metrics.items() if _number(v)}
        for name, run in self.runs:
            if name == "tensorboard":
                for key, value in numbers.items():
                    run.add_scalar(key, value, step)
            else:
                run.log(numbers, step=step)

    def close(self) -> None:
        """Flush and close every tracker."""
        for name, run in self.runs:
            if name == "tensorboard":
                run.close()
            else:
                run.finish()
        self.runs = []


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
