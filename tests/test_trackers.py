"""``report_to``: TensorBoard for real (event files read back with TensorBoard's own reader),
W&B and trackio through stand-in modules, and the one-line errors.

The runs are the tiny random model of ``rlaif.testing`` on the CPU, two or three steps each.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from rlaif.errors import ConfigError
from rlaif.train.config import BaseTrainConfig
from rlaif.train.trackers import check_trackers

pytest.importorskip("torch")
SECRET = "sk-test-0123456789abcdef"


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in a TensorBoard log folder, read as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _curves(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines()]


def spaces(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
    return [float(c.count(" ")) for c in completions]


def _ppo(tiny: Path, tmp: Path, **kw: Any) -> Any:
    from rlaif.train.ppo import PPOConfig

    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"Tell me about {i}."}) + "\n" for i in range(6))
    )
    base = dict(model=str(tiny), output=str(tmp / "out"), device="cpu", quiet=True,
                prompts=str(prompts), total_steps=3, batch_size=2, mini_batch_size=2,
                ppo_epochs=1, max_completion_length=4, learning_rate=1e-3)  # fmt: skip
    return PPOConfig(**{**base, **kw})


def test_ppo_logs_to_tensorboard(tmp_path, tiny_model_dir):
    pytest.importorskip("tensorboard")
    from rlaif.train.ppo import train_ppo

    cfg = _ppo(tiny_model_dir, tmp_path, report_to=["tensorboard"])
    train_ppo(cfg, reward_fn=spaces)
    series = _scalars(tmp_path / "out" / "tensorboard")
    rows = _curves(tmp_path / "out")
    for name in ("reward_mean", "kl", "pg_loss", "vf_loss"):
        logged = series[f"train/{name}"]
        assert [s for s, _ in logged] == [1, 2, 3]
        assert [v for _, v in logged] == pytest.approx([r[name] for r in rows], rel=1e-6)


def test_resumed_ppo_shows_each_step_once_in_tensorboard(tmp_path, tiny_model_dir):
    """Killed in step 4 (checkpoint at 2, step 3 logged), resumed from step 2: TensorBoard's
    reader sees steps 1-4 once each, with the values of the resumed run."""
    pytest.importorskip("tensorboard")
    from rlaif.train.ppo import train_ppo

    class Killed(BaseException):
        pass

    calls = {"n": 0}

    def dies_in_step_4(prompts: Any, completions: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed
        return spaces(prompts, completions)

    cfg = _ppo(tiny_model_dir, tmp_path, total_steps=4, checkpoint_every=2,
               report_to=["tensorboard"])  # fmt: skip
    with pytest.raises(Killed):
        train_ppo(cfg, reward_fn=dies_in_step_4)  # steps 1-3 logged, checkpoint at 2
    assert train_ppo(cfg, reward_fn=spaces).metrics["resumed_from_step"] == 2
    logged = _scalars(tmp_path / "out" / "tensorboard")["train/reward_mean"]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    rows = _curves(Path(cfg.output))
    assert [v for _, v in logged] == pytest.approx([r["reward_mean"] for r in rows])


def test_dpo_logs_to_tensorboard_and_writes_no_secret(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("trl")
    import datasets

    from rlaif.train.config import load_train_config
    from rlaif.train.dpo import DPOTrainConfig, train_dpo

    for name in ("WANDB_API_KEY", "HF_TOKEN", "OPENAI_API_KEY"):
        monkeypatch.setenv(name, SECRET)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"A full answer to {i}."}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i in range(8)
    ]
    data = tmp_path / "prefs"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(data))
    out = tmp_path / "out"
    sets = [f"model={tiny_model_dir}", f"dataset={data}", f"output={out}", "max_steps=3",
            "batch_size=4", "max_length=64", "device=cpu", "quiet=true",
            "report_to=[tensorboard]", "eval_at_end=false"]  # fmt: skip
    train_dpo(load_train_config(None, DPOTrainConfig, sets))
    series = _scalars(out / "tensorboard")
    assert [s for s, _ in series["train/loss"]] == [1, 2, 3]
    losses = [r["loss"] for r in _curves(out) if "loss" in r]
    assert [v for _, v in series["train/loss"]] == pytest.approx(losses, rel=1e-6)
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_wandb_and_trackio_get_the_ppo_steps(tmp_path, tiny_model_dir, monkeypatch):
    """Stand-in modules record what the PPO loop hands W&B and trackio: each step's numbers,
    and the config with credentials redacted."""
    from rlaif.train.online import RewardSource
    from rlaif.train.ppo import train_ppo

    seen: dict[str, Any] = {}

    def fake(name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)

        class Run:
            def log(self, numbers: dict, step: int) -> None:
                seen.setdefault(name, []).append((step, numbers))

            def finish(self) -> None:
                seen[f"{name}-finished"] = True

        def init(**kwargs: Any) -> Run:
            seen[f"{name}-init"] = kwargs
            return Run()

        module.init = init  # type: ignore[attr-defined]
        return module

    for name in ("wandb", "trackio"):
        monkeypatch.setitem(sys.modules, name, fake(name))
    reward = RewardSource(options={"api_key": SECRET})
    cfg = _ppo(tiny_model_dir, tmp_path, total_steps=2, reward=reward,
               report_to=["wandb", "trackio"])  # fmt: skip
    train_ppo(cfg, reward_fn=spaces)
    for name in ("wandb", "trackio"):
        assert [step for step, _ in seen[name]] == [1, 2]
        assert "train/reward_mean" in seen[name][0][1] and seen[f"{name}-finished"]
        assert SECRET not in json.dumps(seen[f"{name}-init"]["config"])


def test_tracker_errors_are_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="'mlflow' is not one of tensorboard, trackio, wandb"):
        check_trackers(["mlflow"])
    import rlaif.train.trackers as trackers

    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(ConfigError) as err:
        BaseTrainConfig(report_to=["wandb"]).check()
    assert err.value.field == "report_to"
    assert "wandb is asked for but not installed: pip install wandb" in str(err.value)
    assert "\n" not in str(err.value)
