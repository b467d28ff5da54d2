"""Evaluation: the judge audit (agreement with human labels, position and length bias).

``read_comparisons`` reads human-labelled pairs, ``run_audit`` judges them in both orders,
``audit_metrics`` measures, ``audit_report`` / ``write_audit`` write the audit folder
(matplotlib is imported only when plots are drawn).
"""

from rlaif.evaluate.audit import (
    DEFINITIONS,
    AuditRun,
    Judgement,
    audit_metrics,
    run_audit,
    summarize,
    wilson,
)
from rlaif.evaluate.pairs_io import FORMATS, AuditData, AuditPair, MCItem, read_comparisons
from rlaif.evaluate.plots import audit_report, format_table, write_audit

__all__ = [
    "DEFINITIONS",
    "FORMATS",
    "AuditData",
    "AuditPair",
    "AuditRun",
    "Judgement",
    "MCItem",
    "audit_metrics",
    "audit_report",
    "format_table",
    "read_comparisons",
    "run_audit",
    "summarize",
    "wilson",
    "write_audit",
]
