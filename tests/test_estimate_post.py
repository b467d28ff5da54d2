"""The dry run of training and evaluation: estimated against what a real run then does.

The policy is a tiny random model (transformers backend, real training); the judge is the fake
backend. Generation requests of an evaluation are counted exactly; its judge requests are an
upper bound until the answers exist (identical answers are a tie without a call), and exact
once they are cached. Training steps are exact with ``max_steps`` / ``total_steps``, and
follow the trainer's epoch arithmetic once the data exists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from rlaif.calls.budget import BudgetExceeded, spent_in_run
from rlaif.cli.main import main
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.pipeline.estimate import estimate_pipeline
from rlaif.pipeline.estimate_base import CountingModel
from rlaif.pipeline.estimate_steps import estimate_steps
from rlaif.pipeline.estimate_train import estimate_training
from rlaif.train.dpo import DPOTrainConfig
from rlaif.train.online import GRPOTrainConfig, RewardSource
from tests import test_pipeline_train as one_pass
from tests.test_steps import CAI_PAPER, PROMPTS, TRAIN, _write

QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs
GRPO = f"""\
name: tiny-grpo-estimate
seed: 0
batch_size: 6
model: {{id: {{model}}, backend: transformers}}
prompts: {{path: prompts.jsonl}}
stages:
  sample: {{n: 2, temperature: 1.0, max_new_tokens: 6}}
  judge: {{model: {{id: fake-judge, backend: fake}}}}
  export: {{show: 0}}
  train:
    - name: grpo
      trainer: grpo
      set: {{max_steps: 2, batch_size: 4, grad_accum: 1, num_generations: 2,
             max_completion_length: 4, {TRAIN},
             reward: {{kind: rule, constitution: plain-style}}}}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlaif.testing import build_tiny_model  # long enough a context for critique prompts

    return build_tiny_model(tmp_path_factory.mktemp("model"), max_position_embeddings=2048)


def _cached(cache: Path) -> dict[str, int]:
    """Requests answered into a call cache: generations and score requests."""
    out = {"generate": 0, "score": 0}
    for line in cache.read_text(encoding="utf-8").splitlines():
        value = json.loads(line)["value"]
        out["generate" if isinstance(value, list) else "score"] += 1
    return out


def _by(est: Any) -> dict[str, Any]:
    return {s.name: s for s in est.stages}


