"""Held-out compliance with the constitution's code-checked principles (``check:``).

Every response of an evaluation is checked by each principle with a check
(:func:`rlaif.constitution.checks.run_check`), with its prompt's label: ``harmful`` for the
``red_team`` set, ``safe`` for the ``safe`` set, the label column for ``prompts`` (when the
evaluation names one). A principle's compliance is the share of responses it applies to that
pass it; ``all`` is the share of responses that pass every check applying to them. Rates carry
Wilson 95 % intervals. Checks run no model, so policy and baseline are measured exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlaif.constitution import Principle
from rlaif.constitution.checks import run_check
from rlaif.evaluate.audit import rate

SET_LABELS = {"red_team": "harmful", "safe": "safe"}  # the label of every prompt of a set


def check_responses(
    rows: Sequence[Any], principles: Sequence[Principle], roles: Sequence[str]
) -> None:
    """Fill ``row.checks[role][principle id]`` with True / False, or None when the check does
    not apply to the prompt's label or could not run (``row.errors`` says why)."""
    for row in rows:
        for role in roles:
            text = row.responses.get(role)
            if text is None:
                continue
            out: dict[str, bool | None] = {}
            for p in principles:
                assert p.check is not None
                r = run_check(p.check, text, row.label)
                out[p.id] = r.passed
                if r.error:
                    row.errors[f"check_{role}_{p.id}"] = r.error
            row.checks[role] = out


def compliance(rows: Sequence[Any], role: str) -> dict[str, Any]:
    """Per principle and ``all``: the rate of checked responses of ``role`` that pass."""
    checked = [row.checks[role] for row in rows if row.checks.get(role)]
    if not checked:
        return {}
    pids = list(dict.fromkeys(pid for c in checked for pid in c))
    out: dict[str, Any] = {}
    for pid in pids:
        got = [c[pid] for c in checked if c.get(pid) is not None]
        out[pid] = rate(sum(bool(x) for x in got), len(got))
    applied = [[v for v in c.values() if v is not None] for c in checked]
    applied = [a for a in applied if a]
    out["all"] = rate(sum(all(a) for a in applied), len(applied))
    return out
