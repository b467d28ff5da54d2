"""The chain is wired the right way round: labels from a judge reach the trainer unswapped.

A policy stand-in answers every prompt twice, once in plain prose and once with markdown (a
bold heading and a bullet list); the rule judge of a code-checked principle (``markdown:
forbidden``) labels the pairs; DPO trains the tiny model on the export. On held-out pairs the
trained policy's implicit reward must then prefer the plain answer (margin > 0, accuracy >
0.5). The same run with every label turned around (``label_noise: 1.0``, a swap between judge
and trainer) must move it the other way, so a swap anywhere in between fails this test.

Then a ``steps:`` pipeline runs the label-noise experiment in small: the same candidate pairs
judged by the rule and by the rule with half its labels flipped, one DPO per arm from the same
start, an evaluation of each (compliance before and after), side by side.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from rlaif.backends.base import Completion
from rlaif.backends.fake import FakeBackend
from rlaif.pipeline import load_pipeline, run_pipeline, run_steps

ROOT = Path(__file__).resolve().parents[1]
QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs
TOPICS = [
    "bread", "tea", "rain", "maps", "chess", "glue", "kites", "soap", "bees", "clay",
    "salt", "wool", "ink", "rope", "milk", "sand", "wax", "tin", "oak", "fog",
    "jam", "rice", "yarn", "corn", "mint", "lime", "pear", "silk", "coal", "iron",
]  # fmt: skip
CONSTITUTION = """\
name: plain
version: "1.0.0"
principles:
  - id: plain-prose
    title: Answer in plain prose
    judge: Which response answers in plain prose, without markdown lists or bold text?
    check: {markdown: forbidden}
