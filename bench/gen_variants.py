"""One variant of the CAI-32 generation benchmark, run as its own process by ``generation.py``.

    python bench/gen_variants.py VARIANT WORK_DIR OUT_JSON

``WORK_DIR`` holds ``spec.json`` (model folder, token cap, batch size, pipeline file) written
by ``generation.py``. Variants:

* ``rlaif-transformers`` / ``rlaif-vllm``: ``run_pipeline`` on a fresh run directory with a
  ready backend (model load not timed), wrapped so the exact batches it sends are saved to
  ``WORK_DIR/batches-<backend>.json`` for the raw variant.
* ``raw-transformers``: ``AutoModelForCausalLM.generate`` on those batches (chat template,
  left padding, greedy), no rlaif code on the timed path.
* ``raw-vllm``: ``vllm.LLM.generate`` on those batches with the engine settings rlaif uses.
* ``pair-transformers``: rlaif with transformers, and beside each batch it sends, the raw
  ``model.generate`` on the same batch and the same model object, in alternating order; the
  raw time is taken out of the pipeline's. Far less noisy on a shared machine than comparing
  two processes minutes apart.
* ``pair-vllm``: the same with rlaif's vLLM backend and plain ``LLM.generate`` on its engine.
  Each raw call empties the prefix cache first, as rlaif's deterministic default does before
  each of its calls, so neither side of a pair is handed the other's prefill.

Each variant warms its model up on one short request before the clock starts, and writes
``{"tokens", "seconds", "load_s", ...}`` to ``OUT_JSON``. Generated tokens count every sampled
token, the end-of-sequence token included, the same way on both sides.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARM = [[{"role": "user", "content": "Say hello."}]]


class Recorder:
    """Wraps a backend and remembers every generate batch (conversations, params), and the
    time spent in the backend's ``generate`` (the rest of a run is rlaif's own)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.batches: list[tuple[list, Any]] = []
        self.backend_s = 0.0
        self.model_id, self.model_revision = backend.model_id, backend.model_revision
        self.name = backend.name

    def generate(self, conversations, params):
        self.batches.append((conversations, params))
        t = time.perf_counter()
        out = self.backend.generate(conversations, params)
        self.backend_s += time.perf_counter() - t
        return out

    def score_choices(self, conversations, choices):
        return self.backend.score_choices(conversations, choices)

    def count_tokens(self, conversation):
        return self.backend.count_tokens(conversation)

    @property
    def max_context(self):
        return self.backend.max_context

    def describe(self):
        return self.backend.describe()

    def close(self):  # the variant owns the backend's lifetime
        pass


class PairedRecorder(Recorder):
    """A Recorder that also runs the raw call on each batch, right beside rlaif's.

    The order alternates batch by batch (rlaif first, then raw first), so a slow patch of a
    shared machine hits both; the raw calls' time is later taken out of the pipeline's.
    """

    def __init__(self, backend: Any, raw: Any) -> None:
        super().__init__(backend)
        self.raw = raw
        self.raw_s = 0.0
        self.raw_tokens = 0

    def _raw(self, conversations, params) -> None:
        t = time.perf_counter()
        self.raw_tokens += self.raw(conversations, params.max_new_tokens)
        self.raw_s += time.perf_counter() - t

    def generate(self, conversations, params):
        raw_first = len(self.batches) % 2 == 1
        if raw_first:
            self._raw(conversations, params)
        out = super().generate(conversations, params)
        if not raw_first:
            self._raw(conversations, params)
        return out


def chat_texts(tok: Any, convs: list) -> list[str]:
    """Each conversation through the chat template, ready for the assistant's reply."""
    return [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]


def token_prompts(tok: Any, convs: list) -> list[dict[str, list[int]]]:
    """``chat_texts`` as vLLM token prompts (the template already holds the special tokens)."""
    return [
        {"prompt_token_ids": tok(t, add_special_tokens=False)["input_ids"]}
        for t in chat_texts(tok, convs)
    ]


def hf_generate_fn(tok: Any, model: Any, eos_ids: set[int]) -> Any:
    """Plain transformers: ``run(conversations, max_new) -> generated tokens`` with
    ``model.generate`` (chat template, left padding, greedy)."""
    import torch

    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def run(convs: list, max_new: int) -> int:
        texts = chat_texts(tok, convs)
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id
            )
        n = 0
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            for t_id in row:  # count up to and including the first EOS, like rlaif
                n += 1
                if t_id in eos_ids:
                    break
        return n

    return run


def vllm_generate_fn(llm: Any, tok: Any, reset: bool = False) -> Any:
    """Plain vLLM: ``run(conversations, max_new) -> generated tokens`` with ``LLM.generate``
    (chat template, greedy); ``reset`` empties the prefix cache first."""
    import vllm

    def run(convs: list, max_new: int) -> int:
        prompts = token_prompts(tok, convs)
        sp = vllm.SamplingParams(temperature=0.0, max_tokens=max_new)
        if reset:
            llm.reset_prefix_cache()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return run


