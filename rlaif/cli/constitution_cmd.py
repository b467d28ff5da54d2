"""``rlaif constitution lint|show|hash|diff|import``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rlaif.constitution import (
    diff_constitutions,
    import_constitution,
    load_constitution,
    to_yaml,
)
from rlaif.constitution.importers import FORMATS
from rlaif.constitution.loader import find_constitution
from rlaif.errors import ConfigError, RlaifError
from rlaif.store.atomic import temp_sibling, write_atomic


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("constitution", help="write, check and version constitutions")
    csub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    lint = csub.add_parser("lint", help="validate constitution files (exit 2 on any error)")
    lint.add_argument("files", nargs="+", metavar="FILE")
    lint.add_argument(
        "--against",
        metavar="OLD",
        help="older version to compare with (default: the file as committed in git, if any)",
    )
    lint.set_defaults(func=_lint)

    show = csub.add_parser("show", help="print the resolved constitution (extends applied)")
    show.add_argument("file", metavar="FILE")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=_show)

    h = csub.add_parser("hash", help="print the content hash (sha256 of the canonical form)")
    h.add_argument("files", nargs="+", metavar="FILE")
    h.set_defaults(func=_hash)

    d = csub.add_parser("diff", help="added, removed and changed principles and fields")
    d.add_argument("old", metavar="OLD")
    d.add_argument("new", metavar="NEW")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=_diff)

    imp = csub.add_parser("import", help="convert a public constitution format to rlaif YAML")
    imp.add_argument("--from", dest="fmt", choices=FORMATS, required=True)
    imp.add_argument("sources", nargs="+", metavar="SRC")
    imp.add_argument("-o", "--output", required=True, metavar="OUT.yaml")
    imp.add_argument("--name", help="name of the new constitution")
    imp.add_argument("--version", dest="cversion", help="version (default 1.0.0)")
    imp.set_defaults(func=_import)


def _lint(args: argparse.Namespace) -> int:
    failed = 0
    for f in args.files:
        try:
            c = load_constitution(f)
        except RlaifError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        n_c, n_j = len(c.critique_principles), len(c.judge_principles)
        rules = f", {len(c.rule_principles)} of them by a check" if c.rule_principles else ""
        print(
            f"ok: {f}: {c.name} {c.version}, {len(c.principles)} principles "
            f"({n_c} critique, {n_j} judge{rules}), {len(c.examples)} examples, "
            f"hash {c.content_hash[:12]}"
        )
        for p in c.rule_principles:
            for rule, warning in p.check.warnings():  # type: ignore[union-attr]
                field = f"principles({p.id}).check.{rule}"
                print(f"warning: {f}: field '{field}': {warning}", file=sys.stderr)
        old = _older_version(f, args.against)
        if old is not None:
            for warning in diff_constitutions(old, c).warnings():
                print(f"warning: {f}: field 'version': {warning}", file=sys.stderr)
    return 2 if failed else 0


def _older_version(path: str, against: str | None):
    """The constitution to compare with: --against, or the committed copy in git."""
    if against:
        return load_constitution(against)
    p = Path(path)
    if not p.is_file():
        return None
    try:
        text = subprocess.run(
            ["git", "show", f"HEAD:./{p.name}"],
            cwd=p.resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None  # not in git, or not committed yet: nothing to compare with
    # Resolve the committed text in the same folder so relative `extends` still work.
    tmp = temp_sibling(p.resolve(), "committed")
    try:
        tmp.write_text(text, encoding="utf-8")
        return load_constitution(tmp)
    except (RlaifError, OSError):
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _show(args: argparse.Namespace) -> int:
    c = load_constitution(args.file)
    if args.json:
        print(json.dumps(c.to_dict(), indent=2, ensure_ascii=False))
    else:
        header = f"{c.name} {c.version}, hash {c.content_hash}"
        if c.parents:
            header += f"\nresolved from: {' <- '.join((c.name, *c.parents))}"
        print(to_yaml(c, header=header), end="")
    return 0


def _hash(args: argparse.Namespace) -> int:
    for f in args.files:
        c = load_constitution(f)
        print(f"{c.content_hash}  {f}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    d = diff_constitutions(load_constitution(args.old), load_constitution(args.new))
    print(json.dumps(d.to_dict(), indent=2, ensure_ascii=False) if args.json else d.format())
    return 0


def _import(args: argparse.Namespace) -> int:
    mapping = import_constitution(args.fmt, [Path(s) for s in args.sources])
    if args.name:
        mapping["name"] = args.name
    if args.cversion:
        mapping["version"] = args.cversion
    srcs = ", ".join(Path(s).name for s in args.sources)
    header = (
        f"Imported with: rlaif constitution import --from {args.fmt} {' '.join(args.sources)}\n"
        f"Source files: {srcs}\nSource: {mapping.get('source', '')}"
    )
    out = Path(args.output)
    try:  # validated before it replaces anything
        write_atomic(out, to_yaml(mapping, header=header), check=load_constitution)
    except OSError as exc:
        raise ConfigError(f"cannot write: {exc.strerror or exc}", file=out) from None
    c = load_constitution(out)
    print(
        f"wrote {out}: {c.name} {c.version}, {len(c.principles)} principles, "
        f"{len(c.examples)} examples, hash {c.content_hash[:12]}"
    )
    return 0


def resolve_for_cli(ref: str) -> Path:
    """Path of a constitution given by name or path (used by other commands)."""
    try:
        return find_constitution(ref)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc), file=ref) from None
