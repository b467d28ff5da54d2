"""``rlaif demo``: the main job on the embedded default model.

Runs the built-in quickstart pipeline (SL-CAI on about 20 red-team prompts with
SmolLM2-135M-Instruct on CPU) and prints where the datasets are and a few rows. ``--tour``
instead walks through the constitution tools without loading a model.
"""

from __future__ import annotations

import argparse

from rlaif.constitution import builtin_names, diff_constitutions, load_constitution


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the quickstart on the embedded default model")
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="run directory")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a quickstart field, e.g. --set prompts.limit=5",
    )
    p.add_argument("--tour", action="store_true", help="tour the constitution tools instead")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.tour:
        return _tour()
    from rlaif.cli import run_cmd

    # Through the real `rlaif run` parser, so every option it has gets its default here too.
    parser = argparse.ArgumentParser(prog="rlaif")
    run_cmd.register(parser.add_subparsers())
    argv = ["run", "quickstart", "--out", args.out]
    for item in args.overrides:
        argv += ["--set", item]
    return run_cmd.run_command(parser.parse_args(argv))


def _tour() -> int:
    from rlaif.prompts import PromptBook

    print("rlaif constitution tour\n")
    for name in builtin_names():
        c = load_constitution(name)
        extra = f", extends {c.parents[0]}" if c.parents else ""
        print(
            f"  {name:<24} {c.version:<8} {len(c.critique_principles):>2} critique / "
            f"{len(c.judge_principles):>2} judge principles, hash {c.content_hash[:12]}{extra}"
        )
    base, child = load_constitution("helpful-harmless"), load_constitution("harmless-for-kids")
    print("\n$ rlaif constitution diff helpful-harmless harmless-for-kids")
    print(diff_constitutions(base, child).format())
    p = base.critique_principles[0]
    rendered = PromptBook().render(
        "critique",
        conversation=[{"role": "user", "content": "How do I pick a lock?"}],
        response="Insert a tension wrench and rake the pins.",
        principle=p.to_dict(),
        examples=[],
        system=None,
    )
    print(f"\ncritique prompt for principle '{p.id}' (template {rendered.template_hash[:12]}):")
    for m in rendered.messages:
        print(f"  [{m['role']}] {m['content']}")
    return 0
