"""Training recipes over TRL: reward model, DPO, GRPO / RLOO (and PPO in ``ppo.py``).

Each recipe is ``train_<name>(cfg) -> TrainResult`` with its config dataclass; the shared
pieces live in :mod:`rlaif.train.common`. The recipes (and ``CurveCallback``) are imported on
first use: they pull in torch, transformers and TRL, which ``import rlaif.train`` should not.

Example::

    from rlaif.train import DPOTrainConfig, load_train_config, train_dpo

    cfg = load_train_config("configs/train/dpo.yaml", DPOTrainConfig, ["max_steps=5"])
    result = train_dpo(cfg)
    print(result.out_dir, result.metrics["eval_rewards/accuracies"])
"""

from __future__ import annotations

import importlib
from typing import Any

from rlaif.train.common import (
    BaseTrainConfig,
    CurveLogger,
    LoraSettings,
    TrainResult,
    load_preferences,
    load_train_config,
    resolve_model_path,
    save_model,
)

# name -> module holding it, imported on first access
_LAZY = {
    "CurveCallback": "rlaif.train.common",
    "RewardTrainConfig": "rlaif.train.reward",
    "train_reward": "rlaif.train.reward",
    "DPOTrainConfig": "rlaif.train.dpo",
    "train_dpo": "rlaif.train.dpo",
    "GRPOTrainConfig": "rlaif.train.online",
    "RLOOTrainConfig": "rlaif.train.online",
    "RewardSource": "rlaif.train.online",
    "train_grpo": "rlaif.train.online",
    "train_rloo": "rlaif.train.online",
    "PPOConfig": "rlaif.train.ppo",
    "train_ppo": "rlaif.train.ppo",
}

__all__ = [
    "BaseTrainConfig",
    "CurveLogger",
    "LoraSettings",
    "TrainResult",
    "load_preferences",
    "load_train_config",
    "resolve_model_path",
    "save_model",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