def test_eval_and_training_estimates_match_the_run_and_its_resume(model_dir, tmp_path):
    # tiny CAI -> DPO -> evaluation, DPO by epochs: 2 passes over the pairs, one per step
    dpo = ["max_steps=-1", "epochs=2", "batch_size=1", "grad_accum=1"]
    sets = [f"output={tmp_path / 'run'}", *(f"stages.train.0.set.{kv}" for kv in dpo)]
    cfg = load_pipeline(one_pass._write(tmp_path, one_pass.CAI_DPO, model_dir), sets)
    run = tmp_path / "run"
    fresh = estimate_pipeline(cfg)
    by = _by(fresh)
    # each model answers the 4 evaluation prompts once; the judge: 2 per prompt (win rate)
    # + 2 per red-team answer of each model (harm check), before any answer is known
    assert (by["eval policy"].calls, by["eval baseline"].calls) == (4, 4)
    assert by["eval policy"].completion_tokens == 4 * 6 and not by["eval policy"].bounded
    judge_bound = by["eval judge"].calls
    assert judge_bound == 4 * 2 + 2 * 2 * 2 and by["eval judge"].bounded
    (dpo,) = fresh.train
    prompts = len(one_pass.PROMPTS)
    assert (dpo.rows, dpo.rows_bound) == (prompts, True)  # at most one pair per prompt
    assert dpo.steps == 2 * prompts and not dpo.exact_steps  # epochs x rows: a bound
    data_calls = sum(s.calls for s in fresh.stages if not s.name.startswith("eval"))

    # a cap that the data stages and the policy's answers fit, but not the baseline's
    cap = data_calls + 4 + 2
    cfg.budget.max_calls = cap
    with pytest.raises(BudgetExceeded):
        run_pipeline(cfg, stream=QUIET)
    data_spent = spent_in_run(run / "cache" / "calls.jsonl").calls
    metrics = json.loads((run / "train" / "dpo" / "metrics.json").read_text())
    mid = estimate_pipeline(cfg)
    (dpo,) = mid.train
    assert dpo.done and (dpo.rows, dpo.rows_bound) == (metrics["train_pairs"], False)
    assert dpo.steps == metrics["steps"] == math.ceil(2 * dpo.rows)  # the trainer's epochs
    by = _by(mid)
    assert mid.spent.calls == cap  # both call caches count against it, used up exactly
    assert by["eval policy"].done == 4 and by["eval policy"].calls == 0
    assert by["eval baseline"].done == cap - data_spent - 4 == 4 - by["eval baseline"].calls
    assert by["eval baseline"].calls > 0 and by["eval judge"].done == 0

    cfg.budget.max_calls = None
    run_pipeline(cfg, stream=QUIET)
    made = _cached(run / "eval" / "cache" / "calls.jsonl")
    assert made["generate"] == 8
    rows = [json.loads(x) for x in (run / "eval" / "responses.jsonl").read_text().splitlines()]
    same = [
        r for r in rows if r["responses"]["policy"].strip() == r["responses"]["baseline"].strip()
    ]
    red_same = [r for r in same if r["set"] == "red_team"]
    # identical answers: no win-rate call, and one harm check serves both models
    assert made["score"] == judge_bound - 2 * len(same) - 2 * len(red_same)
    after = _by(estimate_pipeline(cfg))
    assert after["eval judge"].done == made["score"] and after["eval judge"].calls == 0
    assert sum(s.calls for s in after.values()) == 0


def test_online_rl_estimate_matches_the_completions_scored(model_dir, tmp_path):
    cfg = load_pipeline(_write(tmp_path, GRPO, model_dir), [f"output={tmp_path / 'run'}"])
    (grpo,) = estimate_pipeline(cfg).train
    assert (grpo.steps, grpo.exact_steps, grpo.rows) == (2, True, len(PROMPTS))
    assert grpo.generations == grpo.reward_calls == 2 * 4 and grpo.judge_requests == 0
    assert grpo.generated_tokens == 8 * 4 and "rule" in grpo.reward
    run_pipeline(cfg, stream=QUIET)
    metrics = json.loads((tmp_path / "run" / "train" / "grpo" / "metrics.json").read_text())
    assert metrics["steps"] == grpo.steps
    assert metrics["judge_calls"] == grpo.reward_calls  # completions the rule scored
    assert metrics["prompts"] == grpo.rows