"""
PIPE = """\
name: direction
seed: 0
output: {out}
batch_size: 16
constitution: {constitution}
model: {{id: style-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  sample: {{n: 2, temperature: 1.0, max_new_tokens: 32}}
  judge: {{kind: rule, label_noise: {noise}}}
  export:
    show: 0
    formats: [jsonl]
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.3}}
"""


class StyleBackend(FakeBackend):
    """Answers each prompt once in prose and once in markdown (in a hashed order)."""

    def generate(self, conversations, params):
        out = []
        for c in conversations:
            topic = c[-1]["content"].split()[-1].strip("?")
            plain = f"Making {topic} is easy: start small, keep it clean and check as you go."
            md = f"**How to make {topic}:**\n\n- start small\n- keep it clean\n- check as you go"
            pair = [plain, md] if len(topic) % 2 else [md, plain]
            out.append([Completion(pair[j % 2], 5, 12, "stop") for j in range(params.n)])
        return out


def _write_prompts(folder: Path) -> None:
    with open(folder / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for t in TOPICS:
            fh.write(json.dumps({"prompt": f"How do I make {t}?"}) + "\n")


def _data(tmp_path: Path, noise: float) -> Path:
    folder = tmp_path / f"noise-{noise}"
    folder.mkdir()
    (folder / "c.yaml").write_text(CONSTITUTION, encoding="utf-8")
    _write_prompts(folder)
    pipe = folder / "pipe.yaml"
    text = PIPE.format(out=folder / "run", constitution=folder / "c.yaml", noise=noise)
    pipe.write_text(text, encoding="utf-8")
    run_pipeline(load_pipeline(pipe), backend=StyleBackend(), stream=QUIET)
    return folder / "run"


def _rows(run: Path) -> list[dict]:
    path = run / "export" / "preferences" / "conversational" / "train.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()]


def _dpo(tiny_model_dir: Path, run: Path) -> dict:
    from rlaif.train.dpo import DPOTrainConfig, train_dpo

    cfg = DPOTrainConfig(
        model=str(tiny_model_dir), dataset=str(run), output=str(run / "dpo"), max_steps=12,
        batch_size=4, grad_accum=1, learning_rate=5e-3, max_length=96, device="cpu",
        quiet=True, test_size=0.3,
    )  # fmt: skip
    return train_dpo(cfg).metrics


@pytest.mark.slow
def test_oracle_labels_move_the_policy_their_way_and_swapped_labels_the_other(
    tmp_path, tiny_model_dir
):
    clean = _data(tmp_path, 0.0)
    rows = _rows(clean)
    assert rows and all("**" not in r["chosen"][-1]["content"] for r in rows)
    swapped = _data(tmp_path, 1.0)
    rows = _rows(swapped)
    assert rows and all("**" in r["chosen"][-1]["content"] for r in rows)

    right = _dpo(tiny_model_dir, clean)
    wrong = _dpo(tiny_model_dir, swapped)
    # held-out pairs (the test split), scored against the plain answer in both runs: in the
    # swapped run "chosen" is the markdown answer, so its margin must come out negative
    assert right["eval_rewards/margins"] > 0 and right["eval_rewards/accuracies"] > 0.5
    assert wrong["eval_rewards/margins"] > 0 and wrong["eval_rewards/accuracies"] > 0.5
    # both runs learn *their* labels; what tells them apart is which answer each now prefers
    assert _prefers_plain(tiny_model_dir, clean / "dpo") > 0
    assert _prefers_plain(tiny_model_dir, swapped / "dpo") < 0


def _prefers_plain(base: Path, trained: Path) -> float:
    """Mean over held-out topics of the DPO implicit reward margin, plain minus markdown."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    policy = AutoModelForCausalLM.from_pretrained(trained).eval()
    ref = AutoModelForCausalLM.from_pretrained(base).eval()

    def logp(model, prompt: str, answer: str) -> float:
        msgs = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(
            [*msgs, {"role": "assistant", "content": answer}], tokenize=False
        )
        ids = tok(full, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :96]
        n = len(tok(head, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        tgt = ids[0, 1:]
        return float(lp[torch.arange(len(tgt)), tgt][n - 1 :].sum())

    margins = []
    for t in ("paint", "cheese", "paper", "candles"):  # none of these was trained on
        prompt = f"How do I make {t}?"
        plain = f"Making {t} is easy: start small, keep it clean and check as you go."
        md = f"**How to make {t}:**\n\n- start small\n- keep it clean\n- check as you go"
        r_plain = logp(policy, prompt, plain) - logp(ref, prompt, plain)
        r_md = logp(policy, prompt, md) - logp(ref, prompt, md)
        margins.append(r_plain - r_md)
    return sum(margins) / len(margins)


STEPS = f"""\
name: tiny-label-noise
seed: 0
batch_size: 8
constitution: c.yaml
model: {{id: {{model}}, backend: transformers}}
prompts: {{path: prompts.jsonl, limit: 6}}
steps:
  - name: candidates
    sample: {{n: 3, temperature: 1.0, max_new_tokens: 12}}
    export: {{show: 0}}
  - name: oracle
    samples_from: candidates
    judge: {{kind: rule}}
    export: {{show: 0, preferences: {{min_confidence: 0.5, max_length_ratio: null,
                                      test_size: 0.0}}}}
  - name: coin
    samples_from: candidates
    judge: {{kind: rule, label_noise: 0.5}}
    export: {{show: 0, preferences: {{min_confidence: 0.5, max_length_ratio: null,
                                      test_size: 0.0}}}}
  - name: dpo-oracle
    trainer: dpo
    model: base
    data: oracle
    config: {ROOT}/configs/train/dpo.yaml
    set: {{max_steps: 2, batch_size: 2, grad_accum: 1, max_length: 96, device: cpu, quiet: true}}
  - name: dpo-coin
    trainer: dpo
    model: base
    data: coin
    config: {ROOT}/configs/train/dpo.yaml
    set: {{max_steps: 2, batch_size: 2, grad_accum: 1, max_length: 96, device: cpu, quiet: true}}
  - name: eval-oracle
    model: dpo-oracle
    eval: {{prompts: eval.jsonl, label_field: label, max_new_tokens: 8}}
  - name: eval-coin
    model: dpo-coin
    eval: {{prompts: eval.jsonl, label_field: label, max_new_tokens: 8}}
"""


@pytest.mark.slow
def test_label_noise_experiment_in_steps_judges_the_same_pairs_and_compares_arms(
    tmp_path, tiny_model_dir
):
    (tmp_path / "c.yaml").write_text(
        CONSTITUTION.replace("{markdown: forbidden}", "{max_chars: 30}"), encoding="utf-8"
    )
    _write_prompts(tmp_path)
    with open(tmp_path / "eval.jsonl", "w", encoding="utf-8") as fh:
        for t in ("paint", "cheese", "paper"):
            fh.write(json.dumps({"prompt": f"How do I make {t}?", "label": "ordinary"}) + "\n")
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(STEPS.replace("{model}", str(tiny_model_dir)), encoding="utf-8")
    cfg = load_pipeline(pipe)
    result = run_steps(cfg, out=tmp_path / "run", stream=QUIET)
    run = tmp_path / "run"
    samples = {}
    for arm in ("candidates", "oracle", "coin"):
        shard = sorted((run / "steps" / arm / "stages" / "sample").glob("shard-*.jsonl"))
        samples[arm] = sorted(x for s in shard for x in s.read_text().splitlines())
    assert samples["candidates"] and samples["oracle"] == samples["candidates"] == samples["coin"]
    oracle = json.loads((run / "steps/oracle/manifest.json").read_text())["info"]["calls"]
    assert oracle["policy"]["requests"] == 0  # the samples were copied, not drawn again
    coin = [json.loads(x) for x in (run / "steps/coin/stages/judge").glob("shard-*.jsonl")
            .__next__().read_text().splitlines()]  # fmt: skip
    assert any(r["verdict"]["flipped"] for r in coin)
    table = json.loads((run / "evals.json").read_text())
    assert table["evals"] == ["eval-oracle", "eval-coin"]
    assert "compliance:plain-prose" in table["policy"] and (run / "evals.png").is_file()
    ev = json.loads((run / "steps/eval-oracle/eval.json").read_text())
    assert set(ev["metrics"]["baseline"]["compliance"]) == {"plain-prose", "all"}
    assert [o.status in ("ran", "trained") for o in result.steps] == [True] * 7
    again = run_steps(cfg, out=run, stream=QUIET)  # resumes as done: nothing runs
    assert {o.status for o in again.steps} == {"skipped"}
    from rlaif.report import build_report

    html = build_report(run)
    assert "Evaluations side by side" in html and "compliance:plain-prose" in html


@pytest.mark.slow
def test_reward_model_judge_scores_pairs_with_a_trained_reward_model(tmp_path, tiny_model_dir):
    from rlaif.train.reward import RewardTrainConfig, train_reward

    data = _data(tmp_path, 0.0)  # rule-labelled pairs: plain prose chosen
    rm = tmp_path / "rm"
    train_reward(
        RewardTrainConfig(model=str(tiny_model_dir), dataset=str(data), output=str(rm),
                          max_steps=4, batch_size=4, max_length=96, device="cpu", quiet=True)
    )  # fmt: skip
    folder = tmp_path / "judged"
    folder.mkdir()
    (folder / "c.yaml").write_text(CONSTITUTION, encoding="utf-8")
    _write_prompts(folder)
    judge = f"{{kind: reward_model, reward_model: {rm}, scale: 2.0}}"
    text = PIPE.format(out=folder / "run", constitution=folder / "c.yaml", noise=0.0)
    text = text.replace("{kind: rule, label_noise: 0.0}", judge)
    (folder / "pipe.yaml").write_text(text, encoding="utf-8")
    cfg = load_pipeline(folder / "pipe.yaml")
    run_pipeline(cfg, backend=StyleBackend(), stream=QUIET)
    recs = [json.loads(x) for s in sorted((folder / "run/stages/judge").glob("shard-*.jsonl"))
            for x in s.read_text().splitlines()]  # fmt: skip
    assert recs and all(r["verdict"]["mode"] == "reward_model" for r in recs)
    for r in recs:
        v = r["verdict"]
        sx, sy = v["scores"]["x"], v["scores"]["y"]
        assert v["p_a_better"] == pytest.approx(1 / (1 + math.exp(-2.0 * (sx - sy))))
    cached = (folder / "run/cache/scores.jsonl").read_text().splitlines()
    assert len(cached) >= 2  # both answers of a prompt scored once, kept for a re-run
