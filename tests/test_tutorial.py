"""docs/tutorial.md, executed: every command in its ```bash blocks runs, in order, as written.

The tutorial is the contract. Files it tells the reader to write come from its own ```yaml
blocks (first line ``# file: NAME``), so the doc and the test cannot drift apart; commands
run through ``bash`` in a fresh working directory with this interpreter's ``bin/`` (where the
``rlaif`` script lives) first on ``PATH``. A command must exit 0 unless its line ends with
``# exits N``. The fast tests check the parse (no block of an unknown kind, the command count
pinned), so a command the parser skipped fails the suite even where the slow test is skipped.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "tutorial.md"
BIN = Path(sys.executable).parent

# Pinned so that a command dropped from the doc (or missed by the parser) fails a fast test;
# change it together with the tutorial.
EXPECTED_COMMANDS = 26
EXPECTED_FILES = ("my-constitution.yaml", "typo.yaml", "my-constitution-v2.yaml", "tutorial.yaml")

_FENCE = re.compile(r"^```(\S*)\s*$")
_FILE_MARK = re.compile(r"^#\s*file:\s*(\S+)\s*$")
_EXIT_MARK = re.compile(r"\s#\s*exits\s+(\d+)\s*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")
# Commands whose output depends on no model numerics (token counts, content hashes): the doc
# must show their stdout line for line, so a stale example fails the test.
VERBATIM = ("rlaif constitution hash", "rlaif run tutorial.yaml --dry-run")
# Blocks the reader runs or writes, and blocks that only show output.
_RUN_KINDS = {"bash", "yaml"}
_SHOW_KINDS = {"text"}


@dataclass(frozen=True)
class Step:
    """One thing the tutorial makes the reader do.

    Attributes:
        kind: ``command`` (a shell command) or ``file`` (write ``text`` to ``name``).
        text: the command line(s), or the file's content.
        line: 1-based line of the doc where it starts, for failure messages.
        name: the file name (``file`` steps).
        exit_code: the exit status the doc promises (``command`` steps).
        shown: the ```text block right after the command's ```bash block, if any (the output
            the doc shows; set on the block's last command).
    """

    kind: str
    text: str
    line: int
    name: str = ""
    exit_code: int = 0
    shown: str = ""


def _blocks(doc: str) -> list[tuple[str, int, list[str]]]:
    """Fenced blocks as (info string, line of the first body line, body lines)."""
    out: list[tuple[str, int, list[str]]] = []
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i + 1
        j = start
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise AssertionError(f"tutorial.md:{i + 1}: code block never closed")
        out.append((m.group(1), start + 1, lines[start:j]))
        i = j + 1
    return out


def _commands(body: list[str], first_line: int) -> list[Step]:
    """Split a bash block into commands: ``\\`` continuations and heredocs stay whole."""
    steps: list[Step] = []
    i = 0
    while i < len(body):
        line = body[i]
        at = first_line + i
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [line]
        while parts[-1].endswith("\\") and i < len(body):
            parts.append(body[i])
            i += 1
        heredoc = _HEREDOC.search(parts[0])
        if heredoc:
            end = heredoc.group(2)
            while i < len(body) and body[i] != end:
                parts.append(body[i])
                i += 1
            if i == len(body):
                raise AssertionError(f"tutorial.md:{at}: heredoc never ends with {end!r}")
            parts.append(body[i])
            i += 1
        mark = _EXIT_MARK.search(parts[0])
        code = int(mark.group(1)) if mark else 0
        steps.append(Step("command", "\n".join(parts), at, exit_code=code))
    return steps


def parse_tutorial(doc: str) -> list[Step]:
    """Every command and file of the tutorial, in reading order.

    Raises:
        AssertionError: on a block of an unknown kind or a ```yaml block without a file mark,
            because its content would otherwise silently go unused.
    """
    steps: list[Step] = []
    previous = ""
    for info, line, body in _blocks(doc):
        if info == "text" and previous == "bash" and steps:
            steps[-1] = dataclasses.replace(steps[-1], shown="\n".join(body))
        previous = info
        if info == "bash":
            steps.extend(_commands(body, line))
        elif info == "yaml":
            mark = _FILE_MARK.match(body[0]) if body else None
            if not mark:
                raise AssertionError(f"tutorial.md:{line}: a yaml block must start '# file: NAME'")
            steps.append(Step("file", "\n".join(body) + "\n", line, name=mark.group(1)))
        elif info not in _SHOW_KINDS:
            kinds = sorted(_RUN_KINDS | _SHOW_KINDS)
            raise AssertionError(f"tutorial.md:{line}: code block kind {info!r} not in {kinds}")
    return steps


def test_parse_counts_every_command_and_file() -> None:
    steps = parse_tutorial(DOC.read_text(encoding="utf-8"))
    commands = [s for s in steps if s.kind == "command"]
    files = [s.name for s in steps if s.kind == "file"]
    assert len(commands) == EXPECTED_COMMANDS, [c.text.splitlines()[0] for c in commands]
    assert tuple(files) == EXPECTED_FILES
    # every line that starts a command in a bash block is the start of exactly one step
    starts = sum(
        1
        for info, _, body in _blocks(DOC.read_text(encoding="utf-8"))
        if info == "bash"
        for ln in body
        if ln.startswith("rlaif ")
    )
    assert starts == sum(1 for c in commands if c.text.startswith("rlaif "))


def test_parser_keeps_continuations_heredocs_and_exit_codes() -> None:
    doc = "\n".join(
        [
            "```bash",
            "# a comment",
            "rlaif run a.yaml \\",
            "    --set x=1",
            "cat > p.jsonl <<'EOF'",
            '{"prompt": "# not a comment"}',
            "EOF",
            "rlaif constitution lint bad.yaml   # exits 2",
            "```",
            "```yaml",
            "# file: a.yaml",
            "name: a",
            "```",
            "```text",
            "$ whatever",
            "```",
        ]
    )
    steps = parse_tutorial(doc)
    assert [s.kind for s in steps] == ["command", "command", "command", "file"]
    assert steps[0].text == "rlaif run a.yaml \\\n    --set x=1"
    assert steps[1].text.endswith('"# not a comment"}\nEOF')
    assert steps[2].exit_code == 2 and steps[0].exit_code == 0
    assert steps[3].name == "a.yaml" and steps[3].text == "# file: a.yaml\nname: a\n"
    assert steps[2].shown == "" and steps[1].shown == ""
    shown = parse_tutorial("```bash\nrlaif a\nrlaif b\n```\n\n```text\nout\n```")
    assert [x.shown for x in shown] == ["", "out"]
    with pytest.raises(AssertionError, match="kind 'sh'"):
        parse_tutorial("```sh\nls\n```")
    with pytest.raises(AssertionError, match="file: NAME"):
        parse_tutorial("```yaml\nname: a\n```")


