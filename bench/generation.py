"""CAI-32 generation throughput: rlaif vs the raw backends vs distilabel, side by side.

Workload CAI-32: the first 32 prompts of ../shared/data/hh-rlhf/harmless-base/dev-500.jsonl,
respond -> critique -> revise, greedy, 64 new tokens each, SmolLM2-135M-Instruct.

Variants, each in its own child process (so its peak memory is its own), alternating within
a round and reversed in order every other round:

* ``rlaif-transformers`` / ``rlaif-vllm``: ``run_pipeline`` with a ready backend
  (see ``gen_variants.py``);
* ``raw-transformers`` / ``raw-vllm``: the library called directly on the exact batches the
  rlaif run sent (the ceiling);
* ``distilabel-shipped`` / ``distilabel-b16``: distilabel 1.5.3 with its ``TransformersLLM``
  doing the same three-step chain on the same messages (``distilabel_cai.py``), in a virtual
  environment created on first use, as shipped (greedy set by hand) and with the HF
  pipeline's batch size forced to 16.

Model loading and engine start are never timed. Every child that runs torch on its own
threads (transformers, distilabel) gets the same ``OMP_NUM_THREADS`` (``--threads``), so a
busy shared machine costs them alike; vLLM children get ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``
(vLLM on both cores: ~220 vs ~160 tok/s with its default of one core held back).
Memory: the peak of the summed RSS of the child's process tree, sampled every 0.2 s, and the
largest single-process peak as the kernel reports it (``wait4``). Usage::

    python bench/generation.py --rounds 2 --out bench/results/generation.json
    python bench/generation.py --variants rlaif-transformers,raw-transformers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.distilabel_env import ensure_venv, venv_dir  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared/data/hh-rlhf/harmless-base/dev-500.jsonl"
VARIANTS = (
    "rlaif-transformers",
    "raw-transformers",
    "rlaif-vllm",
    "raw-vllm",
    "pair-transformers",
    "distilabel-shipped",
    "distilabel-b16",
)
GiB = 1 << 30

PIPELINE = """\
name: bench-cai-32
seed: 0
batch_size: {batch_size}
constitution: helpful-harmless
model: {{id: {model}, backend: transformers}}
prompts: {{path: {prompts}, field: chosen}}
stages:
  critique_revise:
    rounds: 1
    few_shot: 0
    respond: {{temperature: 0, max_new_tokens: {tokens}}}
    critique: {{temperature: 0, max_new_tokens: {tokens}}}
    revise: {{temperature: 0, max_new_tokens: {tokens}}}
  export: {{formats: [jsonl], show: 0}}
"""


def round_order(variants: list[str], round_: int) -> list[str]:
    """Variants of one round: as given on even rounds, reversed pairwise on odd ones.

    A raw variant needs the batches its rlaif run recorded, so in the first round every raw
    variant runs after its rlaif partner; later rounds reverse the whole list.
    """
    if round_ % 2 == 0:
        return list(variants)
    return list(reversed(variants))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Median tok/s, per-round tok/s and peak memory per variant."""
    out: dict[str, dict[str, Any]] = {}
    for v in VARIANTS:
        rows = [r for r in runs if r["variant"] == v and r.get("ok")]
        if not rows:
            continue
        rates = [r["tokens"] / r["seconds"] for r in rows]
        if v.startswith("pair-"):
            raw = [r["raw_tokens"] / r["raw_seconds"] for r in rows]
            out[v + "/raw"] = {
                "tok_s": statistics.median(raw),
                "tok_s_rounds": raw,
                "tokens": [r["raw_tokens"] for r in rows],
                "seconds": [r["raw_seconds"] for r in rows],
                "paired_ratio": statistics.median(a / b for a, b in zip(rates, raw, strict=True)),
            }
        out[v] = {
            "tok_s": statistics.median(rates),
            "tok_s_rounds": rates,
            "tokens": [r["tokens"] for r in rows],
            "seconds": [r["seconds"] for r in rows],
            "peak_tree_rss_gib": max(r["peak_tree_rss"] for r in rows) / GiB,
            "peak_tree_pss_gib": max(r.get("peak_tree_pss", 0) for r in rows) / GiB,
            "max_process_rss_gib": max(r["max_process_rss"] for r in rows) / GiB,
        }
    return out


