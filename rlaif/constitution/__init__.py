"""Constitutions: load, validate, version, hash, diff and import; code-checked principles."""

from rlaif.constitution.checks import Check, CheckResult, parse_check, run_check
from rlaif.constitution.diff import ConstitutionDiff, diff_constitutions
from rlaif.constitution.dump import to_yaml
from rlaif.constitution.importers import import_constitution
from rlaif.constitution.loader import builtin_names, find_constitution, load_constitution
from rlaif.constitution.model import Constitution, Contrast, Example, Principle

__all__ = [
    "Check",
    "CheckResult",
    "Constitution",
    "ConstitutionDiff",
    "Contrast",
    "Example",
    "Principle",
    "builtin_names",
    "diff_constitutions",
    "find_constitution",
    "import_constitution",
    "load_constitution",
    "parse_check",
    "run_check",
    "to_yaml",
]
