"""A resumed run sends a batch-dependent backend the batches an uninterrupted run sent.

vLLM's results depend on the other requests of a batch, so the call layer cuts batches from
every distinct request of a call, answered or not, and re-sends a batch whole when a resume
left part of it answered (``Backend.batch_invariant`` False). The fake backend here records
the batches it gets; hand-checked: 10 requests, batch size 4, longest first -> batches
{9,8,7,6}, {5,4,3,2}, {1,0}.
"""

from __future__ import annotations

from rlaif.backends.base import SamplingParams
from rlaif.backends.fake import FakeBackend
from rlaif.calls.caller import GenRequest, ModelCaller
from rlaif.store import CallCache

PARAMS = SamplingParams(temperature=0, max_new_tokens=4)


class Recording(FakeBackend):
    """The fake backend, noting each batch by the ids of its prompts."""

    def __init__(self, batch_invariant: bool) -> None:
        super().__init__(model_id="fake")
        self.batch_invariant = batch_invariant
        self.batches: list[list[int]] = []

    def generate(self, conversations, params):  # type: ignore[no-untyped-def]
        self.batches.append([int(c[0]["content"].split()[1]) for c in conversations])
        return super().generate(conversations, params)


def _requests() -> list[GenRequest]:
    # prompt i is i characters longer than prompt 0: longest first is 9, 8, ..., 0
    return [
        GenRequest([{"role": "user", "content": f"q {i} " + "x" * i}], PARAMS) for i in range(10)
    ]


def _caller(tmp_path, backend: Recording) -> ModelCaller:
    cache = CallCache(tmp_path / "calls.jsonl")
    return ModelCaller(lambda: backend, model="fake", revision=None, cache=cache, batch_size=4)


def test_uninterrupted_batches(tmp_path):
    backend = Recording(batch_invariant=False)
    _caller(tmp_path, backend).generate(_requests())
    assert backend.batches == [[9, 8, 7, 6], [5, 4, 3, 2], [1, 0]]


def test_resume_resends_a_half_answered_batch_whole(tmp_path):
    first = Recording(batch_invariant=False)
    reqs = _requests()
    # the first run answered batch 1 and half of batch 2 (e.g. a torn append), then died
    done = _caller(tmp_path, first).generate([reqs[i] for i in (9, 8, 7, 6, 5, 4)])
    backend = Recording(batch_invariant=False)
    caller = _caller(tmp_path, backend)
    out = caller.generate(reqs)
    assert backend.batches == [[5, 4, 3, 2], [1, 0]]
    # the answers kept for 5 and 4 are the first run's; every request answered once
    assert [r.completions for r in out[4:6]] == [done[5].completions, done[4].completions]
    assert caller.stats.cache_hits == 6 and all(r.ok for r in out)


def test_batch_invariant_backend_gets_only_the_unanswered(tmp_path):
    reqs = _requests()
    _caller(tmp_path, Recording(batch_invariant=True)).generate([reqs[i] for i in (5, 4)])
    backend = Recording(batch_invariant=True)
    _caller(tmp_path, backend).generate(reqs)
    # batches are still cut from every request: the same cut as an uninterrupted run
    assert backend.batches == [[9, 8, 7, 6], [3, 2], [1, 0]]


def test_all_answered_loads_no_backend(tmp_path):
    reqs = _requests()
    _caller(tmp_path, Recording(batch_invariant=False)).generate(reqs)
    cache = CallCache(tmp_path / "calls.jsonl")

    def never() -> Recording:
        raise AssertionError("backend loaded")

    caller = ModelCaller(never, model="fake", revision=None, cache=cache, batch_size=4)
    assert all(r.cached for r in caller.generate(reqs))
    assert not caller.loaded


PIPE = """\
name: t
seed: 3
output: {out}
batch_size: 4
constitution: helpful-harmless
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  critique_revise:
    rounds: 1
    respond: {{max_new_tokens: 8}}
    critique: {{max_new_tokens: 8}}
    revise: {{max_new_tokens: 8}}
  export: {{formats: [jsonl], show: 0}}
"""


def test_manifest_counts_resumes_of_unfinished_runs(tmp_path):
    import io
    import json

    from rlaif.pipeline import load_pipeline, run_pipeline

    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(5))
    )
    (tmp_path / "pipe.yaml").write_text(PIPE.format(out=tmp_path / "run"))
    cfg = load_pipeline(tmp_path / "pipe.yaml")
    path = tmp_path / "run" / "manifest.json"
    run_pipeline(cfg, stream=io.StringIO())
    assert "resumed" not in json.loads(path.read_text())["info"]
    run_pipeline(cfg, stream=io.StringIO())  # a finished run run again is no resume
    assert "resumed" not in json.loads(path.read_text())["info"]
    for n in (1, 2):
        crashed = json.loads(path.read_text())
        crashed["finished_at"] = None  # what a kill leaves
        path.write_text(json.dumps(crashed))
        run_pipeline(cfg, stream=io.StringIO())
        assert json.loads(path.read_text())["info"]["resumed"] == n
