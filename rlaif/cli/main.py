"""The ``rlaif`` command. Each sub-command lives in its own module; this one wires them up.

User errors (:class:`rlaif.errors.RlaifError`) print one line on stderr and exit 2, with no
traceback. Set ``RLAIF_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import os
import sys

from rlaif.errors import RlaifError
from rlaif.version import __version__


def build_parser() -> argparse.ArgumentParser:
    from rlaif.cli import constitution_cmd, demo_cmd

    parser = argparse.ArgumentParser(
        prog="rlaif",
        description="Constitutional AI and RLAIF: constitutions, synthetic preference data, "
        "reward models, DPO and PPO.",
    )
    parser.add_argument("--version", action="version", version=f"rlaif {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    constitution_cmd.register(sub)
    demo_cmd.register(sub)
    for optional in ("run_cmd", "judge_cmd", "train_cmd", "eval_cmd", "report_cmd"):
        try:
            module = __import__(f"rlaif.cli.{optional}", fromlist=["register"])
        except ImportError:  # a command whose module is not part of this build
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RlaifError as exc:
        if os.environ.get("RLAIF_DEBUG"):
            raise
        print(f"rlaif: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "rlaif: interrupted; finished work is saved, run the same command to resume",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
