"""Training that resumes mid-step: DPO and PPO killed on a tiny model, resumed, compared.

Each kill is simulated where it matters: after a checkpoint (the run dies mid-way to the next
one), or in the middle of a save (a staging folder is left half-written and must never be
resumed from); one PPO run is killed for real (``os._exit`` in a child process). The resumed
run must match an uninterrupted one on the CPU exactly: the same weights, the same curves
(one line per step, no step twice; only wall-clock seconds may differ), the same step count.
``bench/train_kill_resume.py`` does the same with SIGKILL at random moments.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import rlaif.train.checkpoints as ckpt
from rlaif.train.checkpoints import CHECKPOINTS, complete

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "step_time", "train_runtime", "train_samples_per_second",
          "train_steps_per_second", "eval_runtime", "eval_samples_per_second",
          "eval_steps_per_second")  # fmt: skip


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the recipe catches a BaseException."""


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _curves(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (folder / "curves.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _same_run(ref: Path, resumed: Path) -> None:
    a, b = _weights(ref), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # exactly: the CPU is deterministic
    assert _curves(resumed) == _curves(ref)
    assert not (resumed / CHECKPOINTS).exists()  # removed once the model is saved


# -- DPO ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    import datasets

    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}, a helpful answer."}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i in range(12)
    ]
    path = tmp_path_factory.mktemp("prefs") / "disk"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:10]),
            "test": datasets.Dataset.from_list(rows[10:]),
        }
    ).save_to_disk(str(path))
    return path


def _dpo_cfg(tiny: Path, data: Path, out: Path, *extra: str) -> Any:
    from rlaif.train.config import load_train_config
    from rlaif.train.dpo import DPOTrainConfig

    base = [f"model={tiny}", f"dataset={data}", f"output={out}", "max_steps=5", "batch_size=4",
            "max_length=64", "learning_rate=1e-3", "device=cpu", "quiet=true",
            "checkpoint_every=2", "keep_checkpoints=1"]  # fmt: skip
    return load_train_config(None, DPOTrainConfig, [*base, *extra])


@pytest.fixture(scope="module")
def dpo_ref(tmp_path_factory, tiny_model_dir, prefs) -> Path:
    from rlaif.train.dpo import train_dpo

    out = tmp_path_factory.mktemp("dpo") / "ref"
    train_dpo(_dpo_cfg(tiny_model_dir, prefs, out))
    return out


