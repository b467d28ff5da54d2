"""What changed between two versions of a constitution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlaif.constitution.model import Constitution, Principle


@dataclass
class ConstitutionDiff:
    """Differences between an old and a new constitution (both resolved)."""

    old: Constitution
    new: Constitution
    fields: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, dict[str, tuple[Any, Any]]] = field(default_factory=dict)
    reordered: bool = False

    @property
    def content_changed(self) -> bool:
        return self.old.content_hash != self.new.content_hash

    @property
    def version_bump_missing(self) -> bool:
        """True when the meaning changed but ``version`` did not."""
        same_artifact = self.old.name == self.new.name
        return same_artifact and self.content_changed and self.old.version == self.new.version

    @property
    def empty(self) -> bool:
        return not (self.fields or self.added or self.removed or self.changed or self.reordered)

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old.provenance(),
            "new": self.new.provenance(),
            "fields": {k: {"old": a, "new": b} for k, (a, b) in self.fields.items()},
            "added": self.added,
            "removed": self.removed,
            "changed": {
                pid: {k: {"old": a, "new": b} for k, (a, b) in ch.items()}
                for pid, ch in self.changed.items()
            },
            "reordered": self.reordered,
            "content_changed": self.content_changed,
            "warnings": self.warnings(),
        }

    def warnings(self) -> list[str]:
        out = []
        if self.version_bump_missing:
            out.append(
                f"content changed but version is still {self.new.version}: bump it so datasets "
                "made with each text can be told apart"
            )
        return out

    def format(self) -> str:
        """Human-readable report, one change per line."""
        lines = [
            f"--- {self.old.name} {self.old.version} ({self.old.content_hash[:12]})",
            f"+++ {self.new.name} {self.new.version} ({self.new.content_hash[:12]})",
        ]
        for key, (a, b) in self.fields.items():
            lines.append(f"~ {key}: {_short(a)} -> {_short(b)}")
        lines += [f"+ principle {pid}: {self.new.principle(pid).title}" for pid in self.added]
        lines += [f"- principle {pid}: {self.old.principle(pid).title}" for pid in self.removed]
        for pid, ch in self.changed.items():
            for key, (a, b) in ch.items():
                lines.append(f"~ principle {pid}.{key}: {_short(a)} -> {_short(b)}")
        if self.reordered:
            lines.append("~ principle order changed (it changes which principle a seed draws)")
        if self.empty:
            lines.append("no differences")
        lines += [f"warning: {w}" for w in self.warnings()]
        return "\n".join(lines)


def _short(value: Any, width: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _fields(p: Principle) -> dict[str, Any]:
    """A principle's fields, its check's rules as ``check.<rule>`` and its contrast as
    ``contrast.positive`` / ``contrast.negative`` (an unset one is absent)."""
    out = p.to_dict()
    for group in ("check", "contrast"):
        for key, value in (out.pop(group, None) or {}).items():
            out[f"{group}.{key}"] = value
    return out


def diff_constitutions(old: Constitution, new: Constitution) -> ConstitutionDiff:
    """Compare two resolved constitutions field by field and principle by principle."""
    d = ConstitutionDiff(old=old, new=new)
    for key in ("name", "version", "description", "source"):
        a, b = getattr(old, key), getattr(new, key)
        if a != b:
            d.fields[key] = (a, b)
    if old.examples != new.examples:
        d.fields["examples"] = (
            f"{len(old.examples)} example(s)",
            f"{len(new.examples)} example(s) (changed)",
        )
    old_ids = [p.id for p in old.principles]
    new_ids = [p.id for p in new.principles]
    d.added = [pid for pid in new_ids if pid not in old_ids]
    d.removed = [pid for pid in old_ids if pid not in new_ids]
    for pid in new_ids:
        if pid in old_ids:
            a, b = _fields(old.principle(pid)), _fields(new.principle(pid))
            keys = dict.fromkeys([*a, *b])
            ch = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
            if ch:
                d.changed[pid] = ch
    kept_old = [pid for pid in old_ids if pid in new_ids]
    kept_new = [pid for pid in new_ids if pid in old_ids]
    d.reordered = kept_old != kept_new
    return d
