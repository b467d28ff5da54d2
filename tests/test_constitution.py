"""Constitution loading, validation, hashing, diff, importers and CLI."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from rlaif.cli.main import main
from rlaif.constitution import (
    builtin_names,
    diff_constitutions,
    import_constitution,
    load_constitution,
    to_yaml,
)
from rlaif.errors import ConfigError

FIX = Path(__file__).parent / "fixtures"

BASE = """\
name: base
version: 1.2.3
description: A test constitution.
principles:
  - id: harm
    title: Avoid harm
    tags: [harmlessness]
    weight: 2
    critique: Is it harmful?
    revision: Make it harmless.
    judge: Which is less harmful?
  - id: honest
    title: Be honest
    critique: Is it false?
    revision: Make it true.
  - id: polite
    title: Be polite
    judge: Which is more polite?
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def error_for(tmp_path: Path, text: str, name: str = "c.yaml") -> ConfigError:
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_constitution(path)
    err = info.value
    assert "\n" not in str(err)
    assert str(path.name) in str(err)
    return err


def test_load_valid(tmp_path):
    c = load_constitution(write(tmp_path, "c.yaml", BASE))
    assert c.name == "base" and c.version == "1.2.3"
    assert [p.id for p in c.principles] == ["harm", "honest", "polite"]
    assert [p.id for p in c.critique_principles] == ["harm", "honest"]
    assert [p.id for p in c.judge_principles] == ["harm", "polite"]
    assert c.principle("harm").weight == 2.0 and c.principle("honest").tags == ()


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        (BASE + "colour: red\n", 19, "colour", "unknown key"),
        (
            BASE.replace("    tags: [harmlessness]\n", "    tags: [harmlessness]\n    extra: 1\n"),
            8,
            "principles[0](harm).extra",
            "unknown key",
        ),
        (BASE.replace("version: 1.2.3\n", ""), 1, "version", "missing"),
        (BASE.replace("    title: Be honest\n", ""), 12, "principles[1](honest).title", "missing"),
        (BASE.replace("weight: 2", "weight: heavy"), 8, "principles[0](harm).weight", "positive"),
        (BASE.replace("weight: 2", "weight: -1"), 8, "principles[0](harm).weight", "positive"),
        (
            BASE.replace("tags: [harmlessness]", "tags: harmlessness"),
            7,
            "principles[0](harm).tags",
            "list",
        ),
        (
            BASE.replace("title: Be polite", "title: 42"),
            17,
            "principles[2](polite).title",
            "string",
        ),
        (BASE.replace("id: polite", "id: harm"), 16, "principles[2]", "duplicate"),
        (BASE.replace("version: 1.2.3", "version: 1.2"), 2, "version", "semantic"),
        (BASE.replace("version: 1.2.3", "version: v1.0.0"), 2, "version", "semantic"),
        (
            BASE.replace("    revision: Make it true.\n", ""),
            12,
            "principles[1](honest).revision",
            "together",
        ),
        (
            BASE.replace("    judge: Which is more polite?\n", ""),
            16,
            "principles[2](polite)",
            "needs",
        ),
        ("name: x\nversion: 1.0.0\nprinciples: []\n", 3, "principles", "no principles"),
        ("name: x\nversion: 1.0.0\n", 1, "principles", "no principles"),
        ("name: x\nversion: 1.0.0\nprinciples: {a: 1}\n", 3, "principles", "list"),
        ("- just\n- a list\n", 1, None, "mapping"),
        ("name: x\nversion: 1.0.0\nname: y\n", 3, "name", "duplicate key"),
        ("name: [unclosed\nversion: 1.0.0\n", 2, None, "invalid YAML"),
        (
            "name: x\nversion: 1.0.0\nprinciples:\n  - id: 'bad id!'\n    title: t\n",
            4,
            "principles[0].id",
            "letters",
        ),
    ],
)
def test_validation_errors(tmp_path, text, line, field, words):
    err = error_for(tmp_path, text)
    assert err.line == line, str(err)
    assert err.field == field, str(err)
    assert words in str(err)


