"""rlaif vs the raw backend on the same batches: tokens/s side by side, and the ratio.

Workload CAI-32: the first 32 prompts of ../shared/data/hh-rlhf/harmless-base/dev-500.jsonl,
respond -> critique -> revise, greedy, 64 new tokens each, SmolLM2-135M-Instruct.

1. rlaif: ``run_pipeline`` on a fresh run directory (rendering, caching, records with fsync,
   export included), with the backend wrapped so the exact batches it sends are recorded.
2. raw: the same model object called directly on those recorded batches (transformers:
   chat template + left padding + ``model.generate``; vllm: ``LLM.generate`` on token ids).
Runs alternate (rlaif, raw, rlaif, raw, ...) in one process with one loaded model, so the
comparison sees the same machine state. Usage:

    python bench/generation.py --backend transformers
    python bench/generation.py --backend vllm --out bench/results/generation-vllm.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared/data/hh-rlhf/harmless-base/dev-500.jsonl"

PIPELINE = """\
name: bench-cai-32
seed: 0
batch_size: {batch_size}
constitution: helpful-harmless
model: {{id: HuggingFaceTB/SmolLM2-135M-Instruct, backend: {backend}}}
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


class Recorder:
    """Wraps a backend and remembers every generate batch (conversations, params)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.batches: list[tuple[list, Any]] = []
        self.model_id, self.model_revision = backend.model_id, backend.model_revision
        self.name = backend.name

    def generate(self, conversations, params):
        self.batches.append((conversations, params))
        return self.backend.generate(conversations, params)

    def score_choices(self, conversations, choices):
        return self.backend.score_choices(conversations, choices)

    def describe(self):
        return self.backend.describe()

    def close(self):  # the bench owns the backend's lifetime
        pass


def raw_transformers(backend: Any, batches: list) -> int:
    """Plain transformers on the recorded batches; returns generated tokens."""
    import torch

    tok, model = backend.tokenizer, backend.model
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    total = 0
    for conversations, params in batches:
        texts = [
            tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=params.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        for row in new.tolist():
            n = 0
            for t in row:
                n += 1
                if t in backend.eos_ids:
                    break
            total += n
    return total


def raw_vllm(backend: Any, batches: list) -> int:
    """Plain ``vllm.LLM.generate`` on the recorded batches; returns generated tokens."""
    import vllm

    from rlaif.backends.local import prompt_ids

    total = 0
    for conversations, params in batches:
        prompts = [{"prompt_token_ids": prompt_ids(backend.tokenizer, c)} for c in conversations]
        sp = vllm.SamplingParams(temperature=0.0, max_tokens=params.max_new_tokens)
        outs = backend._llm.generate(prompts, sp, use_tqdm=False)
        total += sum(len(o.outputs[0].token_ids) for o in outs)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = ap.parse_args()

    from rlaif.backends import load_backend
    from rlaif.pipeline import load_pipeline, run_pipeline

    if not args.data.is_file():
        print(f"bench: data not found: {args.data} (needs ../shared beside the repo)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="rlaif-bench-gen-"))
    prompts = work / "prompts.jsonl"
    with open(args.data, encoding="utf-8") as src, open(prompts, "w", encoding="utf-8") as dst:
        for _, line in zip(range(args.prompts), src, strict=False):
            dst.write(line)
    pipe = work / "pipeline.yaml"
    pipe.write_text(
        PIPELINE.format(
            batch_size=args.batch_size, backend=args.backend, prompts=prompts, tokens=args.tokens
        )
    )
    cfg = load_pipeline(pipe)

    t = time.perf_counter()
    opts = {"batch_size": args.batch_size} if args.backend == "transformers" else {}
    backend = load_backend(args.backend, cfg.model.id, **opts)
    load_s = time.perf_counter() - t
    raw = raw_transformers if args.backend == "transformers" else raw_vllm
    rows: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        rec = Recorder(backend)
        t = time.perf_counter()
        res = run_pipeline(cfg, out=work / f"run-{rep}", backend=rec, stream=open(os.devnull, "w"))  # noqa: SIM115
        rlaif_s = time.perf_counter() - t
        rlaif_tokens = res.stats["completion_tokens"]
        t = time.perf_counter()
        raw_tokens = raw(backend, rec.batches)
        raw_s = time.perf_counter() - t
        rows.append(
            {
                "repeat": rep,
                "rlaif_s": rlaif_s,
                "rlaif_tokens": rlaif_tokens,
                "rlaif_tok_s": rlaif_tokens / rlaif_s,
                "raw_s": raw_s,
                "raw_tokens": raw_tokens,
                "raw_tok_s": raw_tokens / raw_s,
                "batches": [len(b[0]) for b in rec.batches],
            }
        )
        r = rows[-1]
        print(
            f"repeat {rep}: rlaif {r['rlaif_tok_s']:7.1f} tok/s ({rlaif_tokens} tok, "
            f"{rlaif_s:.1f} s) | raw {r['raw_tok_s']:7.1f} tok/s ({raw_tokens} tok, "
            f"{raw_s:.1f} s) | ratio {r['rlaif_tok_s'] / r['raw_tok_s']:.3f}",
            flush=True,
        )
    backend.close()
    ratio = statistics.median(r["rlaif_tok_s"] / r["raw_tok_s"] for r in rows)
    summary = {
        "workload": f"CAI-{args.prompts}: respond+critique+revise, greedy, {args.tokens} new "
        "tokens, SmolLM2-135M-Instruct",
        "backend": args.backend,
        "batch_size": args.batch_size,
        "model_load_s": load_s,
        "rlaif_tok_s": statistics.median(r["rlaif_tok_s"] for r in rows),
        "raw_tok_s": statistics.median(r["raw_tok_s"] for r in rows),
        "ratio_rlaif_over_raw": ratio,
        "runs": rows,
        "machine": f"{os.cpu_count()} cores, {sys.platform}",
    }
    print(
        f"\n{args.backend}: rlaif {summary['rlaif_tok_s']:.1f} tok/s, raw "
        f"{summary['raw_tok_s']:.1f} tok/s, rlaif/raw = {ratio:.3f} (median of "
        f"{args.repeats}); model load {load_s:.1f} s"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
