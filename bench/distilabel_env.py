"""distilabel's side of the generation benchmark: its virtualenv and its inputs.

distilabel 1.5.3 runs in a virtualenv of its own (its pins clash with rlaif's): torch 2.13.0
(CPU) first, so pip never swaps it, then ``distilabel[hf-transformers]==1.5.3``, ``requests``
(it imports it without declaring it) and a transformers 4.x (what 1.5.3 was written against).

The inputs are the exact messages rlaif sends for CAI-32: the conversation, and the user turns
that ask for the critique and the revision, rendered by rlaif's own templates with the
principle rlaif draws for each prompt. distilabel's tasks only stitch the model's answers in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DISTILABEL = "distilabel[hf-transformers]==1.5.3"
TORCH = "torch==2.13.0"
# Extra packages: requests is imported by distilabel without being declared; transformers 5
# removed pipeline arguments that 1.5.3 passes; gguf + accelerate let transformers 4 read
# the model file.
EXTRAS = ("requests", "transformers>=4.45,<5", "gguf", "accelerate")
_RESPONSE, _CRITIQUE = "\x00response\x00", "\x00critique\x00"


def venv_dir() -> Path:
    """Where the distilabel virtualenv lives (``RLAIF_BENCH_VENVS`` overrides the parent)."""
    base = os.environ.get("RLAIF_BENCH_VENVS") or Path.home() / ".cache/rlaif/bench-venvs"
    return Path(base) / "distilabel-1.5.3"


def install_commands(venv: Path, base_python: str) -> list[list[str]]:
    """The commands that create the virtualenv, in order (torch pinned before distilabel)."""
    py = str(venv / "bin" / "python")
    pin = str(venv / "constraints.txt")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    torch_index = os.environ.get("RLAIF_BENCH_TORCH_INDEX")  # e.g. the PyTorch CPU index
    torch_cmd = [*pip, TORCH] + (["--extra-index-url", torch_index] if torch_index else [])
    return [
        [base_python, "-m", "venv", str(venv)],
        torch_cmd,
        [*pip, "-c", pin, DISTILABEL, *EXTRAS],
    ]


def ensure_venv(venv: Path) -> Path:
    """Create distilabel's virtualenv unless it is already complete; return its python."""
    py = venv / "bin" / "python"
    marker = venv / ".rlaif-bench-ready"
    if marker.is_file():
        return py
    # The venv must be built from a real interpreter, not from rlaif's own venv.
    base = getattr(sys, "_base_executable", sys.executable)
    print(f"bench: creating {venv} (torch 2.13.0, distilabel 1.5.3); takes minutes", flush=True)
    for i, cmd in enumerate(install_commands(venv, base)):
        if i == 1:
            venv.joinpath("constraints.txt").write_text(TORCH + "\n")
        subprocess.run(cmd, check=True)
    marker.write_text(DISTILABEL + "\n")
    return py


def split_turns(
    convo: list[dict[str, str]], crit: list[dict[str, str]], rev: list[dict[str, str]]
) -> tuple[str, str]:
    """The critique and revision requests from messages rendered with placeholder answers.

    Raises:
        ValueError: the templates do not have the shape distilabel's tasks rebuild
            (conversation, answer, ask for critique, critique, ask for revision).
    """
    want_crit = [*convo, {"role": "assistant", "content": _RESPONSE}]
    if crit[:-1] != want_crit or crit[-1]["role"] != "user":
        raise ValueError("critique template is not conversation + response + request")
    want_rev = [*crit, {"role": "assistant", "content": _CRITIQUE}]
    if rev[:-1] != want_rev or rev[-1]["role"] != "user":
        raise ValueError("revise template is not critique messages + critique + request")
    return crit[-1]["content"], rev[-1]["content"]


def distilabel_inputs(cfg: Any) -> dict[str, Any]:
    """The rows distilabel gets for a CAI pipeline config, plus rlaif's answer-cleaning regex."""
    from rlaif.backends.base import SamplingParams
    from rlaif.constitution import load_constitution
    from rlaif.prompts import PromptBook
    from rlaif.sources import read_prompts
    from rlaif.stages import critique as cai

    p, stage = cfg.prompts, cfg.stages.critique_revise
    items, _ = read_prompts(
        cfg.resolve_path(p.path), fmt=p.format, field=p.field, id_field=p.id_field, limit=p.limit
    )
    book = PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None)
    ctx = cai.CritiqueContext(
        load_constitution(cfg.constitution_ref()), book, cfg.system, stage.few_shot, cfg.seed
    )
    params = SamplingParams(temperature=0)
    rows = []
    for item in items:
        convo = cai.respond_request(ctx, item.messages(), params).messages
        principle = cai.principle_for(ctx, item.id, 1)
        crit = cai.critique_request(ctx, item.messages(), _RESPONSE, principle, params)
        rev = cai.revise_request(ctx, item.messages(), _RESPONSE, principle, _CRITIQUE, params)
        critique_ask, revision_ask = split_turns(convo, crit.messages, rev.messages)
        rows.append(
            {"conversation": convo, "critique_ask": critique_ask, "revision_ask": revision_ask}
        )
    return {"rows": rows, "clean_regex": cai._LABEL.pattern, "clean_flags": cai._LABEL.flags}