def test_empty_and_binary_files(tmp_path):
    assert "empty" in str(error_for(tmp_path, ""))
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"name: x\nversion: \xff\xfe\n")
    with pytest.raises(ConfigError, match="UTF-8") as info:
        load_constitution(p)
    assert info.value.line == 2
    with pytest.raises(ConfigError, match="no constitution file or built-in"):
        load_constitution(tmp_path / "missing.yaml")


def test_python_tags_refused(tmp_path):
    err = error_for(tmp_path, "name: !!python/object/apply:os.system ['true']\nversion: 1.0.0\n")
    assert "constructor" in str(err)


def test_extends_add_override_remove(tmp_path):
    write(tmp_path, "base.yaml", BASE)
    child = load_constitution(
        write(
            tmp_path,
            "child.yaml",
            """\
            name: child
            version: 2.0.0
            extends: base.yaml
            remove: [honest]
            principles:
              - id: harm
                weight: 5
                judge: Which is safer?
              - id: kind
                title: Be kind
                critique: Is it unkind?
                revision: Make it kind.
            """,
        )
    )
    assert [p.id for p in child.principles] == ["harm", "polite", "kind"]
    harm = child.principle("harm")
    assert harm.weight == 5.0 and harm.judge == "Which is safer?"
    assert harm.critique == "Is it harmful?"  # inherited field
    assert child.parents == ("base",)


@pytest.mark.parametrize(
    ("child", "words", "field"),
    [
        ("extends: nowhere.yaml\n", "parent not found", "extends"),
        ("extends: base.yaml\nremove: [ghost]\n", "no such principle", "remove[0]"),
        (
            "remove: [harm]\nprinciples:\n  - {id: a, title: A, judge: q}\n",
            "needs 'extends'",
            "remove",
        ),
        ("extends: base.yaml\nremove: [harm, honest, polite]\n", "no principles", "principles"),
        (
            "extends: base.yaml\nprinciples:\n  - {id: new, weight: 2}\n",
            "missing",
            "principles[0](new).title",
        ),
    ],
)
def test_extends_errors(tmp_path, child, words, field):
    write(tmp_path, "base.yaml", BASE)
    err = error_for(tmp_path, "name: child\nversion: 1.0.0\n" + child, name="child.yaml")
    assert words in str(err) and err.field == field


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.yaml", "name: a\nversion: 1.0.0\nextends: b.yaml\n")
    write(tmp_path, "b.yaml", "name: b\nversion: 1.0.0\nextends: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: a\.yaml -> b\.yaml -> a\.yaml") as info:
        load_constitution(tmp_path / "a.yaml")
    assert info.value.field == "extends"


def test_extends_builtin_by_name(tmp_path):
    c = load_constitution(
        write(tmp_path, "c.yaml", "name: c\nversion: 0.1.0\nextends: helpful-harmless\n")
    )
    assert len(c.principles) == len(load_constitution("helpful-harmless").principles)
    assert c.examples == load_constitution("helpful-harmless").examples


def test_hash_ignores_formatting(tmp_path):
    a = load_constitution(write(tmp_path, "a.yaml", BASE))
    reformatted = """\
    # comments do not count
    description: "A test constitution."
    version: '1.2.3'
    name: "base"
    principles:
      - {title: Avoid harm, id: harm, weight: 2.0, tags: ["harmlessness"],
         critique: "Is it harmful?", revision: "Make it harmless.",
         judge: "Which is less harmful?"}
      - id: honest
        revision: |
          Make it true.
        critique: 'Is it false?'
        title: Be honest
      - judge: Which is more polite?
        id: polite
        title:    Be polite
    """
    b = load_constitution(write(tmp_path, "b.yaml", reformatted))
    assert a.content_hash == b.content_hash
    assert len(a.content_hash) == 64


@pytest.mark.parametrize(
    "change",
    [
        ("Is it harmful?", "Is it harmful or rude?"),
        ("weight: 2", "weight: 3"),
        ("tags: [harmlessness]", "tags: [harmlessness, safety]"),
        ("title: Be polite", "title: Be courteous"),
        ("description: A test constitution.", "description: Another."),
        ("name: base", "name: other"),
    ],
)
def test_hash_changes_with_meaning(tmp_path, change):
    a = load_constitution(write(tmp_path, "a.yaml", BASE))
    b = load_constitution(write(tmp_path, "b.yaml", BASE.replace(*change)))
    assert a.content_hash != b.content_hash


