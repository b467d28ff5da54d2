"""``rlaif train sft|reward|dpo|grpo|rloo|ppo [CONFIG] [--set key=value ...] [--out DIR]``.

Each recipe reads its YAML config (see ``configs/train/``), applies the overrides, trains, and
prints where the model, ``metrics.json`` and the curves went. The work is in
:mod:`rlaif.train`; this module only wires arguments to it.
"""

from __future__ import annotations

import argparse
import dataclasses

from rlaif.errors import ConfigError
from rlaif.train.recipes import RECIPES

# Printed after a run when present in metrics.json, in this order.
_SHOWN = (
    "steps", "train_loss", "eval_accuracy", "eval_loss", "eval_rewards/accuracies",
    "reward_first", "reward_last", "final_reward_mean", "final_kl", "reference_copy", "seconds",
)  # fmt: skip


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rlaif train`` and its recipes to the top-level parser."""
    p = sub.add_parser("train", help="train a policy or a reward model (sft, dpo, reward, ...)")
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name, recipe in RECIPES.items():
        what = recipe.help
        r = recipes.add_parser(name, help=what, description=f"rlaif train {name}: {what}.")
        r.add_argument(
            "config",
            metavar="CONFIG",
            nargs="?",
            help=f"YAML config file (e.g. configs/train/{name}.yaml); defaults without one",
        )
        r.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set max_steps=3 --set lora.enabled=true",
        )
        r.add_argument("--out", metavar="DIR", help="output folder (overrides the config's)")
        r.add_argument("--quiet", action="store_true", help="no progress lines")
        r.set_defaults(func=train_command)


def train_command(args: argparse.Namespace) -> int:
    """Run one recipe from parsed arguments; returns the exit code."""
    from rlaif.train.config import load_train_config

    cls, train = RECIPES[args.recipe].load()
    overrides = list(args.overrides)
    names = {f.name for f in dataclasses.fields(cls)}
    if args.out:
        out_field = next((n for n in ("output", "output_dir") if n in names), None)
        if out_field is None:
            raise ConfigError(f"recipe '{args.recipe}' has no output field", field="--out")
        overrides.append(f"{out_field}={args.out}")
    if args.quiet and "quiet" in names:
        overrides.append("quiet=true")
    cfg = load_train_config(args.config, cls, overrides)
    result = train(cfg)
    metrics = getattr(result, "metrics", {}) or {}
    out_dir = getattr(result, "out_dir", None)
    print(f"\nmodel: {out_dir}")
    for key in _SHOWN:
        value = metrics.get(key)
        if value is not None:
            print(
                f"  {key:<24} {value:.4g}" if isinstance(value, float) else f"  {key:<24} {value}"
            )
    if out_dir is not None:
        print(f"  metrics: {out_dir}/metrics.json")
    curves = getattr(result, "curves", None)
    if curves is not None:
        print(f"  curves:  {curves} (+ curves.png)")
    return 0
