"""Pipelines of ``steps:``: data steps on the models earlier steps trained, blocks of rounds
(iterative DPO), exact resume, and one-line config errors.

The policy is a tiny random model (transformers backend, real training); the AI judge is the
fake backend, whose verdicts are decisive, so every round has preference pairs to train on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from rlaif.errors import ConfigError
from rlaif.pipeline import load_pipeline, run_steps
from rlaif.pipeline.plan import plan_steps

ROOT = Path(__file__).resolve().parents[1]
QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs
PROMPTS = [
    "What is the capital of France?",
    "How do I bake bread?",
    "Please write a short poem about the sea.",
    "Tell me how to pick a lock.",
    "Which response is better, A or B?",
    "Say something kind.",
    "Name three colours.",
    "How far is the moon?",
]
TRAIN = "max_length: 128, learning_rate: 1e-2, device: cpu, quiet: true"
ITERATIVE = f"""\
name: tiny-iterative-dpo
seed: 0
batch_size: 8
model: {{id: {{model}}, backend: transformers}}
prompts: {{path: prompts.jsonl, limit: 4}}
steps:
  - name: iter
    rounds: 2
    rotate_prompts: true
    steps:
      - name: data
        sample: {{n: 3, temperature: 1.0, max_new_tokens: 8}}
        judge: {{model: {{id: fake-judge, backend: fake}}}}
        export:
          show: 0
          preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.2}}
      - name: dpo
        trainer: dpo
        config: {ROOT}/configs/train/dpo.yaml
        set: {{max_steps: 2, batch_size: 2, grad_accum: 1, {TRAIN}}}
      - name: eval
        eval: {{red_team: red.jsonl, safe: safe.jsonl, max_new_tokens: 6}}
"""
CAI_PAPER = f"""\
name: tiny-cai-paper
seed: 0
batch_size: 8
model: {{id: {{model}}, backend: transformers}}
prompts: {{path: prompts.jsonl, limit: 4}}
steps:
  - name: sl-data
    critique_revise:
      respond: {{max_new_tokens: 8}}
      critique: {{max_new_tokens: 8}}
      revise: {{max_new_tokens: 8}}
    export: {{show: 0}}
  - name: sl-cai
    trainer: sft
    set: {{max_steps: 2, batch_size: 2, {TRAIN}}}
  - name: rl-data
    sample: {{n: 3, temperature: 1.0, max_new_tokens: 8}}
    judge: {{model: {{id: fake-judge, backend: fake}}}}
    export:
      show: 0
      preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.2}}
  - name: rm
    trainer: reward
    set: {{max_steps: 2, batch_size: 2, {TRAIN}, lora: {{enabled: false}}}}
  - name: ppo
    trainer: ppo
    set: {{total_steps: 2, batch_size: 2, mini_batch_size: 2, ppo_epochs: 1,
           max_completion_length: 6, {TRAIN}}}
  - name: eval
    eval: {{red_team: red.jsonl, safe: safe.jsonl, max_new_tokens: 6}}
    baseline: sl-cai
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlaif.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model"), max_position_embeddings=2048)