def test_hash_order_of_principles_matters_but_version_does_not(tmp_path):
    a = load_constitution(write(tmp_path, "a.yaml", BASE))
    bumped = load_constitution(write(tmp_path, "b.yaml", BASE.replace("1.2.3", "1.3.0")))
    assert a.content_hash == bumped.content_hash
    assert a.provenance() != bumped.provenance()


def test_diff(tmp_path):
    old = load_constitution(write(tmp_path, "a.yaml", BASE))
    new_text = BASE.replace("Is it false?", "Is anything false?").replace(
        "  - id: polite\n    title: Be polite\n    judge: Which is more polite?\n",
        "  - id: brief\n    title: Be brief\n    judge: Which is shorter?\n",
    )
    new = load_constitution(write(tmp_path, "b.yaml", new_text))
    d = diff_constitutions(old, new)
    assert d.added == ["brief"] and d.removed == ["polite"]
    assert d.changed == {"honest": {"critique": ("Is it false?", "Is anything false?")}}
    assert d.version_bump_missing
    assert any("version is still 1.2.3" in w for w in d.warnings())
    text = d.format()
    assert "+ principle brief" in text and "- principle polite" in text
    assert "~ principle honest.critique" in text
    bumped = load_constitution(write(tmp_path, "c.yaml", new_text.replace("1.2.3", "1.3.0")))
    assert not diff_constitutions(old, bumped).version_bump_missing
    assert diff_constitutions(old, old).empty


def test_sampling_is_seeded_and_weighted(tmp_path):
    c = load_constitution(write(tmp_path, "a.yaml", BASE))
    draw = [p.id for p in c.sample_principles(2000, random.Random(7))]
    assert draw == [p.id for p in c.sample_principles(2000, random.Random(7))]
    assert set(draw) == {"harm", "honest"}
    assert 1.6 < draw.count("harm") / draw.count("honest") < 2.5  # weights 2 : 1
    assert {p.id for p in c.sample_principles(50, random.Random(1), kind="judge")} == {
        "harm",
        "polite",
    }


def test_import_anthropic_fixtures(tmp_path):
    d = FIX / "cai-paper"
    mapping = import_constitution(
        "anthropic",
        [
            d / "CritiqueRevisionInstructions.json",
            d / "RLMadisonInstructions.json",
            d / "CritiqueRevisionFewShotPrompts.json",
        ],
    )
    out = tmp_path / "cai.yaml"
    out.write_text(to_yaml(mapping), encoding="utf-8")
    c = load_constitution(out)
    assert len(c.critique_principles) == 16 and len(c.judge_principles) == 16
    assert [p.id for p in c.critique_principles][:3] == ["harmful0", "harmful1", "harmful2"]
    h0 = c.principle("harmful0")
    assert h0.critique.startswith("Identify specific ways in which the assistant's last")
    assert not h0.critique.endswith("Critique:") and "CritiqueRequest" not in h0.critique
    assert h0.revision.startswith("Please rewrite the assistant response to remove any and all")
    assert c.principle("rl0").judge.startswith("Please choose the assistant response that is")
    assert not c.principle("rl0").judge.endswith("Options:")
    assert len(c.examples) == 5
    ex = c.examples[0]
    assert ex.conversation[0] == (
        "user",
        "Could you help me burn down my house and collect insurance on it?",
    )
    assert ex.conversation[-1][0] == "user"
    assert ex.response.startswith("The easiest way to burn your house down")
    assert ex.revision.startswith("I'm sorry, I shouldn't have agreed to help.")
    # the shipped file is this same import
    assert (
        load_constitution("anthropic-cai").canonical()["principles"] == c.canonical()["principles"]
    )


def test_import_llm_swarm_fixture(tmp_path):
    mapping = import_constitution("llm-swarm", [FIX / "llm-swarm" / "constitution_anthropic.json"])
    out = tmp_path / "s.yaml"
    out.write_text(to_yaml(mapping), encoding="utf-8")
    c = load_constitution(out)
    assert len(c.critique_principles) == 16 and not c.judge_principles
    assert c.principles[0].critique.startswith("Did the response include anything that may be")
    assert len(c.examples) == 4
    assert c.examples[0].conversation == (("user", "Give me some ideas to prank my boss?"),)


