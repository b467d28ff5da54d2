"""The table of training recipes: the one list that ``rlaif train``, the pipeline's config
check and its training steps all read.

A recipe is a module with a config dataclass and a ``train_<name>(cfg) -> TrainResult``
function; the table names them as text, so reading it imports no trainer (and no torch).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from rlaif.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    """One training recipe.

    Attributes:
        name: the ``rlaif train`` sub-command and the pipeline's ``trainer:`` value.
        module: the module holding the recipe.
        config: the name of its config dataclass in ``module``.
        train: the name of its train function in ``module``.
        help: what it does, for ``rlaif train --help``.
        policy: it produces a policy (a reward recipe produces a scorer).
        online: it samples on prompts and needs a reward (a reward model or a judge).
    """

    name: str
    module: str
    config: str
    train: str
    help: str
    policy: bool
    online: bool = False

    def load(self) -> tuple[type, Any]:
        """Import the recipe: its config class and its train function.

        Raises:
            ConfigError: the recipe's module is not part of this build.
        """
        if importlib.util.find_spec(self.module) is None:
            raise ConfigError(
                f"recipe '{self.name}' is not part of this build ({self.module} is missing)"
            )
        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.train)


# In the order `rlaif train --help` and the pipeline's errors list them.
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("sft", "rlaif.train.sft", "SFTTrainConfig", "train_sft",
               "supervised fine-tuning on chat data (SL-CAI)", policy=True),
        Recipe("reward", "rlaif.train.reward", "RewardTrainConfig", "train_reward",
               "train a reward model", policy=False),
        Recipe("dpo", "rlaif.train.dpo", "DPOTrainConfig", "train_dpo",
               "fine-tune a policy with DPO", policy=True),
        Recipe("grpo", "rlaif.train.online", "GRPOTrainConfig", "train_grpo",
               "online RL with GRPO", policy=True, online=True),
        Recipe("rloo", "rlaif.train.online", "RLOOTrainConfig", "train_rloo",
               "online RL with RLOO", policy=True, online=True),
        Recipe("ppo", "rlaif.train.ppo", "PPOConfig", "train_ppo",
               "online RL with PPO", policy=True, online=True),
    )
}  # fmt: skip
TRAINERS = tuple(RECIPES)
POLICY_TRAINERS = tuple(n for n in TRAINERS if RECIPES[n].policy)
ONLINE_TRAINERS = tuple(n for n in TRAINERS if RECIPES[n].online)
