"""Determinism on CPU with the real transformers backend (tiny random Llama, no network).

Same config, same seed, same backend: two runs must give byte-identical datasets, greedy and
sampled (temperature > 0), through ``run_pipeline``, comparing every exported file byte for
byte and the manifest without its timestamps. Across batch sizes the generated texts (and so
the SFT and CAI-SL pair datasets) must not change either: the call cache and record ids leave
the batch size out on the promise that it does not change results.

Judge log-probabilities included: a float32 forward over a batch of another shape rounds the
same prompt's scores 1-2 ulp differently, so the transformers backend scores one prompt per
forward by default on CPU (``score_batch_size='auto'`` is 1 there); margins are then
byte-identical across batch sizes and between an uninterrupted run and a resumed one, whose
remaining requests form other batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.store import StageStore

QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs

PIPE = """\
name: determinism
seed: 11
batch_size: 4
constitution: helpful-harmless
model: {{id: {model}, backend: transformers}}
prompts: {{path: prompts.jsonl}}
stages:
  critique_revise:
    rounds: 1
    respond: {{max_new_tokens: 10, temperature: {t}, top_p: {top_p}}}
    critique: {{max_new_tokens: 10, temperature: {t}, top_p: {top_p}}}
    revise: {{max_new_tokens: 10, temperature: {t}, top_p: {top_p}}}
{sample}  judge: {{principles_k: 2, tie_threshold: 1.0, flip_margin: 0.45}}
  export:
    formats: [jsonl, disk, parquet]
    show: 0
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.3}}
"""
VARIANTS = {
    "greedy": {"t": 0.0, "top_p": 1.0, "sample": ""},
    "sampled": {
        "t": 0.9,
        "top_p": 0.95,
        "sample": "  sample: {n: 3, temperature: 1.1, max_new_tokens: 10}\n",
    },
}
PROMPTS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Please write a short poem about the sea.",
    "Which response is better, A or B?",
    "Tell me how to pick a lock.",
]
TEXT_STAGES = ("respond", "critique-1", "revise-1", "critique_revise", "sample")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlaif.testing import build_tiny_model

    # A longer context than the shared 256-token fixture, so critique prompts fit.
    return build_tiny_model(tmp_path_factory.mktemp("det-model"), max_position_embeddings=4096)


def pipeline(folder: Path, model: Path, variant: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
    )
    path = folder / "pipe.yaml"
    path.write_text(PIPE.format(model=model, **VARIANTS[variant]))
    return path


def run(pipe: Path, out: Path, batch_size: int) -> Path:
    run_pipeline(load_pipeline(pipe, [f"batch_size={batch_size}"]), out=out, stream=QUIET)
    return out


def exported(run_dir: Path, under: str = "export") -> dict[str, bytes]:
    root = run_dir / under
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def records(run_dir: Path, stages: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out = {}
    for stage in stages:
        if (run_dir / "stages" / stage).is_dir():
            with StageStore(run_dir, stage, readonly=True) as store:
                out.update({f"{stage}/{r['id']}": r for r in store.iter_records()})
    return out


def manifest(run_dir: Path, *, ignore_execution: bool = False) -> dict[str, Any]:
    m = json.loads((run_dir / "manifest.json").read_text())
    for key in ("started_at", "finished_at", "updated_at"):
        m.pop(key)
    text = json.dumps(m).replace(json.dumps(str(run_dir))[1:-1], "<run>")
    m = json.loads(text)
    if ignore_execution:  # how the work was batched, not what it produced
        m["info"].pop("calls")
        m["info"]["config"].pop("batch_size")
    return m


def differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@pytest.mark.parametrize("variant", ["greedy", "sampled"])
def test_same_config_same_seed_gives_identical_bytes(model_dir, tmp_path, variant):
    pipe = pipeline(tmp_path, model_dir, variant)
    a = run(pipe, tmp_path / "a", 4)
    b = run(pipe, tmp_path / "b", 4)
    files = exported(a)
    assert len(files) > 25 and any(k.endswith(".arrow") for k in files)
    assert differing(files, exported(b)) == []
    assert records(a, (*TEXT_STAGES, "judge")) == records(b, (*TEXT_STAGES, "judge"))
    assert manifest(a) == manifest(b)
    rows = (a / "export/preferences/conversational/train.jsonl").read_text().splitlines()
    assert rows, "the comparison should cover preference rows with margins"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["greedy", "sampled"])
def test_texts_do_not_depend_on_batch_size(model_dir, tmp_path, variant):
    pipe = pipeline(tmp_path, model_dir, variant)
    runs = {bs: run(pipe, tmp_path / f"bs{bs}", bs) for bs in (1, 4, 16)}
    base = exported(runs[4])
    texts = [k for k in base if not k.startswith("preferences")]
    assert len(texts) >= 10
    for bs, r in runs.items():
        other = exported(r)
        assert differing({k: base[k] for k in texts}, {k: other[k] for k in texts}) == [], bs
        assert records(r, TEXT_STAGES) == records(runs[4], TEXT_STAGES), bs


@pytest.mark.slow
def test_judge_scores_do_not_depend_on_batch_size(model_dir, tmp_path):
    pipe = pipeline(tmp_path, model_dir, "greedy")
    a, b = run(pipe, tmp_path / "bs1", 1), run(pipe, tmp_path / "bs8", 8)
    assert records(a, ("judge",)) == records(b, ("judge",))
    assert differing(exported(a), exported(b)) == []
    assert manifest(a, ignore_execution=True) == manifest(b, ignore_execution=True)