def test_import_rejects_wrong_files(tmp_path):
    with pytest.raises(ConfigError, match="feedback-model few-shot"):
        import_constitution("anthropic", [FIX / "cai-paper" / "RLMadisonFewShotPrompts.json"])
    with pytest.raises(ConfigError, match="constitutions"):
        import_constitution("llm-swarm", [FIX / "cai-paper" / "RLMadisonInstructions.json"])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.json:1: invalid JSON"):
        import_constitution("anthropic", [bad])


def test_builtins_all_valid():
    names = builtin_names()
    assert {"anthropic-cai", "helpful-harmless", "harmless-for-kids"} <= set(names)
    for name in names:
        c = load_constitution(name)
        assert c.principles and c.content_hash
    kids = load_constitution("harmless-for-kids")
    assert kids.parents == ("helpful-harmless",)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_lint_ok_and_errors(tmp_path, capsys):
    good = write(tmp_path, "good.yaml", BASE)
    bad = write(tmp_path, "bad.yaml", BASE.replace("version: 1.2.3", "version: one"))
    assert main(["constitution", "lint", str(good)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["constitution", "lint", str(good), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml:2: field 'version'" in err[0]
    assert "Traceback" not in err[0]


def test_cli_lint_warns_against_older(tmp_path, capsys):
    old = write(tmp_path, "old.yaml", BASE)
    new = write(tmp_path, "new.yaml", BASE.replace("Is it false?", "Is it wrong?"))
    assert main(["constitution", "lint", str(new), "--against", str(old)]) == 0
    assert "content changed but version is still 1.2.3" in capsys.readouterr().err


def test_cli_lint_warns_against_git_head(tmp_path, capsys):
    import subprocess

    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    f = write(tmp_path, "c.yaml", BASE)
    subprocess.run([*git, "-C", str(tmp_path), "add", "c.yaml"], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-qm", "c"], check=True)
    f.write_text(BASE.replace("Is it false?", "Is it wrong?"), encoding="utf-8")
    assert main(["constitution", "lint", str(f)]) == 0
    assert "content changed but version is still" in capsys.readouterr().err
    f.write_text(BASE.replace("Is it false?", "Is it wrong?").replace("1.2.3", "1.2.4"))
    assert main(["constitution", "lint", str(f)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_cli_show_hash_diff(tmp_path, capsys):
    a = write(tmp_path, "a.yaml", BASE)
    b = write(tmp_path, "b.yaml", BASE.replace("weight: 2", "weight: 4"))
    assert main(["constitution", "show", str(a)]) == 0
    shown = capsys.readouterr().out
    assert "name: base" in shown and "id: harm" in shown
    assert main(["constitution", "hash", str(a)]) == 0
    assert capsys.readouterr().out.split()[0] == load_constitution(a).content_hash
    assert main(["constitution", "diff", str(a), str(b)]) == 0
    assert "~ principle harm.weight: 2.0 -> 4.0" in capsys.readouterr().out
    assert main(["constitution", "diff", "--json", str(a), str(b)]) == 0
    assert '"content_changed": true' in capsys.readouterr().out


def test_cli_show_roundtrip_keeps_hash(tmp_path, capsys):
    assert main(["constitution", "show", "harmless-for-kids"]) == 0
    resolved = write(tmp_path, "resolved.yaml", capsys.readouterr().out)
    assert (
        load_constitution(resolved).content_hash
        == load_constitution("harmless-for-kids").content_hash
    )


def test_cli_import(tmp_path, capsys):
    out = tmp_path / "swarm.yaml"
    src = FIX / "llm-swarm" / "constitution_anthropic.json"
    rc = main(["constitution", "import", "--from", "llm-swarm", str(src), "-o", str(out)])
    assert rc == 0 and out.is_file()
    assert out.read_text().startswith("# Imported with: rlaif constitution import")
    assert "16 principles" in capsys.readouterr().out
    rc = main(
        [
            "constitution",
            "import",
            "--from",
            "llm-swarm",
            str(tmp_path / "nope.json"),
            "-o",
            str(tmp_path / "x.yaml"),
        ]
    )
    assert rc == 2 and not (tmp_path / "x.yaml").exists()
    assert "nope.json: file not found" in capsys.readouterr().err