def _kill_trl_at(monkeypatch, step: int) -> None:
    """The trainer dies once ``step`` is logged (before its checkpoint, if it has one)."""
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_log(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Killed

    real = ckpt.trl_checkpoints

    def with_kill(trainer, resume, curves):
        real(trainer, resume, curves)
        trainer.add_callback(Kill())

    monkeypatch.setattr(ckpt, "trl_checkpoints", with_kill)


def _kill_mid_save(monkeypatch, nth: int) -> None:
    """The ``nth`` save dies with its staging folder half-written (one file cut short)."""
    calls = {"n": 0}
    real = ckpt.fsync_tree

    def half(root: Path) -> None:
        calls["n"] += 1
        if calls["n"] == nth:
            biggest = max(
                (p for p in root.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
            )
            biggest.write_bytes(biggest.read_bytes()[:100])
            raise Killed
        real(root)

    monkeypatch.setattr(ckpt, "fsync_tree", half)


def test_dpo_killed_after_a_checkpoint_resumes_exactly(tmp_path, tiny_model_dir, prefs, dpo_ref):
    """Killed once step 3 is logged: checkpoint 2 is the resume point, step 3 is done again
    (once in the end result), the curves are cut back to step 2's lines."""
    from rlaif.train.dpo import train_dpo

    out = tmp_path / "out"
    cfg = _dpo_cfg(tiny_model_dir, prefs, out)
    with pytest.MonkeyPatch.context() as mp:
        _kill_trl_at(mp, 3)
        with pytest.raises(Killed):
            train_dpo(cfg)
    assert [s for s, _ in complete(out / CHECKPOINTS)] == [2]
    assert [r["step"] for r in _curves(out)] == [1, 2, 3]  # step 3 logged before the kill
    result = train_dpo(cfg)
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["steps"] == 5
    _same_run(dpo_ref, out)


def test_dpo_killed_mid_save_never_resumes_from_the_half_checkpoint(
    tmp_path, tiny_model_dir, prefs, dpo_ref
):
    from rlaif.train.dpo import train_dpo

    out = tmp_path / "out"
    cfg = _dpo_cfg(tiny_model_dir, prefs, out)
    with pytest.MonkeyPatch.context() as mp:
        _kill_mid_save(mp, 2)  # the save of step 4
        with pytest.raises(Killed):
            train_dpo(cfg)
    names = sorted(p.name for p in (out / CHECKPOINTS).iterdir())
    assert "checkpoint-4" in names and [s for s, _ in complete(out / CHECKPOINTS)] == [2]
    result = train_dpo(cfg)
    assert result.metrics["resumed_from_step"] == 2
    _same_run(dpo_ref, out)


def test_dpo_killed_after_its_last_step_trains_no_step_more(
    tmp_path, tiny_model_dir, prefs, dpo_ref, monkeypatch
):
    """The last step gets no checkpoint (transformers 5, resumed from a checkpoint at
    max_steps, would train a step more): killed before the model is saved, the run resumes
    from step 4 and ends at step 5. Saving every step changes no number (not in the hash)."""
    from rlaif.train import dpo

    out = tmp_path / "out"
    cfg = _dpo_cfg(tiny_model_dir, prefs, out, "checkpoint_every=1")

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dpo, "save_model", killed)
        with pytest.raises(Killed):
            dpo.train_dpo(cfg)
    assert [s for s, _ in complete(out / CHECKPOINTS)] == [4]
    result = dpo.train_dpo(cfg)
    assert result.metrics["resumed_from_step"] == 4 and result.metrics["steps"] == 5
    _same_run(dpo_ref, out)


def test_changed_settings_start_from_step_0(tmp_path, tiny_model_dir, prefs):
    from rlaif.train.dpo import train_dpo

    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        _kill_trl_at(mp, 3)
        with pytest.raises(Killed):
            train_dpo(_dpo_cfg(tiny_model_dir, prefs, out))
    result = train_dpo(_dpo_cfg(tiny_model_dir, prefs, out, "beta=0.2", "max_steps=2"))
    assert result.metrics["resumed_from_step"] == 0
    assert [r["step"] for r in _curves(out) if "loss" in r] == [1, 2]


def test_pipeline_train_step_resumes_then_skips(tmp_path, tiny_model_dir, prefs, dpo_ref):
    """A killed pipeline step of the same hash continues from its checkpoint; a finished one
    is skipped; a changed one starts from an empty folder."""
    from rlaif.pipeline.train_steps import run_training

    out = tmp_path / "run" / "train" / "dpo"
    cfg = _dpo_cfg(tiny_model_dir, prefs, out)
    stream = io.StringIO()

    def step(c: Any) -> Any:
        return run_training("dpo", "dpo", c, out, tmp_path / "run", {}, stream, "stages.train[0]")

    with pytest.MonkeyPatch.context() as mp:
        _kill_trl_at(mp, 3)
        with pytest.raises(Killed):
            step(cfg)
    assert step(cfg).status == "trained"
    assert "resuming from step 2" in stream.getvalue()
    _same_run(dpo_ref, out)
    assert step(cfg).status == "skipped"
    (out / CHECKPOINTS / "step-00000004").mkdir(parents=True)  # as if left by another run
    assert step(_dpo_cfg(tiny_model_dir, prefs, out, "max_steps=1")).status == "trained"
    assert [r["step"] for r in _curves(out) if "loss" in r] == [1]


@pytest.mark.parametrize("trainer", ["reward", "sft", "grpo", "rloo"])
def test_the_other_trl_recipes_resume_exactly(tmp_path, tiny_model_dir, prefs, trainer):
    """Killed once step 3 is logged, resumed from checkpoint 2: the same weights and curves."""
    from rlaif.train.config import load_train_config
    from rlaif.train.recipes import RECIPES

    data = prefs
    extra: list[str] = []
    if trainer == "sft":
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(
            json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                     {"role": "assistant", "content": f"Answer {i}, fully."}]})
            + "\n" for i in range(10)))  # fmt: skip
    if trainer in ("grpo", "rloo"):  # prompts of the preference data, scored by spaces()
        extra = ["reward.kind=python", f"reward.function={__file__}:spaces",
                 "reward.allow_code=true", "num_generations=2",
                 "max_completion_length=6"]  # fmt: skip
    cls, train = RECIPES[trainer].load()

    def cfg(out: Path) -> Any:
        base = [f"model={tiny_model_dir}", f"dataset={data}", f"output={out}", "max_steps=4",
                "batch_size=4", "max_length=64", "learning_rate=1e-3", "device=cpu",
                "quiet=true", "checkpoint_every=2", "keep_checkpoints=1"]  # fmt: skip
        return load_train_config(None, cls, [*base, *extra])

    train(cfg(tmp_path / "ref"))
    with pytest.MonkeyPatch.context() as mp:
        _kill_trl_at(mp, 3)
        with pytest.raises(Killed):
            train(cfg(tmp_path / "out"))
    result = train(cfg(tmp_path / "out"))
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["steps"] == 4
    _same_run(tmp_path / "ref", tmp_path / "out")


