"""One self-contained HTML page per run: ``rlaif report RUN_DIR``.

:func:`build_report` returns the page, :func:`write_report` writes it (default
``RUN_DIR/report.html``). Plots are embedded PNGs, CSS is inline, there are no scripts and no
external resources, and every piece of text taken from the run is HTML-escaped.
"""

from rlaif.report.build import REPORT_NAME, SECTIONS, build_report, write_report

__all__ = ["REPORT_NAME", "SECTIONS", "build_report", "write_report"]
