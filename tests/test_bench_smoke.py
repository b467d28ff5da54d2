"""The bench scripts import and their pure helpers work (no timing, no model, no network)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from bench import distilabel_env, gen_variants, generation, resume
from rlaif.backends import FakeBackend
from rlaif.backends.base import SamplingParams

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_round_order_alternates():
    v = ["a", "b", "c"]
    assert generation.round_order(v, 0) == v
    assert generation.round_order(v, 1) == ["c", "b", "a"]
    assert generation.round_order(v, 2) == v


def test_ratio_and_share():
    assert generation.ratio(3.0, 2.0) == 1.5
    assert generation.ratio(None, 2.0) is None
    assert generation.ratio(1.0, 0.0) is None
    assert resume.share(1.0, 40.0) == 0.025


def _run(variant, tokens, seconds, rss=1 << 30, ok=True):
    return {
        "variant": variant,
        "ok": ok,
        "tokens": tokens,
        "seconds": seconds,
        "peak_tree_rss": rss,
        "max_process_rss": rss // 2,
    }


def test_summarize_and_ratios():
    runs = [
        _run("rlaif-transformers", 100, 1.0),
        _run("rlaif-transformers", 100, 2.0),
        _run("rlaif-transformers", 100, 4.0, ok=False),  # failed runs are left out
        _run("raw-transformers", 100, 1.0, rss=2 << 30),
        _run("rlaif-vllm", 300, 1.0),
        _run("raw-vllm", 300, 1.0),
        _run("distilabel-shipped", 10, 1.0),
        _run("distilabel-b16", 50, 1.0),
    ]
    s = generation.summarize(runs)
    assert s["rlaif-transformers"]["tok_s"] == 75.0  # median of 100 and 50
    assert s["raw-transformers"]["peak_tree_rss_gib"] == 2.0
    r = generation.ratios(s)
    assert r["rlaif/raw transformers"] == 0.75
    assert r["rlaif/raw vllm"] == 1.0
    assert r["rlaif-transformers/distilabel-shipped"] == 7.5
    assert r["rlaif-best/distilabel-b16"] == 6.0  # best rlaif = vllm, 300 tok/s
    assert "variant" in generation.report(
        {"variants": s, "ratios": r, "load_average": {"min": 0.1, "max": 1.0}}
    )


def test_child_env_and_commands(tmp_path):
    env = generation.child_env("raw-transformers", 3)
    assert env["OMP_NUM_THREADS"] == "3" and env["HF_HUB_OFFLINE"] == "1"
    env = generation.child_env("rlaif-vllm", 3)
    assert "OMP_NUM_THREADS" not in env
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] in ("0", *[str(i) for i in range(64)])
    spec = {"gguf": "m.gguf", "tokens": 64}
    cmd = generation.command("distilabel-b16", spec, tmp_path, tmp_path / "o.json", Path("py"))
    assert cmd[0] == "py" and cmd[cmd.index("--batch-size") + 1] == "16"
    cmd = generation.command("distilabel-shipped", spec, tmp_path, tmp_path / "o.json", Path("p"))
    assert cmd[cmd.index("--batch-size") + 1] == "0"
    cmd = generation.command("raw-vllm", spec, tmp_path, tmp_path / "o.json", None)
    assert cmd[-3:] == ["raw-vllm", str(tmp_path), str(tmp_path / "o.json")]
    assert generation.key_value("block_size=32") == ("block_size", 32)
    assert generation.key_value("enforce_eager=true") == ("enforce_eager", True)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        generation.key_value("block_size")
    assert generation.busy_threads() >= 1
    assert generation.machine()["cores"] >= 1


def test_install_commands_pin_torch_first(tmp_path):
    cmds = distilabel_env.install_commands(tmp_path / "v", "/usr/bin/python3")
    assert cmds[0][-2:] == ["venv", str(tmp_path / "v")]
    assert "torch==2.13.0" in cmds[1] and not any("distilabel" in c for c in cmds[1])
    assert distilabel_env.DISTILABEL in cmds[2] and "requests" in cmds[2]
    assert "-c" in cmds[2]  # torch stays pinned while distilabel installs


def test_split_turns():
    convo = [{"role": "user", "content": "hi"}]
    r, c = distilabel_env._RESPONSE, distilabel_env._CRITIQUE
    crit = [*convo, {"role": "assistant", "content": r}, {"role": "user", "content": "crit?"}]
    rev = [*crit, {"role": "assistant", "content": c}, {"role": "user", "content": "rev?"}]
    assert distilabel_env.split_turns(convo, crit, rev) == ("crit?", "rev?")
    with pytest.raises(ValueError, match="critique template"):
        distilabel_env.split_turns(convo, crit[1:], rev)
    with pytest.raises(ValueError, match="revise template"):
        distilabel_env.split_turns(convo, crit, rev[:-2] + rev[-1:])


def test_distilabel_inputs_match_rlaif_templates(tmp_path):
    from rlaif.pipeline import load_pipeline

    prompts = tmp_path / "p.jsonl"
    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}"} for i in range(3)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(generation.PIPELINE.format(batch_size=2, model="m", prompts=prompts, tokens=8))
    out = distilabel_env.distilabel_inputs(load_pipeline(pipe))
    assert len(out["rows"]) == 3
    first = out["rows"][0]
    assert first["conversation"] == [{"role": "user", "content": "question 0?"}]
    assert "critique" in first["critique_ask"].lower()
    assert "rewritten response" in first["revision_ask"].lower()
    assert isinstance(out["clean_regex"], str) and isinstance(out["clean_flags"], int)


def test_distilabel_steps_are_module_level_classes():
    # The script runs in distilabel's own venv; here only its shape is checked.
    tree = ast.parse((BENCH / "distilabel_cai.py").read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"Respond", "Critique", "Revise", "TimedTransformersLLM"} <= classes


def test_recorder_passes_through_and_records():
    fake = FakeBackend(model_id="m")
    rec = gen_variants.Recorder(fake)
    convs = [[{"role": "user", "content": "hello"}]]
    params = SamplingParams(max_new_tokens=4)
    out = rec.generate(convs, params)
    assert len(out) == 1 and rec.batches == [(convs, params)]
    assert rec.model_id == "m" and rec.describe() == fake.describe()


def test_tree_digest_and_model_calls(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    d1 = resume.tree_digest(tmp_path)
    (tmp_path / "a" / "x.txt").write_text("2")
    assert resume.tree_digest(tmp_path) != d1
    manifest = {"info": {"calls": {"policy": {"model_calls": 3}, "judge-1": {"model_calls": 1}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert resume.model_calls(tmp_path) == 4


def test_gpu_bench_compares_the_same_scores_on_cpu(tiny_model_dir, tmp_path):
    """bench/gpu.py on a CPU: a model of random weights from a config folder, then the judge
    wave with rlaif's backend beside the raw scorer on the same batches."""
    import argparse

    from bench import gpu

    made = gpu.make_model(tiny_model_dir, tmp_path / "m", "tiny", "cpu")
    assert made["parameters"] > 0 and (tmp_path / "m" / "config.json").is_file()
    args = argparse.Namespace(
        model=tmp_path / "m", device="cpu", pairs=12, principles=1, score_batch="1,4",
        backend="transformers",
        raw_batch=8,
    )  # fmt: skip
    rows = gpu.judge(args)
    assert [r["score_batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["requests"] == 24
        assert r["rlaif_own_us"] > 0 and r["backend_us"] > 0 and r["raw_us"] > 0
        # the raw scorer computes what the backend does (fp32 on CPU: rounding apart)
        assert r["max_logprob_diff"] < 1e-4
