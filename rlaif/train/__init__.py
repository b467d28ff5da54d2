"""Training recipes over TRL: SFT, reward model, DPO, GRPO / RLOO (and PPO in ``ppo.py``).

Each recipe is ``train_<name>(cfg) -> TrainResult`` with its config dataclass, and
:data:`~rlaif.train.recipes.RECIPES` lists them. The shared pieces: configs
(:mod:`~rlaif.train.config`), data (:mod:`~rlaif.train.data`), curves and progress
(:mod:`~rlaif.train.curves`), LoRA, TRL arguments and saving (:mod:`~rlaif.train.common`).
The recipes (and ``CurveCallback``) are imported on first use: they pull in torch,
transformers and TRL, which ``import rlaif.train`` should not.

Example::

    from rlaif.train import DPOTrainConfig, load_train_config, train_dpo

    cfg = load_train_config("configs/train/dpo.yaml", DPOTrainConfig, ["max_steps=5"])
    result = train_dpo(cfg)
    print(result.out_dir, result.metrics["eval_rewards/accuracies"])
"""

from __future__ import annotations

import importlib
from typing import Any

from rlaif.train.common import TrainResult, resolve_model_path, save_model
from rlaif.train.config import BaseTrainConfig, LoraSettings, load_train_config
from rlaif.train.curves import CurveLogger
from rlaif.train.data import load_preferences
from rlaif.train.recipes import RECIPES, Recipe

# name -> module holding it, imported on first access: every recipe's config class and
# train function (from the one recipe table), and the pieces that need torch or TRL.
_LAZY = {
    "CurveCallback": "rlaif.train.curves",
    "RewardSource": "rlaif.train.online",
    **{r.config: r.module for r in RECIPES.values()},
    **{r.train: r.module for r in RECIPES.values()},
}
__all__ = [
    "BaseTrainConfig",
    "CurveLogger",
    "LoraSettings",
    "RECIPES",
    "Recipe",
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