def _rlaif(kind: str, spec: dict[str, Any], work: Path, paired: bool = False) -> dict[str, Any]:
    from rlaif.backends import load_backend
    from rlaif.backends.base import SamplingParams
    from rlaif.pipeline import load_pipeline, run_pipeline

    cfg = load_pipeline(Path(spec["pipeline"]))
    t = time.perf_counter()
    opts: dict[str, Any] = (
        {"batch_size": spec["batch_size"]} if kind == "transformers" else spec["vllm_options"]
    )
    backend = load_backend(kind, spec["model"], **opts)
    load_s = time.perf_counter() - t
    backend.generate(WARM, SamplingParams(max_new_tokens=4))
    if paired:  # raw = HF generate / LLM.generate on the very model object rlaif uses
        if kind == "vllm":
            raw = vllm_generate_fn(backend.llm, backend.tokenizer, reset=True)
        else:
            raw = hf_generate_fn(backend.tokenizer, backend.model, set(backend.eos_ids))
        raw(WARM, 4)
        rec: Recorder = PairedRecorder(backend, raw)
    else:
        rec = Recorder(backend)
    with tempfile.TemporaryDirectory(prefix="rlaif-bench-run-") as run_dir:
        t = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            res = run_pipeline(cfg, out=run_dir, backend=rec, stream=quiet)
        seconds = time.perf_counter() - t
    batches = [[convs, params.to_dict()] for convs, params in rec.batches]
    (work / f"batches-{kind}.json").write_text(json.dumps(batches))
    info = backend.describe()
    backend.close()
    extra = {}
    if isinstance(rec, PairedRecorder):
        seconds -= rec.raw_s
        extra = {"raw_tokens": rec.raw_tokens, "raw_seconds": rec.raw_s}
    return {
        **extra,
        "tokens": res.stats["completion_tokens"],
        "seconds": seconds,
        "backend_seconds": rec.backend_s,
        "requests": sum(len(b[0]) for b in batches),
        "load_s": load_s,
        "batches": [len(b[0]) for b in batches],
        "backend": info,
        "stats": res.stats,
    }


def _batches(work: Path, kind: str) -> list[tuple[list, dict[str, Any]]]:
    path = work / f"batches-{kind}.json"
    if not path.is_file():
        raise SystemExit(f"{path} missing: run rlaif-{kind} first")
    return [(c, p) for c, p in json.loads(path.read_text())]


def _raw_transformers(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batches = _batches(work, "transformers")
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model_folder"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_folder"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    eos_ids.add(tok.eos_token_id)
    run = hf_generate_fn(tok, model, eos_ids)

    run(WARM, 4)
    t = time.perf_counter()
    tokens = sum(run(convs, p["max_new_tokens"]) for convs, p in batches)
    return {
        "tokens": tokens,
        "seconds": time.perf_counter() - t,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
    }


def _raw_vllm(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import vllm
    from transformers import AutoTokenizer
    from vllm.platforms import current_platform

    from rlaif.backends.vllm_backend import cpu_engine_defaults

    batches = _batches(work, "vllm")
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model_folder"])
    llm = vllm.LLM(
        spec["model_folder"],
        enable_prefix_caching=True,  # as rlaif asks for it
        generation_config="vllm",
        seed=0,
        # the KV cache and block size rlaif sets on CPU, and the options rlaif-vllm was given
        **{**(cpu_engine_defaults() if current_platform.is_cpu() else {}), **spec["vllm_options"]},
    )
    load_s = time.perf_counter() - t
    run = vllm_generate_fn(llm, tok)
    run(WARM, 4)
    t = time.perf_counter()
    tokens = sum(run(convs, p["max_new_tokens"]) for convs, p in batches)
    seconds = time.perf_counter() - t
    llm.llm_engine.engine_core.shutdown()
    return {"tokens": tokens, "seconds": seconds, "load_s": load_s}


def main(argv: list[str]) -> int:
    """Run one variant; write its figures as JSON."""
    if len(argv) != 3:
        print(__doc__)
        return 2
    variant, work, out = argv[0], Path(argv[1]), Path(argv[2])
    spec = json.loads((work / "spec.json").read_text())
    if variant in ("rlaif-transformers", "rlaif-vllm"):
        result = _rlaif(variant.removeprefix("rlaif-"), spec, work)
    elif variant in ("pair-transformers", "pair-vllm"):
        result = _rlaif(variant.removeprefix("pair-"), spec, work, paired=True)
    elif variant == "raw-transformers":
        result = _raw_transformers(spec, work)
    elif variant == "raw-vllm":
        result = _raw_vllm(spec, work)
    else:
        print(f"unknown variant {variant!r}")
        return 2
    result["variant"] = variant
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
