"""``rlaif train sft`` (SL-CAI supervised fine-tuning) on the tiny random chat model.

Checked: a few steps train and save a loadable merged model with metrics and curves; the loss
covers the final assistant turn only (prompt tokens, earlier assistant turns included, are
-100 in the labels, and the trainer's loss is the cross-entropy over the completion alone);
the accepted row shapes; one-line data errors naming the file; ``--set``; the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from rlaif.errors import ConfigError, DataError
from rlaif.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]
PROBE = "model.layers.0.self_attn.q_proj.weight"  # a weight LoRA adapts too
QUESTIONS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Write a short poem about the sea.",
    "How do I pick a lock?",
    "Say something kind.",
]


def _sft_rows(n: int, *, multi_turn: bool = False) -> list[dict[str, Any]]:
    """Rows shaped like ``rlaif.export.sl_cai``: prompt turns + the final revision."""
    rows = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)]
        turns = [{"role": "user", "content": q}]
        if multi_turn:
            turns = [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "EARLIER assistant words."},
                *turns,
            ]
        final = {"role": "assistant", "content": f"Revised answer {i}: the sea is wide."}
        rows.append({"messages": [*turns, final], "prompt_id": f"p{i}"})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with an SL-CAI SFT export (``export/sft``, a save_to_disk Dataset)."""
    import datasets

    root = tmp_path_factory.mktemp("sft-run")
    datasets.Dataset.from_list(_sft_rows(12)).save_to_disk(str(root / "export/sft"))
    return root


def _cfg(tiny: Path, data: Path, out: Path, *extra: str) -> Any:
    from rlaif.train.sft import SFTTrainConfig

    base = [
        f"model={tiny}",
        f"dataset={data}",
        f"output={out}",
        "max_steps=2",
        "max_length=128",
        "batch_size=4",
        "learning_rate=1e-3",
        "device=cpu",
        "quiet=true",
    ]
    return load_train_config(None, SFTTrainConfig, [*base, *extra])


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_recipe_trains_and_saves(tmp_path, tiny_model_dir, sft_run_dir, lora):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlaif.train.sft import train_sft

    out = tmp_path / "out"
    result = train_sft(_cfg(tiny_model_dir, sft_run_dir, out, f"lora.enabled={lora}"))
    metrics = result.metrics
    assert result.out_dir == out and result.curves == out / "curves.jsonl"
    assert metrics["steps"] == 2 and metrics["lora"] is lora
    assert metrics["data_source"] == str(sft_run_dir / "export/sft")  # the run's SFT export
    # 12 rows, 10% held out (rounded up to 2): 10 train, 2 test, none dropped.
    assert (metrics["train_rows"], metrics["test_rows"]) == (10, 2)
    assert metrics["dropped_rows"] == {} and metrics["too_long_rows"] == 0
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["seconds"] > 0

    rows = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert any("eval_loss" in r for r in rows)
    assert (out / "curves.png").stat().st_size > 1000
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["config"]["lora"]["enabled"] is lora

    # A plain merged folder: no adapter files, the weights moved, model and tokenizer load.
    assert not (out / "adapter_config.json").exists()
    assert not torch.equal(_weights(out)[PROBE], _weights(tiny_model_dir)[PROBE])
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_loss_covers_only_the_final_assistant_turn(tmp_path, tiny_model_dir):
    """Prompt tokens (system, user, an earlier assistant turn, the generation prompt) are -100;
    exactly the final revision and its end-of-turn tokens are learned, and the trainer's loss
    is the cross-entropy over those tokens alone."""
    import torch

    from rlaif.train.sft import build_sft_trainer

    rows = _sft_rows(6, multi_turn=True)
    data = _write_jsonl(tmp_path / "sft.jsonl", rows)
    setup = build_sft_trainer(_cfg(tiny_model_dir, data, tmp_path / "out", "test_size=0"))
    trainer, tok = setup.trainer, setup.tokenizer
    ds = trainer.train_dataset
    assert len(ds) == 6
    finals = {r["messages"][-1]["content"] for r in rows}
    for ex in ds:
        ids, labels = ex["input_ids"], ex["labels"]
        learned = [i for i, label in zip(ids, labels, strict=True) if label != -100]
        text = tok.decode(learned)
        # The learned tokens are one final revision plus the turn's end (ChatML), nothing else.
        assert text.removesuffix("<|im_end|>\n") in finals, text
        assert "EARLIER" not in text and "Be kind" not in text and "user" not in text
        # Every token before the completion is masked; every token after its start is learned.
        prompt = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=False)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert all(label == -100 for label in labels[:n_prompt])
        assert labels[n_prompt:] == ids[n_prompt:] and len(learned) == len(ids) - n_prompt

    # What the collator hands the model: the same masks, padding also -100.
    batch = trainer.data_collator([ds[i] for i in range(4)])
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[mask == 0] == -100).all()
    for row, ex in zip(labels.tolist(), (ds[i] for i in range(4)), strict=True):
        assert row[: len(ex["labels"])] == ex["labels"]

    # The trainer's loss equals the cross-entropy over the completion tokens only...
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
    ce = torch.nn.functional.cross_entropy
    shift_logits, shift_labels = logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    completion_only = ce(shift_logits, shift_labels, ignore_index=-100).item()
    assert loss == pytest.approx(completion_only, rel=1e-4)
    # ...and not the loss over the whole conversation, which training on the prompt would give
    # (close on a random model, whose every token costs about log(vocab), but not equal).
    every_token = batch["input_ids"].masked_fill(mask == 0, -100)
    with torch.no_grad():
        full = trainer.compute_loss(model, {**batch, "labels": every_token}).item()
    assert full == pytest.approx(ce(shift_logits, every_token[:, 1:].flatten()).item(), rel=1e-4)
    assert abs(full - loss) > 10 * abs(loss - completion_only) + 1e-3


