"""The Ray execution mode on a local 2-CPU Ray cluster started once for this file.

The promise under test: a run whose model calls go to Ray workers writes the same records,
byte for byte, as one process, with the fake backend and with the tiny transformers model
(generation and judge scoring), including a request error isolated to its prompt; a worker
that dies stops the run with a ModelError, and running again resumes to the same records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import pytest

from rlaif.backends.base import Backend, SamplingParams
from rlaif.calls.caller import GenRequest
from rlaif.calls.factory import make_caller
from rlaif.config.schema import ExecutionConfig, ModelConfig
from rlaif.errors import ConfigError, ModelError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.store import CallCache

ray = pytest.importorskip("ray")

from rlaif.backends.ray_backend import RayBackend  # noqa: E402 - needs ray

QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs

PIPE = """\
name: ray
seed: 5
batch_size: 2
constitution: helpful-harmless
model: {{id: {model}, backend: {kind}{options}}}
prompts: {{path: prompts.jsonl}}
execution: {{mode: ray, workers: 2}}
stages:
  critique_revise:
    rounds: 1
    respond: {{max_new_tokens: 8}}
    critique: {{max_new_tokens: 8}}
    revise: {{max_new_tokens: 8}}
  judge: {{principles_k: 1}}
  export: {{formats: [jsonl], show: 0}}
