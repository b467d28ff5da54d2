"""Training killed and resumed, measured: SIGKILL DPO and PPO at random moments, resume, compare.

Workload: the tiny random Llama of ``rlaif.testing.build_tiny_model`` (built once in the work
folder), full fine-tuning on the CPU. DPO trains on 24 preference pairs (``--dpo-steps``
optimizer steps of 4 pairs, several passes over the data); PPO on 7 prompts with a rule
reward (spaces per completion; 4 prompts per step, so a pass over the prompts straddles
steps). Each training run is a child process (``--child``), the way ``rlaif train`` or a
pipeline's training step runs.

Method, per recipe: an uninterrupted reference run with checkpoints, and one without
(``checkpoint_every=0``). The cost of checkpointing is the reference run's training seconds
over the same run's seconds less the time its saves took (``checkpoint_seconds``: for TRL
recipes from the end of a step to the end of its save, for PPO the save itself); the two runs
side by side are printed too, but on a busy machine load moves that ratio more than the saves
do. Then one run into a fresh folder is SIGKILLed ``--kills`` times: each time the child is
started again on the same folder; the parent picks a seeded random step still to do and a
random moment inside it (a share of the reference's mean step time), waits until the step
before it shows in ``curves.jsonl`` and sends SIGKILL; after the last kill the run goes to the
end. After each kill the folder is inspected: the latest complete checkpoint, and whether a
save was cut short (a staging folder left behind, which must never be resumed from). The
finished run is compared with the reference: step count, the curves (no step twice; every
value but wall-clock seconds), the largest absolute difference of any weight.

Usage::

    python bench/train_kill_resume.py --out bench/results/train-kill-resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TIMING = {"seconds", "step_time", "train_runtime", "train_samples_per_second",
          "train_steps_per_second", "eval_runtime", "eval_samples_per_second",
          "eval_steps_per_second"}  # fmt: skip


def spaces(prompts: list[Any], completions: list[str], **_: Any) -> list[float]:
    """The PPO reward: +1 per space in the completion."""
    return [float(c.count(" ")) for c in completions]


def setup(work: Path) -> None:
    """The tiny model, 24 preference pairs (20 train, 4 test) and 7 prompts."""
    import datasets

    from rlaif.testing import build_tiny_model

    if not (work / "tiny").is_dir():
        build_tiny_model(work / "tiny")
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
            "chosen": [{"role": "assistant", "content": f"It is {2 * i}, a helpful answer."}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i in range(24)
    ]
    if not (work / "prefs").is_dir():
        datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(rows[:20]),
                "test": datasets.Dataset.from_list(rows[20:]),
            }
        ).save_to_disk(str(work / "prefs"))
    lines = [json.dumps({"prompt": f"Tell me about {i}."}) + "\n" for i in range(7)]
    (work / "prompts.jsonl").write_text("".join(lines))


def child(recipe: str, work: Path, out: Path, every: int, steps: int) -> None:
    """One training run (resumes by itself when ``out`` holds a checkpoint)."""
    if recipe == "dpo":
        from rlaif.train.config import load_train_config
        from rlaif.train.dpo import DPOTrainConfig, train_dpo

        sets = [f"model={work / 'tiny'}", f"dataset={work / 'prefs'}", f"output={out}",
                f"max_steps={steps}", "batch_size=4", "max_length=64", "learning_rate=1e-3",
                "device=cpu", "quiet=true", f"checkpoint_every={every}"]  # fmt: skip
        train_dpo(load_train_config(None, DPOTrainConfig, sets))
    else:
        from rlaif.train.ppo import PPOConfig, train_ppo

        cfg = PPOConfig(model=str(work / "tiny"), prompts=str(work / "prompts.jsonl"),
                        output=str(out), device="cpu", quiet=True, total_steps=steps,
                        batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                        max_completion_length=8, checkpoint_every=every)  # fmt: skip
        train_ppo(cfg, reward_fn=spaces)


def start(recipe: str, work: Path, out: Path, every: int, steps: int) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", recipe, "--work", str(work), "--run", str(out),
           "--every", str(every), "--steps", str(steps)]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{err[-3000:]}")


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def curves(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (folder / "curves.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def logged(out: Path) -> int:
    """Training steps logged so far (curves.jsonl lines with a loss)."""
    try:
        rows = [json.loads(x) for x in (out / "curves.jsonl").read_text().splitlines() if x]
    except (OSError, ValueError):
        return 0
    return len({r["step"] for r in rows if "loss" in r or "pg_loss" in r})


def inspect(out: Path) -> dict[str, Any]:
    """After a kill: the latest complete checkpoint and any save cut short."""
    from rlaif.train.checkpoints import CHECKPOINTS, complete

    root = out / CHECKPOINTS
    done = complete(root)
    # transformers writes checkpoint-N, the PPO loop .step-N.tmp-*: both renamed when whole
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    staging = [n for n in names if n.startswith("checkpoint-") or ".tmp-" in n]
    return {"latest": done[-1][0] if done else 0, "mid_save": bool(staging), "staging": staging}


def measure(
    recipe: str, work: Path, every: int, steps: int, kills: int, rng: random.Random
) -> dict[str, Any]:
    ref, plain, run = (work / f"{recipe}-{n}" for n in ("ref", "plain", "killed"))
    for folder in (ref, plain, run):
        shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    finish(start(recipe, work, ref, every, steps))
    wall = time.perf_counter() - t0
    finish(start(recipe, work, plain, 0, steps))
    ref_metrics = json.loads((ref / "metrics.json").read_text())
    with_ckpt, saving = ref_metrics["seconds"], ref_metrics["checkpoint_seconds"]
    without = json.loads((plain / "metrics.json").read_text())["seconds"]

    # Kill k: a random step still to do and a random moment inside it. The parent watches
    # curves.jsonl until the step before is logged, then sleeps a random share of a step's
    # time (the reference's mean, checkpoint saves included) and sends SIGKILL; so kills land
    # in forward and backward passes, in logging, and in saves, whatever the machine's load.
    step_s = with_ckpt / steps
    trials: list[dict[str, Any]] = []
    latest = 0
    while len(trials) < kills and latest < steps:  # (at the last checkpoint: let it end)
        target = rng.randint(latest + 1, steps)
        offset = rng.uniform(0.0, 1.0) * step_s
        proc = start(recipe, work, run, every, steps)
        while proc.poll() is None and logged(run) < target - 1:
            time.sleep(0.02)
        time.sleep(offset)
        if proc.poll() is not None:
            trials.append({"step": target, "finished_before_the_kill": True})
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        trials.append({"step": target, "offset_s": round(offset, 3), **inspect(run)})
        latest = trials[-1]["latest"]
    if not (run / "metrics.json").is_file():
        finish(start(recipe, work, run, every, steps))
    a, b = weights(ref), weights(run)
    ref_rows, run_rows = curves(ref), curves(run)
    metrics = json.loads((run / "metrics.json").read_text())
    train_steps = [r["step"] for r in run_rows if ("loss" in r or "pg_loss" in r)]
    return {
        "recipe": recipe,
        "steps": steps,
        "checkpoint_every": every,
        "kills": sum(1 for t in trials if "latest" in t),
        "kills_mid_save": sum(1 for t in trials if t.get("mid_save")),
        "trials": trials,
        "final_steps": metrics["steps"],
        "reference_steps": json.loads((ref / "metrics.json").read_text())["steps"],
        "train_steps_logged": len(train_steps),
        "repeated_steps": len(train_steps) - len(set(train_steps)),
        "curves_equal": ref_rows == run_rows,
        "max_weight_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
        "weights_equal": a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a),
        "train_seconds_with_checkpoints": with_ckpt,
        "train_seconds_without": without,
        "checkpoint_seconds": saving,
        # the same run's time with and without its saves (robust to a busy machine)
        "checkpoint_overhead_ratio": round(with_ckpt / max(1e-9, with_ckpt - saving), 3),
        # two runs side by side (load on a shared machine moves this one)
        "side_by_side_ratio": round(with_ckpt / without, 3),
        "reference_child_wall_s": round(wall, 1),
        "checkpoints_left": (run / "checkpoints").exists(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs per recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpo-steps", type=int, default=24)
    ap.add_argument("--ppo-steps", type=int, default=16)
    ap.add_argument("--dpo-every", type=int, default=3)
    ap.add_argument("--ppo-every", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--child", choices=["dpo", "ppo"], help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--every", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.work, args.run, args.every, args.steps)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="rlaif-train-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    setup(work)
    rng = random.Random(args.seed)
    results = [
        measure("dpo", work, args.dpo_every, args.dpo_steps, args.kills, rng),
        measure("ppo", work, args.ppo_every, args.ppo_steps, args.kills, rng),
    ]
    report = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "seed": args.seed,
        "results": results,
    }
    for r in results:
        print(
            f"{r['recipe']}: {r['kills']} kills ({r['kills_mid_save']} mid-save), "
            f"{r['final_steps']}/{r['reference_steps']} steps, {r['repeated_steps']} repeated, "
            f"curves equal {r['curves_equal']}, max weight diff {r['max_weight_diff']:.3g}, "
            f"checkpoint overhead x{r['checkpoint_overhead_ratio']} "
            f"(every {r['checkpoint_every']} steps; side by side x{r['side_by_side_ratio']})"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