# -- PPO ------------------------------------------------------------------------------------------


def spaces(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
    return [float(c.count(" ")) for c in completions]


def _ppo_cfg(tiny: Path, prompts: Path, out: Path, **kw: Any) -> Any:
    from rlaif.train.ppo import PPOConfig

    base = dict(model=str(tiny), output=str(out), device="cpu", quiet=True, prompts=str(prompts),
                total_steps=5, batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                max_completion_length=6, checkpoint_every=2, keep_checkpoints=1)  # fmt: skip
    return PPOConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    # 7 prompts, 4 per step: the passes over them straddle steps, so the order is state too
    path.write_text("".join(json.dumps({"prompt": f"Tell me about {i}."}) + "\n" for i in range(7)))
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["full", "lora"])
def ppo_ref(request, tmp_path_factory, tiny_model_dir, prompts) -> tuple[Path, bool]:
    from rlaif.train.config import LoraSettings
    from rlaif.train.ppo import train_ppo

    lora = LoraSettings(enabled=request.param)
    out = tmp_path_factory.mktemp("ppo") / "ref"
    train_ppo(_ppo_cfg(tiny_model_dir, prompts, out, lora=lora), reward_fn=spaces)
    return out, request.param


@pytest.mark.parametrize("where", ["after-checkpoint", "mid-save"])
def test_ppo_killed_resumes_exactly(tmp_path, tiny_model_dir, prompts, ppo_ref, where):
    from rlaif.train import ppo
    from rlaif.train.config import LoraSettings

    ref, lora = ppo_ref
    out = tmp_path / "out"
    cfg = _ppo_cfg(tiny_model_dir, prompts, out, lora=LoraSettings(enabled=lora))
    reward = spaces
    with pytest.MonkeyPatch.context() as mp:
        if where == "mid-save":
            _kill_mid_save(mp, 2)  # the save of step 4
        else:
            reward = _kill_reward(3)  # in step 3: step 2 is the last checkpoint
        with pytest.raises(Killed):
            ppo.train_ppo(cfg, reward_fn=reward)
    assert [s for s, _ in complete(out / CHECKPOINTS)] == [2]
    result = ppo.train_ppo(cfg, reward_fn=spaces)
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["steps"] == 5
    assert [r["step"] for r in _curves(out)] == [1, 2, 3, 4, 5]
    _same_run(ref, out)


def _kill_reward(at: int) -> Any:
    calls = {"n": 0}

    def reward(prompts: Any, completions: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == at:
            raise Killed
        return spaces(prompts, completions)

    return reward


CHILD = """
import os, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_train_resume import _ppo_cfg, spaces
calls = {{"n": 0}}
def reward(prompts, completions, **kw):
    calls["n"] += 1
    if calls["n"] == {kill_at} and not os.environ.get("RESUME"):
        os._exit(137)  # no cleanup, no finally: as a SIGKILL leaves a process
    return spaces(prompts, completions)
from rlaif.train.ppo import train_ppo
train_ppo(_ppo_cfg(Path({tiny!r}), Path({prompts!r}), Path({out!r})), reward_fn=reward)
"""


@pytest.mark.parametrize("ppo_ref", [False], ids=["full"], indirect=True)
def test_ppo_dies_for_real_and_resumes(tmp_path, tiny_model_dir, prompts, ppo_ref):
    """``os._exit`` in the middle of step 5 (after checkpoint 4), then the same command again."""
    ref, _ = ppo_ref
    out = tmp_path / "out"
    code = CHILD.format(root=str(ROOT), kill_at=5, tiny=str(tiny_model_dir),
                        prompts=str(prompts), out=str(out))  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert first.returncode == 137, first.stderr[-2000:]
    assert [s for s, _ in complete(out / CHECKPOINTS)] == [4]
    second = subprocess.run(
        [sys.executable, "-c", code], env={**env, "RESUME": "1"}, capture_output=True, text=True
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 4
    _same_run(ref, out)