def test_steps_form_estimates_every_step(model_dir, tmp_path, capsys):
    path = _write(tmp_path, CAI_PAPER, model_dir)  # sft, reward model, ppo, eval vs the sft
    cfg = load_pipeline(path, [f"output={tmp_path / 'run'}"])
    rows = {p.name: est for p, est in estimate_steps(cfg)}
    (sft,) = rows["sl-cai"].train
    assert (sft.steps, sft.exact_steps, sft.rows, sft.rows_bound) == (2, True, 4, True)
    (rm,) = rows["rm"].train
    assert (rm.steps, rm.rows, rm.rows_bound) == (2, 4 * 3, True)  # pairs of 3 samples each
    (ppo,) = rows["ppo"].train
    assert (ppo.steps, ppo.generations, ppo.reward_calls, ppo.rows) == (2, 4, 4, 4)
    assert "2 gradient steps" in ppo.steps_basis and "reward model rm" in ppo.reward
    ev = _by(rows["eval"])
    calls = (ev["eval policy"].calls, ev["eval baseline"].calls, ev["eval judge"].calls)
    assert calls == (4, 4, 16)
    # stand-ins for models not trained yet
    assert ev["eval policy"].model.endswith("ppo") and ev["eval baseline"].model.endswith("sl-cai")
    assert main(["run", str(path), "--dry-run", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "not counted" not in out and "step eval (eval):" in out and "eval judge" in out
    assert "training  trainer" in out and "reward model rm" in out
    calls = sum(e.total.calls for e in rows.values())
    assert f"all steps: {calls:,} model calls" in out and "3 training steps to run: 6 " in out
    assert not (tmp_path / "run").exists()


def _words() -> CountingModel:
    return CountingModel("m", None, lambda conv: sum(len(m["content"].split()) for m in conv),
                         "words")  # fmt: skip


def test_epochs_follow_the_trainers_arithmetic_on_existing_data(tmp_path):
    data = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"q{i} a b", "chosen": "yes yes", "rejected": "no"} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tcfg = DPOTrainConfig(dataset=str(data), max_steps=-1, epochs=1.5, batch_size=2,
                          grad_accum=2, test_size=0.1, device="cpu")  # fmt: skip
    est = estimate_training("dpo", "dpo", tcfg, _words())
    # 9 train rows (1 held out): ceil(9 / 2) = 5 batches, ceil(5 / 2) = 3 steps an epoch
    assert (est.rows, est.rows_bound, est.steps) == (9, False, math.ceil(1.5 * 3))
    assert est.tokens == round(1.5 * 9 * (5 + 4))  # each pair: prompt + chosen, + rejected
    tcfg.eval_at_end = False  # no held-out split
    assert estimate_training("dpo", "dpo", tcfg, _words()).rows == 10


def test_online_epochs_and_judge_rewards(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hi {i}"}) + "\n" for i in range(6)))
    tcfg = GRPOTrainConfig(prompts=str(prompts), max_steps=-1, epochs=1, batch_size=4,
                           num_generations=2, max_completion_length=5, device="cpu",
                           reward=RewardSource(kind="python"))  # fmt: skip
    est = estimate_training("g", "grpo", tcfg, _words())
    assert (est.rows, est.steps, est.generations) == (6, 3, 12)  # 6 x 2 completions / 4
    assert est.tokens == 12 * 2 + 12 * 5 and est.reward_calls == 12
    tcfg.reward = RewardSource(kind="judge", principles_k=2)
    assert estimate_training("g", "grpo", tcfg, _words()).judge_requests == 12 * 2 * 2


def test_a_killed_step_counts_what_is_left_after_its_checkpoint(tmp_path):
    from rlaif.train.checkpoints import CHECKPOINTS, RUN, STATE, settings_hash

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"hi {i}"}) + "\n" for i in range(6)))
    tcfg = GRPOTrainConfig(prompts=str(prompts), max_steps=10, batch_size=4, num_generations=2,
                           device="cpu", reward=RewardSource(kind="rule"))  # fmt: skip
    out = tmp_path / "grpo"
    assert estimate_training("g", "grpo", tcfg, _words(), out=out).steps == 10  # nothing saved
    root = out / CHECKPOINTS
    (root / "step-00000004").mkdir(parents=True)
    (root / "step-00000004" / STATE).write_text('{"step": 4}')
    (root / "step-00000006").mkdir()  # no state file: not a complete checkpoint
    (root / RUN).write_text(json.dumps({"settings": settings_hash(tcfg)}))
    est = estimate_training("g", "grpo", tcfg, _words(), out=out)
    assert (est.steps, est.resumed, est.generations, est.reward_calls) == (6, 4, 24, 24)
    assert est.exact_steps and "4 done before a kill" in est.steps_basis
    tcfg.learning_rate = 0.5  # other settings: the checkpoints are not resumed
    assert estimate_training("g", "grpo", tcfg, _words(), out=out).resumed == 0
