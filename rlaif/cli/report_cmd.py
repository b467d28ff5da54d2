"""``rlaif report RUN_DIR [--out FILE]``: the run's HTML report (see :mod:`rlaif.report`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``rlaif report`` to the top-level parser."""
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page about a run (counts, judge, margins, training, eval)",
        description="Write an HTML report of a run directory: run summary, counts and filter "
        "reasons, principle usage, judge statistics, margin and reward distributions, "
        "training curves and evaluation results, with plots. One file, no external resources.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a pipeline run directory")
    p.add_argument("--out", metavar="FILE", help="where to write (default RUN_DIR/report.html)")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    """Write the report; print its path."""
    from rlaif.report import write_report

    path = write_report(args.run_dir, args.out)
    print(f"report: {path}")
    return 0
