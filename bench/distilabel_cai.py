"""CAI-32 with distilabel 1.5.3: respond -> critique -> revise with its ``TransformersLLM``.

Runs in distilabel's own virtualenv (see ``distilabel_env.py``), started by ``generation.py``:

    <venv>/bin/python bench/distilabel_cai.py --inputs distilabel-inputs.json \
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --tokens 64 --batch-size 0 --work DIR --out R.json

The inputs are the exact messages rlaif sends (conversation, critique request, revision
request); the three steps are distilabel ``Task`` subclasses at module level (distilabel runs
each step in its own process and pickles it). Generation is greedy, set by hand
(``TransformersLLM`` defaults to sampling at temperature 0.1 with repetition penalty 1.1).
``--batch-size 0`` leaves the HF pipeline as shipped (one prompt at a time); ``16`` forces
its batch size (left padding), the best configuration found for it.

The GGUF file is converted once to a plain HF folder with this venv's transformers (not timed),
since rlaif's converted folder is written by transformers 5. Timing: the span from the first
``generate`` call to the last one's end across the three step processes, so model loads are
not counted and distilabel's hand-offs between steps are. Tokens: the generated text
re-tokenized, plus one for the end-of-sequence token when a reply stopped before the cap
(rlaif counts that token too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from distilabel.models.llms import TransformersLLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import Task

# Set by main() before the pipeline starts; step processes inherit the environment.
_TIMING_ENV = "RLAIF_BENCH_DL_TIMING"
_CLEAN_ENV = "RLAIF_BENCH_DL_CLEAN"


def _clean(text: str | None) -> str:
    """rlaif's answer cleaning (strip, drop an echoed ``Revision:`` label)."""
    spec = json.loads(os.environ.get(_CLEAN_ENV, '["$^", 0]'))
    return re.compile(spec[0], spec[1]).sub("", (text or "").strip(), count=1).strip()


class TimedTransformersLLM(TransformersLLM):
    """``TransformersLLM`` that logs each ``generate`` call's span and generated tokens.

    ``pipeline_batch_size`` > 0 forces the HF pipeline's batch size (with left padding, which
    batched decoder-only generation needs); 0 keeps distilabel's default (batch 1).
    """

    pipeline_batch_size: int = 0

    def load(self) -> None:
        super().load()
        if self.pipeline_batch_size:
            self._pipeline._batch_size = self.pipeline_batch_size
            self._pipeline.tokenizer.padding_side = "left"

    # The full signature, not **kwargs: distilabel derives its runtime parameters from it.
    def generate(  # type: ignore[override]
        self,
        inputs: list[Any],
        num_generations: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 0.1,
        repetition_penalty: float = 1.1,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
    ) -> list[Any]:
        start = time.time()
        out = super().generate(
            inputs=inputs,
            num_generations=num_generations,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            repetition_penalty=repetition_penalty,
            top_p=top_p,
            top_k=top_k,
            do_sample=do_sample,
        )
        end = time.time()
        cap = max_new_tokens
        tok = self._pipeline.tokenizer
        tokens = 0
        for row in out:
            for text in row["generations"]:
                n = len(tok.encode(text or "", add_special_tokens=False))
                tokens += n + (1 if n < cap else 0)
        with open(os.environ[_TIMING_ENV], "a", encoding="utf-8") as f:
            f.write(json.dumps({"start": start, "end": end, "tokens": tokens, "n": len(out)}))
            f.write("\n")
        return out


class Respond(Task):
    """The model answers the conversation."""

    @property
    def inputs(self) -> list[str]:
        return ["conversation"]

    @property
    def outputs(self) -> list[str]:
        return ["response", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        return list(input["conversation"])

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict:
        return {"response": _clean(output)}


class Critique(Task):
    """The model critiques its response under the prompt's principle."""

    @property
    def inputs(self) -> list[str]:
        return ["conversation", "response", "critique_ask"]

    @property
    def outputs(self) -> list[str]:
        return ["critique", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        return [
            *input["conversation"],
            {"role": "assistant", "content": input["response"]},
            {"role": "user", "content": input["critique_ask"]},
        ]

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict:
        return {"critique": _clean(output)}


class Revise(Task):
    """The model rewrites its response to answer the critique."""

    @property
    def inputs(self) -> list[str]:
        return ["conversation", "response", "critique_ask", "critique", "revision_ask"]

    @property
    def outputs(self) -> list[str]:
        return ["revision", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        return [
            *input["conversation"],
            {"role": "assistant", "content": input["response"]},
            {"role": "user", "content": input["critique_ask"]},
            {"role": "assistant", "content": input["critique"]},
            {"role": "user", "content": input["revision_ask"]},
        ]

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict:
        return {"revision": _clean(output)}


def convert(gguf: Path, dest: Path) -> Path:
    """A plain HF folder of the GGUF model, written by this venv's transformers (once)."""
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = dest.with_name(dest.name + ".tmp")
    tok.save_pretrained(tmp)
    model.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def build(model: Path, rows: list[dict[str, Any]], tokens: int, batch: int, cache: Path):
    """The four-step distilabel pipeline over ``rows``."""
    greedy = {
        "max_new_tokens": tokens,
        "do_sample": False,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
    }

    def llm() -> TimedTransformersLLM:
        return TimedTransformersLLM(
            model=str(model),
            torch_dtype="float32",
            device="cpu",
            generation_kwargs=greedy,
            pipeline_batch_size=batch,
        )

    with Pipeline(name="rlaif-bench-cai", cache_dir=str(cache)) as pipe:
        load = LoadDataFromDicts(data=rows, batch_size=len(rows))
        respond = Respond(llm=llm(), input_batch_size=len(rows))
        critique = Critique(llm=llm(), input_batch_size=len(rows))
        revise = Revise(llm=llm(), input_batch_size=len(rows))
        load >> respond >> critique >> revise
    return pipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N rows (0: all)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    spec = json.loads(args.inputs.read_text())
    t = time.perf_counter()
    model = convert(args.gguf, args.work.parent / "distilabel-model")
    convert_s = time.perf_counter() - t
    timing = args.work / "timing.jsonl"
    timing.unlink(missing_ok=True)
    os.environ[_TIMING_ENV] = str(timing)
    os.environ[_CLEAN_ENV] = json.dumps([spec["clean_regex"], spec["clean_flags"]])
    rows_in = spec["rows"][: args.limit] if args.limit else spec["rows"]
    pipe = build(model, rows_in, args.tokens, args.batch_size, args.work / "cache")
    t = time.perf_counter()
    distiset = pipe.run(use_cache=False)
    wall = time.perf_counter() - t
    calls = [json.loads(line) for line in timing.read_text().splitlines()]
    rows = distiset["default"]["train"]
    done = sum(1 for r in rows if r.get("revision"))
    result = {
        "tokens": sum(c["tokens"] for c in calls),
        "seconds": max(c["end"] for c in calls) - min(c["start"] for c in calls),
        "wall_s": wall,
        "load_s": wall - (max(c["end"] for c in calls) - min(c["start"] for c in calls)),
        "convert_s": convert_s,
        "generate_calls": len(calls),
        "rows": len(rows),
        "revisions": done,
        "pipeline_batch_size": args.batch_size or 1,
    }
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
