"""README.md's code blocks: fences that pair up, and ``rlaif`` commands the real CLI accepts.

Checks that:
    * every fenced block is closed: an opening fence may carry a language tag, a closing one
      may not, and no fence is left open at the end of the file;
    * every ``rlaif ...`` command in a ```bash, ```sh or ```console block names a real
      subcommand path and real flags. Each command is parsed by the real argparse parser
      (``rlaif.cli.main.build_parser``) and never run, so no model, network or file is touched;
    * the README still shows the two set-up commands, ``make demo`` and ``make test``.

The checkers take markdown text, and a self-test feeds them a bad snippet, so they can fail.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

from rlaif.cli.main import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_TAGS = {"bash", "sh", "console"}
_FENCE = re.compile(r"^ {0,3}```(.*)$")


def parse_fences(text: str) -> tuple[list[tuple[str, int, list[tuple[int, str]]]], list[str]]:
    """Splits markdown into fenced blocks.

    Returns:
        ``(blocks, errors)``: each block is ``(tag, opening line, [(line number, line), ...])``;
        each error names the line of a fence that is never closed.
    """
    blocks, errors = [], []
    open_at, tag, body = None, "", []
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if not match:
            if open_at is not None:
                body.append((number, line))
            continue
        info = match.group(1).strip()
        if open_at is None:
            open_at, tag, body = number, info, []
        elif info:  # a tagged fence cannot close a block: the open one runs on
            errors.append(f"line {open_at}: fence not closed before the ```{info} at line {number}")
            open_at, tag, body = number, info, []
        else:
            blocks.append((tag, open_at, body))
            open_at = None
    if open_at is not None:
        errors.append(f"line {open_at}: fence left open at the end of the file")
    return blocks, errors


def shell_lines(text: str) -> list[tuple[int, str]]:
    """Logical lines of the shell blocks: ``\\`` continuations joined, ``$ `` prompts stripped."""
    lines, pending, start = [], "", 0
    for tag, _, body in parse_fences(text)[0]:
        if tag not in SHELL_TAGS:
            continue
        for number, line in body:
            if not pending:
                start = number
                line = line.strip().removeprefix("$ ")
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            lines.append((start, pending + line))
            pending = ""
    return lines


def rlaif_commands(text: str) -> list[tuple[int, list[str]]]:
    """``(line number, argv)`` of every ``rlaif`` command in the shell blocks, comments dropped."""
    commands = [(n, shlex.split(line, comments=True)) for n, line in shell_lines(text)]
    return [(n, argv) for n, argv in commands if argv and argv[0] == "rlaif"]


def cli_errors(text: str) -> list[str]:
    """Parses each ``rlaif`` command with the real parser (never runs it); returns the failures."""
    parser, errors = build_parser(), []
    for number, argv in rlaif_commands(text):
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv[1:])
        except SystemExit as exc:
            if exc.code not in (0, None):  # 0: --help or --version, which are real flags
                reason = stderr.getvalue().strip().splitlines()[-1:] or [f"exit {exc.code}"]
                errors.append(f"README.md line {number}: `{shlex.join(argv)}`: {reason[0]}")
    return errors


def test_readme_fences_are_closed() -> None:
    errors = parse_fences(README.read_text(encoding="utf-8"))[1]
    assert not errors, "README.md:\n" + "\n".join(errors)


def test_readme_rlaif_commands_parse() -> None:
    text = README.read_text(encoding="utf-8")
    assert rlaif_commands(text), "no rlaif command found in README.md's shell blocks"
    errors = cli_errors(text)
    assert not errors, "\n".join(errors)


def test_readme_shows_make_demo_and_make_test() -> None:
    lines = shell_lines(README.read_text(encoding="utf-8"))
    shown = {line.split(" #")[0].strip() for _, line in lines}
    assert {"make demo", "make test"} <= shown, "README.md must show `make demo` and `make test`"


def test_checkers_report_a_bad_snippet() -> None:
    snippet = "\n".join(
        [
            "```bash",
            "source .venv/bin/activate",
            "$ rlaif run no/such/pipeline.yaml --dry-run  # a missing file is fine: parse only",
            "rlaif constitution import --from anthropic \\",
            "    a.json b.json -o out.yaml",
            "rlaif run --no-such-flag x.yaml",
            "rlaif frobnicate",
            "```",
            "```console",
        ]
    )
    assert [n for n, _ in rlaif_commands(snippet)] == [3, 4, 6, 7]
    errors = cli_errors(snippet)
    assert len(errors) == 2, errors
    assert errors[0].startswith("README.md line 6: `rlaif run --no-such-flag x.yaml`")
    assert "--no-such-flag" in errors[0]
    assert errors[1].startswith("README.md line 7: `rlaif frobnicate`")
    assert parse_fences(snippet)[1] == ["line 9: fence left open at the end of the file"]
    assert parse_fences("```bash\nx\n```yaml\n```\n")[1] == [
        "line 1: fence not closed before the ```yaml at line 3"
    ]