# -- data -------------------------------------------------------------------------------------


def test_row_shapes_become_conversational_prompt_completion(tmp_path):
    from rlaif.train.sft import load_sft_rows, to_prompt_completion

    shape = ("messages",)
    trailing = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "ignored follow-up"},
        ]
    }
    assert to_prompt_completion(trailing, shape) == {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    assert to_prompt_completion({"messages": [{"role": "user", "content": "q"}]}, shape) == (
        "no assistant turn"
    )
    only_answer = {"messages": [{"role": "assistant", "content": "a"}]}
    assert to_prompt_completion(only_answer, shape) == "no prompt before the assistant turn"
    blank = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}
    assert to_prompt_completion(blank, shape) == "empty assistant turn"

    # Plain-text prompt / completion become one user and one assistant message.
    text = to_prompt_completion({"prompt": "q", "completion": "a"}, ("prompt", "completion"))
    assert text == {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    # Preference rows train on the chosen response (CAI-SL pairs: the final revision).
    pair = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    assert to_prompt_completion(pair, ("prompt", "chosen"))["completion"][0]["content"] == "good"

    rows = [*_sft_rows(4), {"messages": [{"role": "user", "content": "no answer"}]}]
    splits, source, dropped = load_sft_rows(_write_jsonl(tmp_path / "m.jsonl", rows), 0.0)
    assert source == tmp_path / "m.jsonl" and dropped == {"no assistant turn": 1}
    assert set(splits) == {"train"} and splits["train"].column_names == ["prompt", "completion"]
    assert len(splits["train"]) == 4
    # A run directory whose export is JSONL only (export.formats: [jsonl]).
    (tmp_path / "run/export").mkdir(parents=True)
    _write_jsonl(tmp_path / "run/export/sft.jsonl", _sft_rows(5))
    splits, source, _ = load_sft_rows(tmp_path / "run", 0.2, seed=1)
    assert source == tmp_path / "run/export/sft.jsonl"
    assert (len(splits["train"]), len(splits["test"])) == (4, 1)


def test_data_errors_are_one_line_naming_the_file(tmp_path, tiny_model_dir, capsys):
    from rlaif.cli.main import main
    from rlaif.train.sft import load_sft_rows

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: field 'dataset': dataset not found"):
        load_sft_rows(missing)
    no_answers = _write_jsonl(
        tmp_path / "no-answers.jsonl",
        [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS],
    )
    with pytest.raises(DataError, match=r"no-answers\.jsonl: no usable chat rows \(5 no assistant"):
        load_sft_rows(no_answers)
    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"wrong\.jsonl: no chat columns.*\(has: text\)"):
        load_sft_rows(wrong)
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(DataError, match="empty-run: not a dataset"):
        load_sft_rows(tmp_path / "empty-run")

    for path, what in ((missing, "dataset not found"), (no_answers, "no usable chat rows")):
        args = ["train", "sft", "--set", f"model={tiny_model_dir}", "--set", f"dataset={path}"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(path) in err and what in err, err


# -- config and CLI ---------------------------------------------------------------------------


def test_config_file_and_set_overrides(tmp_path):
    from rlaif.train.sft import SFTTrainConfig

    path = REPO / "configs/train/sft.yaml"
    cfg = load_train_config(path, SFTTrainConfig, [])
    assert (cfg.lora.enabled, cfg.learning_rate, cfg.eval_at_end) == (True, 2e-4, True)
    cfg = load_train_config(
        path,
        SFTTrainConfig,
        ["max_steps=5", "lora.enabled=false", "learning_rate=1e-5", "trl.packing=true"],
    )
    assert (cfg.max_steps, cfg.lora.enabled, cfg.learning_rate) == (5, False, 1e-5)
    assert cfg.trl == {"packing": True}
    with pytest.raises(ConfigError, match=r"--set: field 'batch_size': must be int"):
        load_train_config(path, SFTTrainConfig, ["batch_size=many"])
    with pytest.raises(ConfigError, match=r"field 'trl\.no_such_field': unknown SFTConfig"):
        load_train_config(path, SFTTrainConfig, ["trl.no_such_field=1"])
    bad = tmp_path / "sft.yaml"
    bad.write_text("max_steps: 3\neval_at_end: maybe\n")
    with pytest.raises(ConfigError, match=r"sft\.yaml:2: field 'eval_at_end'"):
        load_train_config(bad, SFTTrainConfig, [])


def test_cli_train_sft(tmp_path, tiny_model_dir, sft_run_dir, capsys):
    from rlaif.cli.main import main
    from rlaif.train.recipes import ONLINE_TRAINERS, POLICY_TRAINERS, TRAINERS

    assert TRAINERS[0] == "sft" and "sft" in POLICY_TRAINERS and "sft" not in ONLINE_TRAINERS
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    assert "supervised fine-tuning on chat data (SL-CAI)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "sft", "--help"])
    assert "rlaif train sft: supervised fine-tuning" in capsys.readouterr().out

    out = tmp_path / "cli"
    args = ["train", "sft", str(REPO / "configs/train/sft.yaml"), "--quiet", "--out", str(out)]
    for kv in (f"model={tiny_model_dir}", f"dataset={sft_run_dir}", "max_steps=1",
               "max_length=128", "batch_size=2", "grad_accum=1"):  # fmt: skip
        args += ["--set", kv]
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "train_loss" in shown and "eval_loss" in shown and f"model: {out}" in shown
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 1 and metrics["config"]["lora"]["enabled"] is True
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


# -- real model -------------------------------------------------------------------------------


@pytest.mark.slow
def test_sft_on_smollm2_with_lora(tmp_path, sft_run_dir):
    """One LoRA SFT step on the real SmolLM2-135M-Instruct: its chat template adds a default
    system prompt, which stays masked; only the revision and its end of turn are learned."""
    from rlaif.backends.resolve import DEFAULT_MODEL, resolve_model
    from rlaif.errors import ModelError
    from rlaif.train.sft import build_sft_trainer, train_sft

    try:
        folder = resolve_model(DEFAULT_MODEL).path
    except ModelError as exc:
        pytest.skip(f"SmolLM2 not available offline: {exc}")
    extra = ("lora.enabled=true", "max_steps=1", "batch_size=2", "eval_at_end=false")
    cfg = _cfg(folder, sft_run_dir, tmp_path / "out", *extra)
    setup = build_sft_trainer(cfg)
    ex = setup.trainer.train_dataset[0]
    learned = [i for i, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != -100]
    assert setup.tokenizer.decode(learned) == ex["completion"][0]["content"] + "<|im_end|>\n"
    metrics = train_sft(cfg).metrics
    assert metrics["steps"] == 1 and math.isfinite(metrics["train_loss"])
    assert "eval_loss" not in metrics and (tmp_path / "out/model.safetensors").is_file()