@pytest.mark.slow
def test_tutorial_runs_end_to_end(tmp_path: Path) -> None:
    """Every command of docs/tutorial.md, in order, on the real SmolLM2 (a few CPU minutes)."""
    assert (BIN / "rlaif").exists(), f"no rlaif script next to {sys.executable}"
    steps = parse_tutorial(DOC.read_text(encoding="utf-8"))
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"  # nothing may reach for the hub
    env["PYTHONHASHSEED"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _run_all(steps, tmp_path, env)
    finally:
        # pytest keeps the last few tmp dirs: drop the trained weights (~0.5 GB per model)
        for f in tmp_path.rglob("*.safetensors"):
            f.unlink()


def _run_all(steps: list[Step], tmp_path: Path, env: dict[str, str]) -> None:
    """Write the files and run the commands in ``tmp_path``, each exiting as the doc says."""
    ran = 0
    timings: list[str] = []
    for step in steps:
        if step.kind == "file":
            (tmp_path / step.name).write_text(step.text, encoding="utf-8")
            continue
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", step.text],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        ran += 1
        timings.append(f"{time.monotonic() - t0:6.1f}s  {step.text.splitlines()[0]}")
        assert proc.returncode == step.exit_code, (
            f"tutorial.md:{step.line}: {step.text.splitlines()[0]!r} exited {proc.returncode}, "
            f"the doc says {step.exit_code}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-3000:]}"
        )
        if step.text.startswith(VERBATIM):
            missing = [ln for ln in proc.stdout.splitlines() if ln not in step.shown.splitlines()]
            assert not missing, f"tutorial.md:{step.line}: output not shown in the doc: {missing}"
    print("\n".join(timings))  # shown with pytest -s: where the minutes go
    assert ran == EXPECTED_COMMANDS
    # the walk-through's artifacts are where the doc says they are
    for rel in (
        "runs/v1/export/preferences/README.md",
        "runs/v1/train/dpo/metrics.json",
        "runs/v1/train/reward/metrics.json",
        "runs/v1/eval/eval.json",
        "runs/v1/report.html",
        "runs/v2/report.html",
        "runs/audit/audit.json",
    ):
        assert (tmp_path / rel).is_file(), rel