"""
PROMPTS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Please write a short poem about the sea.",
    "Which response is better, A or B?",
    "Tell me how to pick a lock. POISON",
    "Numbers: one two three?",
    "Critique the response.",
]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local Ray cluster for the whole file (starting one costs seconds)."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    yield
    ray.shutdown()


def pipeline(folder: Path, model: str, kind: str, options: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for p in PROMPTS:
            fh.write(json.dumps({"prompt": p}) + "\n")
    path = folder / "pipe.yaml"
    path.write_text(PIPE.format(model=model, kind=kind, options=options), encoding="utf-8")
    return path


def local_run(pipe: Path, out: Path) -> Path:
    run_pipeline(load_pipeline(pipe, ["execution.mode=local"]), out=out, stream=QUIET)
    return out


def ray_backend(pipe: Path, scratch: Path) -> tuple[Backend, int]:
    """The Ray backend and per-call batch that make_caller builds for the pipeline."""
    cfg = load_pipeline(pipe)
    cache = CallCache(scratch / "calls.jsonl")
    caller = make_caller(cfg.model, cfg.batch_size, cache, execution=cfg.execution)
    try:
        return caller.backend, caller.batch_size
    finally:
        cache.close()


def ray_run(pipe: Path, out: Path, backend: Backend, per_call: int) -> Path:
    # The runner's ModelCaller sends make_caller's per-call batch (workers x batch_size).
    cfg = dataclasses.replace(load_pipeline(pipe), batch_size=per_call)
    run_pipeline(cfg, out=out, backend=backend, stream=QUIET)
    return out


def files(run_dir: Path, under: str) -> dict[str, bytes]:
    root = run_dir / under
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jsonl"))}


def assert_same_records(a: Path, b: Path) -> None:
    sa, sb = files(a, "stages"), files(b, "stages")
    assert sa and sorted(sa) == sorted(sb)
    differ = [k for k in sa if sa[k] != sb[k]]
    assert not differ, f"stage files differ: {differ}"
    assert files(a, "export") == files(b, "export")


# --- config and wiring (no model) -----------------------------------------------------------


def test_execution_config(tmp_path):
    pipe = pipeline(tmp_path, "fake-model", "fake")
    ex = load_pipeline(pipe, ["execution.batch_size=3", "execution.address=auto"]).execution
    assert (ex.mode, ex.workers, ex.batch_size, ex.address) == ("ray", 2, 3, "auto")
    assert load_pipeline(tmp_path / "pipe.yaml", ["execution.mode=local"]).execution.mode == "local"
    text = pipe.read_text().replace("{mode: ray, workers: 2}", "{mode: spark, workers: 2}")
    pipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipe)
    assert "pipe.yaml:7: field 'execution.mode': 'spark' is not one of local, ray" in str(err.value)
    for bad, words in [
        ("execution.workers=0", "field 'execution.workers': must be at least 1"),
        ("execution.num_gpus_per_worker=-1", "must be 0 or more"),
        ("execution.start_timeout=0", "must be more than 0"),
        ("execution.threads=4", "unknown key 'threads'"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_pipeline(pipe, ["execution.mode=ray", bad])


def test_make_caller_ray_batches_and_results(tmp_path):
    model = ModelConfig(id="fake-model", backend="fake")
    reqs = [
        GenRequest([{"role": "user", "content": f"question {i}"}], SamplingParams(n=2))
        for i in range(7)
    ]
    local = make_caller(model, 3, CallCache(tmp_path / "a.jsonl"))
    caller = make_caller(
        model, 3, CallCache(tmp_path / "b.jsonl"), execution=ExecutionConfig(mode="ray")
    )
    assert caller.batch_size == 6 and not caller.loaded  # nothing starts before a cache miss
    try:
        got = caller.generate(reqs)
        assert isinstance(caller.backend, RayBackend) and caller.backend.batch_size == 3
        want = local.generate(reqs)
        assert [r.completions for r in got] == [r.completions for r in want]
        assert caller.stats.model_calls == 2  # 7 requests: a call of 6 (2 workers x 3), then 1
        info = caller.describe()
        assert info["backend"] == "fake" and info["execution"]["workers"] == 2
    finally:
        caller.close()


# --- same records as one process -------------------------------------------------------------


def test_fake_backend_same_records_and_isolated_error(tmp_path):
    pipe = pipeline(tmp_path, "fake-model", "fake", ", options: {fail_marker: POISON}")
    a = local_run(pipe, tmp_path / "local")
    backend, per_call = ray_backend(pipe, tmp_path)
    b = ray_run(pipe, tmp_path / "ray", backend, per_call)
    assert_same_records(a, b)
    respond = (b / "stages" / "respond" / "shard-00000.jsonl").read_text()
    assert respond.count('"status":"error"') == 1 and "failure marker" in respond


def test_dead_worker_stops_run_and_resume_matches(tmp_path):
    pipe = pipeline(tmp_path, "fake-model", "fake")
    a = local_run(pipe, tmp_path / "local")
    backend, per_call = ray_backend(pipe, tmp_path)
    assert isinstance(backend, RayBackend)

    class KillAfterFirstCall(Backend):
        """Forwards to the Ray backend and kills one of its workers after the first call."""

        name, model_id, model_revision = "fake", backend.model_id, backend.model_revision
        calls = 0

        def generate(self, conversations, params):
            if self.calls == 1:
                worker = backend._actors[1]
                ray.kill(worker)
                # ray.kill only asks: wait until the worker is gone, or a loaded machine lets
                # it serve this call too (and the run stops one call later)
                deadline = time.monotonic() + 120
                while True:
                    try:
                        ray.get(worker.ready.remote(), timeout=30)
                    except ray.exceptions.RayActorError:
                        break
                    assert time.monotonic() < deadline, "the killed worker still serves"
                    time.sleep(0.2)
            self.calls += 1
            return backend.generate(conversations, params)

        def score_choices(self, conversations, choices):
            return backend.score_choices(conversations, choices)

        def close(self):
            backend.close()

    with pytest.raises(ModelError, match="Ray worker died while serving generate"):
        ray_run(pipe, tmp_path / "ray", KillAfterFirstCall(), per_call)
    saved = (tmp_path / "ray" / "stages" / "respond" / "shard-00000.jsonl").read_text()
    assert saved.count("\n") == per_call  # the first call's records, nothing torn
    again, _ = ray_backend(pipe, tmp_path)
    b = ray_run(pipe, tmp_path / "ray", again, per_call)
    assert_same_records(a, b)


def test_unplaceable_workers_and_bad_options_fail_clearly(tmp_path):
    with pytest.raises(ModelError, match=r"[123] of 3 Ray workers did not start within 3 s"):
        RayBackend("fake", "fake-model", workers=3, start_timeout=3)
    caller = make_caller(
        ModelConfig(id="fake-model", backend="fake", options={"bogus": 1}),
        2,
        CallCache(tmp_path / "c.jsonl"),
        execution=ExecutionConfig(mode="ray"),
    )
    with pytest.raises(ModelError, match=r"cannot start the backend.*bogus"):
        caller.backend  # noqa: B018
    # Both failures freed their workers: a full pool starts again.
    RayBackend("fake", "fake-model", workers=2, start_timeout=60).close()


@pytest.mark.slow
def test_tiny_transformers_same_records(tmp_path):
    from rlaif.testing import build_tiny_model

    # A context long enough for critique prompts (the shared fixture has 256 tokens).
    model = build_tiny_model(tmp_path / "model", max_position_embeddings=4096)
    # Greedy generation and judge log-probs: each worker gets exactly the batches of the
    # local run, so even the float rounding of the judge scores is the same.
    pipe = pipeline(tmp_path, str(model), "transformers", ", options: {dtype: float32}")
    a = local_run(pipe, tmp_path / "local")
    backend, per_call = ray_backend(pipe, tmp_path)
    b = ray_run(pipe, tmp_path / "ray", backend, per_call)
    assert_same_records(a, b)
    judged = files(b, "stages")
    assert any(k.startswith("judge") for k in judged), sorted(judged)
