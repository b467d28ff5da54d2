"""vLLM engine modes side by side: child processes vs in-process, prefix cache kept vs reset.

Workload: the quickstart pipeline (``pipelines/quickstart.yaml``: 20 red-team prompts,
respond -> critique -> revise, greedy, one batch of 20 per step) through ``run_pipeline`` with
a ready :class:`~rlaif.backends.vllm_backend.VLLMBackend` on SmolLM2-135M-Instruct.

Variants, each in its own child process (vLLM reads the engine mode from the environment at
start), alternating within a round and reversed in order every other round:

* ``mp-keep``: vLLM's default, engine core and worker in child processes
  (``VLLM_ENABLE_V1_MULTIPROCESSING=1``), prefix cache kept from call to call: rlaif's
  behaviour before the engine moved in-process;
* ``inproc-keep``: the engine inside the process, prefix cache kept;
* ``inproc-reset``: in-process and every call from an empty prefix cache (rlaif's default,
  ``deterministic=True``).

Engine start and a one-request warm-up are never timed; tokens/s is the pipeline's completion
tokens over its wall time. Every variant also reports a hash of its exported files, so the
table shows which variants write the same bytes. Usage::

    python bench/vllm_modes.py --rounds 2 --out bench/results/vllm-modes.json
    python bench/vllm_modes.py --engine-options '{"enforce_eager": true}'   # faster start
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("mp-keep", "inproc-keep", "inproc-reset")
PIPELINE = ROOT / "pipelines" / "quickstart.yaml"


def child(variant: str, run_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Run the quickstart once with ``variant``'s engine; return its figures."""
    sys.path.insert(0, str(ROOT))
    from rlaif.backends.base import SamplingParams
    from rlaif.backends.vllm_backend import VLLMBackend
    from rlaif.pipeline import load_pipeline, run_pipeline

    cfg = load_pipeline(PIPELINE)
    t0 = time.perf_counter()
    backend = VLLMBackend(cfg.model.id, deterministic=variant.endswith("reset"), **options)
    start_s = time.perf_counter() - t0
    backend.generate(
        [[{"role": "user", "content": "Hello"}]], SamplingParams(temperature=0, max_new_tokens=4)
    )
    t1 = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        res = run_pipeline(cfg, out=run_dir, backend=backend, stream=quiet)
    seconds = time.perf_counter() - t1
    backend.close()
    digest = hashlib.sha256()
    for path in sorted((run_dir / "export").rglob("*.jsonl")):
        digest.update(path.relative_to(run_dir).as_posix().encode() + path.read_bytes())
    tokens = int(res.stats["completion_tokens"])
    return {
        "variant": variant,
        "start_s": round(start_s, 1),
        "seconds": round(seconds, 2),
        "tokens": tokens,
        "tok_s": round(tokens / seconds, 1),
        "exports_sha256": digest.hexdigest()[:16],
    }


def _run_child(variant: str, run_dir: Path, options: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if variant.startswith("mp") else "0",
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, str(run_dir)]
    cmd += ["--engine-options", options]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{variant} exited {out.returncode}: {out.stderr[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    ap.add_argument(
        "--engine-options",
        default="{}",
        help="more VLLMBackend options as JSON, e.g. '{\"enforce_eager\": true}'",
    )
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "RUN_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        options = json.loads(args.engine_options)
        print(json.dumps(child(args.child[0], Path(args.child[1]), options)), flush=True)
        return 0
    variants = args.variants.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlaif-vllm-modes-") as work:
        for r in range(args.rounds):
            for v in variants if r % 2 == 0 else list(reversed(variants)):
                load = os.getloadavg()[0]
                row = {
                    "round": r,
                    "load_1m": round(load, 2),
                    **_run_child(v, Path(work) / f"{v}-{r}", args.engine_options),
                }
                rows.append(row)
                print(
                    f"round {r} {v:<13} {row['tok_s']:>7.1f} tok/s  {row['tokens']:>5} tokens  "
                    f"{row['seconds']:>7.1f} s  start {row['start_s']:>5.1f} s  "
                    f"load {row['load_1m']:>5.2f}  exports {row['exports_sha256']}",
                    flush=True,
                )
    means = {}
    for v in variants:
        mine = [x for x in rows if x["variant"] == v]
        means[v] = round(sum(x["tokens"] for x in mine) / sum(x["seconds"] for x in mine), 1)
    base = means.get("mp-keep")
    ratios = {v: round(t / base, 3) for v, t in means.items()} if base else {}
    print("tok/s over all rounds:", means, " ratio to mp-keep:", ratios)
    result = {
        "pipeline": str(PIPELINE.relative_to(ROOT)),
        "engine_options": json.loads(args.engine_options),
        "rows": rows,
        "tok_s": means,
        "ratio_to_mp_keep": ratios,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