def ratios(s: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """rlaif / raw per backend, and rlaif / distilabel (shipped and batch 16)."""
    rate = {k: v["tok_s"] for k, v in s.items()}
    mine = [k for k in rate if k.startswith(("rlaif-", "pair-")) and not k.endswith("/raw")]
    best_rlaif = max((rate[k] for k in mine), default=None)
    if "rlaif-transformers" not in rate and "pair-transformers" in rate:
        rate["rlaif-transformers"] = rate["pair-transformers"]
    out: dict[str, float | None] = {
        "rlaif/raw transformers": ratio(
            rate.get("rlaif-transformers"), rate.get("raw-transformers")
        ),
        "rlaif/raw vllm": ratio(rate.get("rlaif-vllm"), rate.get("raw-vllm")),
        "rlaif/raw transformers, paired": s.get("pair-transformers/raw", {}).get("paired_ratio"),
    }
    for d in ("distilabel-shipped", "distilabel-b16"):
        out[f"rlaif-transformers/{d}"] = ratio(rate.get("rlaif-transformers"), rate.get(d))
        out[f"rlaif-best/{d}"] = ratio(best_rlaif, rate.get(d))
    return out


def machine() -> dict[str, Any]:
    """CPU model, core count, memory and software versions of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["ram_gib"] = round(pages / GiB, 1)
    except (ValueError, OSError):
        pass
    return info


class TreeMemory:
    """Samples the memory of a process and all its descendants until stopped.

    ``peak`` is the largest summed RSS seen (an upper bound: pages shared between the
    processes, such as torch's libraries in vLLM's engine and its parent, count once per
    process); ``peak_pss`` the largest summed PSS (each shared page split between its users,
    so the sum is what the tree really holds).
    """

    def __init__(self, pid: int, every: float = 0.25) -> None:
        import psutil

        self._root = psutil.Process(pid)
        self._every = every
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            rss = pss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):  # a process may end meanwhile
                    full = p.memory_full_info()
                    rss, pss = rss + full.rss, pss + getattr(full, "pss", full.rss)
            self.peak = max(self.peak, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self._every)

    def stop(self) -> tuple[int, int]:
        """Stop sampling; return (peak summed RSS, peak summed PSS) in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak, self.peak_pss


def run_child(cmd: list[str], env: dict[str, str], out: Path, log: Path) -> dict[str, Any]:
    """Run one variant; return its JSON result plus memory figures and load averages."""
    load_before = os.getloadavg()[0]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        mem = TreeMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        peak, peak_pss = mem.stop()
    result: dict[str, Any] = {"ok": False}
    if proc.returncode == 0 and out.is_file():
        result = {**json.loads(out.read_text()), "ok": True}
    else:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        result["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
    result.update(
        peak_tree_rss=peak,
        peak_tree_pss=peak_pss,
        max_process_rss=usage.ru_maxrss * 1024,  # Linux reports KiB
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )
    return result


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The CAI-32 workload's options (read by :func:`write_workload`)."""
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)


def write_workload(
    work: Path, args: argparse.Namespace, model: str | None = None
) -> tuple[Path, Path]:
    """The CAI-32 inputs in ``work``: the first ``args.prompts`` rows of ``args.data`` as
    ``prompts.jsonl`` and the pipeline over them as ``pipeline.yaml`` (on ``model``, the
    default model unless given)."""
    from rlaif.backends import DEFAULT_MODEL

    prompts = work / "prompts.jsonl"
    with open(args.data, encoding="utf-8") as src, open(prompts, "w", encoding="utf-8") as dst:
        for _, line in zip(range(args.prompts), src, strict=False):
            dst.write(line)
    pipe = work / "pipeline.yaml"
    pipe.write_text(
        PIPELINE.format(
            batch_size=args.batch_size,
            model=model or DEFAULT_MODEL,
            prompts=prompts,
            tokens=args.tokens,
        )
    )
    return prompts, pipe


def key_value(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a backend-option flag, the value read as YAML (``32``, ``true``)."""
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"a backend option is KEY=VALUE, got {item!r}")
    return key, yaml.safe_load(value)


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Write the prompts, the pipeline, spec.json and the distilabel inputs into ``work``."""
    from bench.distilabel_env import distilabel_inputs
    from rlaif.backends import DEFAULT_MODEL, resolve_model
    from rlaif.backends.resolve import default_gguf
    from rlaif.pipeline import load_pipeline

    _, pipe = write_workload(work, args)
    folder = str(resolve_model(DEFAULT_MODEL).path)
    spec = {
        "model": DEFAULT_MODEL,
        "model_folder": folder,
        "gguf": str(default_gguf()),  # distilabel's transformers 4 converts it itself
        "pipeline": str(pipe),
        "batch_size": args.batch_size,
        "tokens": args.tokens,
        "vllm_options": dict(key_value(item) for item in args.vllm_option),
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    inputs = distilabel_inputs(load_pipeline(pipe))
    (work / "distilabel-inputs.json").write_text(json.dumps(inputs))
    return spec


def command(
    variant: str,
    spec: dict[str, Any],
    work: Path,
    out: Path,
    dl_python: Path | None,
    shipped_prompts: int = 0,
) -> list[str]:
    """The child command line for one variant (``shipped_prompts``: a prefix of the prompts
    for distilabel as shipped, 0 for all)."""
    if variant.startswith("distilabel-"):
        assert dl_python is not None
        batch = "0" if variant == "distilabel-shipped" else variant.removeprefix("distilabel-b")
        limit = shipped_prompts if variant == "distilabel-shipped" else 0
        return [
            str(dl_python),
            str(HERE / "distilabel_cai.py"),
            "--inputs",
            str(work / "distilabel-inputs.json"),
            "--gguf",
            spec["gguf"],
            "--tokens",
            str(spec["tokens"]),
            "--batch-size",
            batch,
            "--limit",
            str(limit),
            "--work",
            str(work / f"dl-{variant}"),
            "--out",
            str(out),
        ]
    return [sys.executable, str(HERE / "gen_variants.py"), variant, str(work), str(out)]


def busy_threads() -> int:
    """rlaif's CPU thread rule (cores minus the 1-minute load average, at least one).

    OpenMP threads spin at barriers; on a shared machine two threads with one core taken by
    another process run several times slower than one thread, for every variant alike.
    """
    try:
        cores = len(os.sched_getaffinity(0))
        return max(1, cores - round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def child_env(variant: str, threads: int) -> dict[str, str]:
    """Environment of one child: offline, equal torch threads, vLLM on every core."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if variant.endswith("vllm"):
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.pop("OMP_NUM_THREADS", None)  # vllm-cpu binds its own threads
    else:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def report(summary: dict[str, Any]) -> str:
    """The human-readable table printed at the end."""
    lines = [f"{'variant':<22} {'tok/s':>8} {'rounds':<24} {'tree RSS GiB':>12} {'PSS':>6}"]
    for v, s in summary["variants"].items():
        rounds = ", ".join(f"{x:.1f}" for x in s["tok_s_rounds"])
        mem = "" if "peak_tree_rss_gib" not in s else f"{s['peak_tree_rss_gib']:12.2f}"
        pss = "" if "peak_tree_pss_gib" not in s else f"{s['peak_tree_pss_gib']:6.2f}"
        lines.append(f"{v:<22} {s['tok_s']:8.1f} {rounds:<24} {mem} {pss}")
    lines.append("")
    for k, r in summary["ratios"].items():
        lines.append(f"{k:<36} {'-' if r is None else f'{r:.2f}'}")
    load = summary["load_average"]
    lines.append(f"\nload average (1 min) during the run: {load['min']:.2f}-{load['max']:.2f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(ap)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of every transformers/distilabel child (0: rlaif's rule, cores "
        "minus the load average, evaluated once at the start)",
    )
    ap.add_argument(
        "--shipped-prompts",
        type=int,
        default=0,
        help="run distilabel as shipped (batch 1, the slowest variant by far) on only the "
        "first N prompts; its tok/s barely depends on N at batch 1 (0: all)",
    )
    ap.add_argument(
        "--vllm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine option for rlaif-vllm and raw-vllm alike (e.g. block_size=32); repeatable",
    )
    ap.add_argument("--venv", type=Path, default=venv_dir(), help="distilabel's virtualenv")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()
    chosen = [v for v in VARIANTS if v in args.variants.split(",")]
    if not args.data.is_file():
        print(f"bench: data not found: {args.data} (needs ../shared beside the repo)")
        return 2
    dl_python = None
    if any(v.startswith("distilabel-") for v in chosen):
        dl_python = ensure_venv(args.venv)
    work = Path(tempfile.mkdtemp(prefix="rlaif-bench-gen-"))
    spec = prepare(args, work)
    args.threads = args.threads or busy_threads()
    runs: list[dict[str, Any]] = []
    for rnd in range(args.rounds):
        for v in round_order(chosen, rnd):
            out = work / f"{v}-{rnd}.json"
            cmd = command(v, spec, work, out, dl_python, args.shipped_prompts)
            res = run_child(cmd, child_env(v, args.threads), out, work / f"{v}-{rnd}.log")
            res.update(variant=v, round=rnd)
            runs.append(res)
            if res["ok"]:
                print(
                    f"round {rnd} {v:<20} {res['tokens'] / res['seconds']:7.1f} tok/s "
                    f"({res['tokens']} tok, {res['seconds']:.1f} s; load {res['load_s']:.1f} s; "
                    f"tree RSS {res['peak_tree_rss'] / GiB:.2f} GiB, "
                    f"PSS {res['peak_tree_pss'] / GiB:.2f} GiB; "
                    f"loadavg {res['load_before']:.2f}->{res['load_after']:.2f})",
                    flush=True,
                )
            else:
                print(f"round {rnd} {v}: FAILED {res['error'][:600]}", flush=True)
    variants = summarize(runs)
    loads = [x for r in runs for x in (r["load_before"], r["load_after"])]
    summary = {
        "workload": f"CAI-{args.prompts}: respond+critique+revise, greedy, {args.tokens} new "
        "tokens each, SmolLM2-135M-Instruct",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "distilabel_shipped_prompts": args.shipped_prompts or args.prompts,
        "machine": machine(),
        "load_average": {"min": min(loads), "max": max(loads), "mean": statistics.mean(loads)},
        "variants": variants,
        "ratios": ratios(variants),
        "runs": runs,
        "work_dir": str(work),
    }
    print("\n" + report(summary))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
