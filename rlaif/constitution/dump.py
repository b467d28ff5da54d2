"""Write a constitution back to readable YAML (block scalars for long text)."""

from __future__ import annotations

from typing import Any

import yaml

from rlaif.constitution.model import Constitution


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def to_yaml(data: Constitution | dict[str, Any], *, header: str = "") -> str:
    """Serialise a constitution (or its mapping) to YAML, with an optional comment header."""
    mapping = data.to_dict() if isinstance(data, Constitution) else data
    body = yaml.dump(
        mapping, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100, indent=2
    )
    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) if header else ""
    return comment + body