def _write(folder: Path, text: str, model: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"prompts.jsonl": PROMPTS, "red.jsonl": PROMPTS[3:5], "safe.jsonl": PROMPTS[:2]}
    for name, prompts in rows.items():
        (folder / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    path = folder / "pipe.yaml"
    path.write_text(text.replace("{model}", str(model)), encoding="utf-8")
    return path


def _no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any training or model loading from here on fails the test."""
    import rlaif.backends
    import rlaif.calls.factory
    import rlaif.pipeline.train_steps
    from rlaif.train.recipes import RECIPES

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished step must not train or load a model")

    monkeypatch.setattr(rlaif.calls.factory, "load_backend", boom)
    monkeypatch.setattr(rlaif.backends, "load_backend", boom)
    for name in RECIPES:
        monkeypatch.setitem(rlaif.pipeline.train_steps.RECIPES, name,
                            _Boom(RECIPES[name], boom))  # fmt: skip


class _Boom:
    """A recipe whose train function fails (its config class still loads)."""

    def __init__(self, recipe: Any, boom: Any):
        self.recipe, self.boom = recipe, boom

    def load(self) -> tuple[type, Any]:
        return self.recipe.load()[0], self.boom


def _statuses(result: Any) -> list[tuple[str, str]]:
    return [(o.name, o.status) for o in result.steps]


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def iterative(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("iterative")
    pipe = _write(folder, ITERATIVE, model_dir)
    run = folder / "run"
    result = run_steps(load_pipeline(pipe), out=run, stream=QUIET)
    assert _statuses(result) == [
        ("iter/1/data", "ran"), ("iter/1/dpo", "trained"), ("iter/1/eval", "ran"),
        ("iter/2/data", "ran"), ("iter/2/dpo", "trained"), ("iter/2/eval", "ran"),
    ]  # fmt: skip
    return pipe, run


def test_rounds_chain_each_policy_into_the_next_round(iterative, model_dir):
    _, run = iterative
    steps = run / "steps" / "iter"
    # round 1 samples from the base model; round 2 from round 1's DPO policy
    m1 = _read(steps / "1" / "data" / "manifest.json")["info"]["provenance"]
    m2 = _read(steps / "2" / "data" / "manifest.json")["info"]["provenance"]
    assert m1["model"] == str(model_dir) and "model_step" not in m1
    dpo1 = _read(steps / "1" / "dpo" / "done.json")["hash"]
    # a trained model is named by its step (the run dir may move) and its weights' hash
    assert m2["model"] == "step:iter/1/dpo" and m2["model_revision"].startswith("sha256:")
    assert m2["model_step"] == {"step": "iter/1/dpo", "hash": dpo1}
    # round 2's DPO starts from round 1's policy and trains on round 2's judged pairs
    cfg2 = _read(steps / "2" / "dpo" / "metrics.json")["config"]
    assert cfg2["model"] == str(steps / "1" / "dpo")
    assert cfg2["dataset"].startswith(str(steps / "2" / "data" / "export" / "preferences"))
    # rotate_prompts: round 2 answers the next 4 prompts
    prompts = [_read(steps / k / "data" / "manifest.json")["info"]["config"]["prompts"]
               for k in ("1", "2")]  # fmt: skip
    assert [p["offset"] for p in prompts] == [0, 4]
    # each round's evaluation is the round's policy against the base model
    for k in ("1", "2"):
        ev = _read(steps / k / "eval" / "eval.json")
        assert ev["models"]["policy"]["model"] == str(steps / k / "dpo")
        assert ev["models"]["baseline"]["model"] == str(model_dir)
    rounds = _read(run / "rounds.json")["iter"]
    assert rounds["rounds"] == [1, 2]
    assert len(rounds["policy"]["win_rate"]) == 2
    assert rounds["policy"]["win_rate"][0]["n"] == 4
    assert (run / "rounds.png").stat().st_size > 5000
    summary = _read(run / "steps.json")
    assert [s["name"] for s in summary["steps"]] == summary["planned"]


def test_finished_run_reruns_without_work_and_reports(iterative, monkeypatch):
    pipe, run = iterative
    before = (run / "steps" / "iter" / "2" / "eval" / "eval.json").read_bytes()
    _no_work(monkeypatch)
    again = run_steps(load_pipeline(pipe), out=run, stream=QUIET)
    assert {s for _, s in _statuses(again)} == {"skipped"}
    assert again.stats.get("model_calls", 0) == 0
    assert (run / "steps" / "iter" / "2" / "eval" / "eval.json").read_bytes() == before
    from rlaif.report import build_report

    html = build_report(run)
    assert "iter/2/dpo" in html and "By round" in html and "data:image/png" in html


def test_killed_data_step_resumes_and_changed_step_reruns_downstream(iterative, tmp_path):
    pipe, run = iterative
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    # killed after its records but before done.json: no model call is repeated
    (run2 / "steps" / "iter" / "2" / "data" / "done.json").unlink()
    res = run_steps(load_pipeline(pipe), out=run2, stream=QUIET)
    assert res.stats.get("model_calls", 0) == 0
    assert [s for _, s in _statuses(res)] == ["skipped"] * 3 + ["ran", "skipped", "skipped"]
    # a changed evaluation re-runs both evaluations and nothing upstream of them
    pipe_cfg = load_pipeline(pipe, ["steps.0.steps.2.eval.max_new_tokens=5"])
    res = run_steps(pipe_cfg, out=run2, stream=QUIET)
    assert _statuses(res) == [
        ("iter/1/data", "skipped"), ("iter/1/dpo", "skipped"), ("iter/1/eval", "ran"),
        ("iter/2/data", "skipped"), ("iter/2/dpo", "skipped"), ("iter/2/eval", "ran"),
    ]  # fmt: skip
    # a changed judge setting re-runs round 1's data step in place (its samples are reused);
    # its new labels retrain round 1's policy, so round 2 starts from an empty folder
    kept = run2 / "steps" / "iter" / "1" / "data" / "stages" / "left-by-same-inputs"
    stale = run2 / "steps" / "iter" / "2" / "data" / "stages" / "left-by-old-model"
    for marker in (kept, stale):
        marker.write_text("x")
    sample = run2 / "steps" / "iter" / "1" / "data" / "stages" / "sample"
    before = sorted((p.name, p.stat().st_size) for p in sample.iterdir())
    tie = ["steps.0.steps.0.judge.tie_threshold=0.9"]
    res = run_steps(load_pipeline(pipe, tie), out=run2, stream=QUIET)
    assert [s for _, s in _statuses(res)][0::3] == ["ran", "ran"]
    assert sorted((p.name, p.stat().st_size) for p in sample.iterdir()) == before
    assert kept.exists() and not stale.exists()
    # a changed DPO setting retrains round 1's policy, so all of round 2 runs again
    stale.write_text("x")
    pipe_cfg = load_pipeline(pipe, [*tie, "steps.0.steps.1.set.learning_rate=0.005"])
    res = run_steps(pipe_cfg, out=run2, stream=QUIET)
    assert [s for _, s in _statuses(res)] == ["skipped", "trained", "ran", "ran", "trained", "ran"]
    assert not stale.exists()  # a data step of another model starts from an empty folder


def test_cai_paper_chain(model_dir, tmp_path):
    pipe = _write(tmp_path, CAI_PAPER, model_dir)
    run = tmp_path / "run"
    res = run_steps(load_pipeline(pipe), out=run, stream=QUIET)
    assert [(o.name, o.status) for o in res.steps] == [
        ("sl-data", "ran"), ("sl-cai", "trained"), ("rl-data", "ran"), ("rm", "trained"),
        ("ppo", "trained"), ("eval", "ran"),
    ]  # fmt: skip
    steps = run / "steps"
    sft = _read(steps / "sl-cai" / "metrics.json")["config"]
    assert sft["model"] == str(model_dir)
    assert sft["dataset"].startswith(str(steps / "sl-data" / "export" / "sft"))
    # RL-CAI samples from the SL-CAI model; the judge stays the fake one
    prov = _read(steps / "rl-data" / "manifest.json")["info"]["provenance"]
    assert prov["model"] == "step:sl-cai" and prov["model_step"]["step"] == "sl-cai"
    assert prov["judge_model"] == "fake-judge"
    rm = _read(steps / "rm" / "metrics.json")["config"]
    assert rm["model"] == str(model_dir)  # a reward model starts from the base by default
    ppo = _read(steps / "ppo" / "metrics.json")["config"]
    assert ppo["model"] == str(steps / "sl-cai") and ppo["reward"]["model"] == str(steps / "rm")
    assert ppo["prompts"] == str(steps / "prompts.jsonl")
    ev = _read(steps / "eval" / "eval.json")
    assert ev["models"]["policy"]["model"] == str(steps / "ppo")
    assert ev["models"]["baseline"]["model"] == str(steps / "sl-cai")
    assert ev["reward_model"] is not None
    assert not (run / "rounds.json").exists()  # no block of rounds


def test_plan_resolves_policy_and_names(model_dir, tmp_path):
    cfg = load_pipeline(_write(tmp_path, CAI_PAPER, model_dir))
    plan = {p.name: p for p in plan_steps(cfg)}
    assert plan["rl-data"].model == "sl-cai" and plan["rl-data"].judge_model is None
    assert plan["rm"].model == "base" and plan["rm"].data == "rl-data"
    assert plan["rm"].dataset == "preferences"
    assert plan["ppo"].model == "sl-cai" and plan["ppo"].reward == "rm" and plan["ppo"].data is None
    assert plan["eval"].model == "ppo" and plan["eval"].baseline == "sl-cai"


HEAD = """\
name: bad
model: {id: MODEL, backend: transformers}
prompts: {path: prompts.jsonl}
steps:
  - name: d
    sample: {n: 2}
    judge: {}
"""


@pytest.mark.parametrize(
    ("steps", "field", "line", "words"),
    [
        ("  - {name: t, trainer: dpo, model: nope}\n", "steps[1].model", 8, "no earlier step"),
        ("  - {name: t, trainer: dpo, data: t2}\n", "steps[1].data", 8, "no earlier step"),
        ("  - {name: rm, trainer: reward}\n  - {name: p, trainer: dpo, model: rm}\n",
         "steps[2].model", 9, "reward model"),
        ("  - {name: e, eval: {red_team: prompts.jsonl}}\n", "steps[1].model", 8,
         "no trained policy"),
        ("  - {name: t, trainer: sft}\n", "steps[1].dataset", 8, "exports no sft"),
        ("  - {name: t, trainer: dpo, dataset: sft}\n", "steps[1].dataset", 8, "not the sft"),
        ("  - {name: t, trainer: ppo}\n", "steps[1].trainer", 8, "add a 'reward' step"),
        ("  - {name: t, trainer: dpo, baseline: base}\n", "steps[1].baseline", 8,
         "does not belong in a train step"),
        ("  - {name: t, trainer: dpo, sample: {n: 2}}\n", "steps[1]", 8, "sets keys of data and"),
        ("  - {name: d, trainer: dpo}\n", "steps[1].name", 8, "duplicate"),
        ("  - {name: b, rounds: 0, steps: [{name: x, trainer: dpo}]}\n", "steps[1].rounds", 8,
         "between 1"),
        ("  - {name: b, rounds: 2, rotate_prompts: true, steps: [{name: x, sample: {n: 2}}]}\n",
         "steps[1].rotate_prompts", 8, "prompts.limit"),
        ("  - {name: b, rounds: 2, steps: [{name: c, rounds: 2, steps: [{name: x, "
         "trainer: dpo}]}]}\n", "steps[1].steps[0]", 8, "cannot hold another block"),
        ("  - {name: x, sample: {n: 200}}\n", "steps[1].sample.n", 8, "at most"),
        ("  - {name: x, sample: {n: 2}, judge_model: base}\n", "steps[1].judge_model", 8,
         "no judge"),
        ("  - {name: t, trainer: dpo, set: {max_stepz: 1}}\n", "steps[1].set.max_stepz", 8,
         "unknown key"),
        ("stages: {sample: {n: 2}}\n", "stages", 8, "not both"),
    ],
)  # fmt: skip
def test_config_errors_name_the_step(tmp_path, steps, field, line, words):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    path = tmp_path / "pipe.yaml"
    path.write_text(HEAD + steps)
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    err = info.value
    assert (err.field, err.line) == (field, line), str(err)
    assert words in err.message
    assert str(err).count("\n") == 0


def test_stages_form_can_train_sft(model_dir, tmp_path):
    """The one-pass form reads the SFT export for a `trainer: sft` step."""
    text = f"""\
name: tiny-sl-cai
seed: 0
batch_size: 8
model: {{id: {model_dir}, backend: transformers}}
prompts: {{path: prompts.jsonl, limit: 3}}
stages:
  critique_revise:
    respond: {{max_new_tokens: 8}}
    critique: {{max_new_tokens: 8}}
    revise: {{max_new_tokens: 8}}
  export: {{show: 0}}
  train:
    - name: sft
      trainer: sft
      set: {{max_steps: 1, batch_size: 2, {TRAIN}}}
"""
    from rlaif.pipeline import run_pipeline

    res = run_pipeline(load_pipeline(_write(tmp_path, text, model_dir)), out=tmp_path / "r",
                       stream=QUIET)  # fmt: skip
    assert [(s.name, s.status) for s in res.post.steps] == [("sft", "trained")]
    cfg = _read(tmp_path / "r" / "train" / "sft" / "metrics.json")["config"]
    assert cfg["dataset"].startswith(str(tmp_path / "r" / "export" / "sft"))
