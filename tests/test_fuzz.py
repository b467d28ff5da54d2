"""Property-based fuzzing of every loader that reads a user's files.

Loaders: the constitution loader (with ``extends``), the constitution importers, the pipeline
loader (with ``--set``) and the prompt-source readers (JSONL, CSV, Parquet). Each gets at least
1,000 generated inputs: random bytes and text, and structured mutations of a valid file (wrong
types, unknown keys, missing fields, deep nesting, huge values, non-UTF-8 bytes, duplicate ids,
bad semver, ``extends`` cycles, YAML tags, anchors and alias bombs).

The property: the loader either succeeds with something the rest of rlaif can use (a config
whose values are plain JSON, prompts that can be written to the record store), or raises an
:class:`rlaif.errors.RlaifError` whose message is one line naming the file, and the line or the
field wherever the problem has a place. No other exception ever escapes.

Cases run per loader are counted in ``COUNTS``; set ``RLAIF_FUZZ_REPORT=path.json`` to write
them (docs/reliability.md quotes them). The examples are derandomized so CI sees the same
inputs every run; ``RLAIF_FUZZ_RANDOM=1`` explores new ones.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlaif.constitution import import_constitution, load_constitution, to_yaml
from rlaif.errors import RlaifError
from rlaif.pipeline import load_pipeline, read_prompts
from rlaif.store import canonical_json
from rlaif.store.jsonl import encode_line

EXAMPLES = 1000
COUNTS: Counter[str] = Counter()
OUTCOMES: Counter[str] = Counter()  # loader:ok / loader:error, to show both paths are hit

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("RLAIF_FUZZ_RANDOM"),
    suppress_health_check=list(HealthCheck),
)

# Messages about a whole file: no line or field applies to them.
FILE_LEVEL = (
    "file is empty",
    "file is not valid UTF-8",
    "invalid YAML",
    "cannot read",
    "invalid CSV",
    "no prompts found",
    "not a CAI paper prompt file",
    "no principles found",
    "invalid JSON",
    "nesting too deep",
    "not valid Unicode",
)


class Timed:
    """Fails the example when a loader takes longer than ``limit`` seconds on one input
    (hypothesis' own deadline is off: timings on a busy CI machine vary too much for it)."""

    def __init__(self, limit: float = 10.0) -> None:
        self.limit = limit

    def __enter__(self) -> Timed:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        took = time.perf_counter() - self.t0
        assert took < self.limit, f"a loader took {took:.1f} s on one input"


def check_error(exc: BaseException, files: list[Path], key: str) -> None:
    """The error contract: RlaifError, one line, names the file (and line/field if any)."""
    OUTCOMES[f"{key}:error"] += 1
    if not isinstance(exc, RlaifError):
        raise AssertionError(f"{type(exc).__name__} escaped: {exc!r}"[:500]) from exc
    text = str(exc)
    assert len(text.splitlines()) == 1, text
    names = [f.name for f in files] + ["--set"]
    assert exc.file is not None and any(n in text for n in names), f"no file named: {text}"
    if exc.file != "--set" and not any(m in exc.message for m in FILE_LEVEL):
        assert exc.line is not None or exc.field is not None, f"no line or field: {text}"


# -- value strategies ---------------------------------------------------------------------------

DEEP = "__FUZZ_DEEP__"
RAW = "__FUZZ_RAW__"

# Seven levels of ten: 10**7 strings once expanded.
ALIAS_BOMB = (
    "[&l1 [x, x, x, x, x, x, x, x, x, x], &l2 [*l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1, *l1],"
    " &l3 [*l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2, *l2],"
    " &l4 [*l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3, *l3],"
    " &l5 [*l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4, *l4],"
    " &l6 [*l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5, *l5],"
    " &l7 [*l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6, *l6]]"
)
# YAML snippets no dumper writes: tags that build Python objects, alias bombs, recursive nodes.
YAML_RAW = [
    '!!python/object/apply:os.system ["echo fuzz"]',
    "!!python/name:os.system",
    "!!python/object/new:dict {}",
    "!!binary aGVsbG8=",
    "!!set {a, b}",
    "!!omap [a: 1, b: 2]",
    "!!timestamp 2001-12-14t21:59:43.10-05:00",
    "2024-01-01",
    ".nan",
    "-.inf",
    "0x1F",
    "0o17",
    "1_000",
    "~",
    '"\\ud800 lone surrogate"',
    '"\\x00 nul"',
    "&a [1, *a]",
    ALIAS_BOMB,
    "{<<: {a: 1}, b: 2}",
    "*undefined_alias",
    "1" * 5000,
    "'" + "x" * 200_000 + "'",
    "{a: 1, a: 2}",
    "[1, 2",
    "|\n  block",
]

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(["", " ", "\t", "1.0", "1.2.3", "yes", "null", "x" * 5000]),
)
values = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    ),
    max_leaves=12,
)
special = st.one_of(
    # 400 levels already pass the YAML parser's recursion limit; deeper only costs time.
    st.sampled_from([40, 150, 400]).map(lambda n: (DEEP, n)),
    st.sampled_from(YAML_RAW).map(lambda s: (RAW, s)),
)
SEMVERS = st.one_of(
    st.text(alphabet="0123456789.-+abcxyzA ", max_size=14),
    st.sampled_from(["1", "1.0", "01.2.3", "1.2.3-", "1.2.3+", "v1.2.3", "1.2.3.4", "1.2.3-rc.01"]),
    st.integers(),
    st.floats(),
)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a nested dict/list, the root included."""
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _get(obj: Any, path: tuple) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def mutate(
    data: Any, base: dict, extra: list[Any] | None = None, special_first: bool = False
) -> tuple[Any, list[str]]:
    """Apply 1-3 random structural mutations to a copy of ``base``; return it and raw snippets.

    Raw snippets (YAML no dumper writes, or nesting too deep for a dumper) are left as
    sentinels in the tree and spliced into the text by :func:`dump`.
    """
    doc = copy.deepcopy(base)
    raws: list[str] = []
    for n in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        op = data.draw(
            st.sampled_from(["set", "special", "delete", "unknown", "dup", "semver", "extra"])
        )
        if special_first and n == 0:
            op = "special"
        parent_path, last = path[:-1], path[-1] if path else None
        if op == "set" or (op == "extra" and not extra):
            value: Any = data.draw(values)
        elif op == "special":
            kind, arg = data.draw(special)
            value = f"{DEEP}{len(raws)}" if kind == DEEP else f"{RAW}{len(raws)}"
            raws.append("[" * arg + "]" * arg if kind == DEEP else arg)
        elif op == "semver":
            if isinstance(doc, dict):
                doc["version"] = data.draw(SEMVERS)
            continue
        elif op == "extra":
            value = data.draw(st.sampled_from(extra))
        else:
            value = None
        if not path:
            if op in ("set", "special", "extra"):
                doc = value
            continue
        parent = _get(doc, parent_path)
        if op == "delete":
            del parent[last]
        elif op == "unknown" and isinstance(_get(doc, path), dict):
            _get(doc, path)[data.draw(st.text(min_size=1, max_size=10))] = data.draw(values)
        elif op == "dup" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif op in ("set", "special", "extra") and (
            isinstance(parent, dict) or (isinstance(parent, list) and last < len(parent))
        ):
            parent[last] = value
    return doc, raws


def dump(data: Any, doc: Any, raws: list[str]) -> bytes:
    """YAML (or JSON, which is YAML too) text of ``doc`` with raw snippets spliced in."""
    if data.draw(st.booleans()):
        text = yaml.safe_dump(doc, allow_unicode=data.draw(st.booleans()), sort_keys=False)
    else:
        text = json.dumps(doc, ensure_ascii=data.draw(st.booleans()), allow_nan=True)
    # Highest index first, so __FUZZ_RAW__1 is not replaced inside __FUZZ_RAW__12.
    for i in reversed(range(len(raws))):
        for tag in (DEEP, RAW):
            text = text.replace(f"'{tag}{i}'", raws[i]).replace(f'"{tag}{i}"', raws[i])
            text = text.replace(f"{tag}{i}", raws[i])
    return text.encode("utf-8", "surrogatepass")


def corrupt(data: Any, blob: bytes) -> bytes:
    """Insert, delete or replace a few bytes (YAML punctuation, invalid UTF-8, NUL, BOM)."""
    alphabet = [b":", b"-", b"[", b"]", b"{", b"}", b"&", b"*", b"!", b"|", b">", b"#", b"'"]
    alphabet += [
        b'"',
        b"\n",
        b"\t",
        b" ",
        b"%",
        b"@",
        b",",
        b"\xff",
        b"\xc3",
        b"\x00",
        b"\xef\xbb\xbf",
    ]
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        piece = data.draw(st.sampled_from(alphabet))
        if op == "insert":
            blob = blob[:pos] + piece + blob[pos:]
        elif op == "delete":
            blob = blob[:pos] + blob[pos + data.draw(st.integers(1, 20)) :]
        elif op == "replace":
            blob = blob[:pos] + piece + blob[pos + 1 :]
        else:
            blob = blob[:pos]
    return blob


def document(data: Any, base: dict, extra: list[Any] | None = None) -> bytes:
    """One generated file: random bytes/text, or a mutated (and maybe corrupted) valid one."""
    kind = data.draw(
        st.sampled_from(
            ["bytes", "text", "mutate", "mutate", "special", "mutate+corrupt", "corrupt"]
        )
    )
    if kind == "bytes":
        return data.draw(st.binary(max_size=1000))
    if kind == "text":
        return data.draw(st.text(max_size=1000)).encode("utf-8", "surrogatepass")
    if kind == "corrupt":
        return corrupt(data, dump(data, base, []))
    doc, raws = mutate(data, base, extra, special_first=kind == "special")
    blob = dump(data, doc, raws)
    return corrupt(data, blob) if kind == "mutate+corrupt" else blob


# -- constitutions ------------------------------------------------------------------------------

CONSTITUTION = {
    "name": "base",
    "version": "1.2.3",
    "description": "A test constitution.",
    "source": "tests",
    "principles": [
        {
            "id": "harm",
            "title": "Avoid harm",
            "tags": ["harmlessness"],
            "weight": 2,
            "critique": "Is it harmful?",
            "revision": "Make it harmless.",
            "judge": "Which is less harmful?",
        },
        {"id": "honest", "title": "Be honest", "critique": "False?", "revision": "Make it true."},
        {"id": "polite", "title": "Be polite", "judge": "Which is more polite?"},
    ],
    "examples": [
        {
            "conversation": [{"role": "user", "content": "Hi?"}],
            "response": "Go away.",
            "critique_request": "Is it rude?",
            "critique": "Yes.",
            "revision_request": "Be kind.",
            "revision": "Hello! How can I help?",
        }
    ],
}
CHILD = {
    "name": "child",
    "version": "2.0.0",
    "extends": "parent.yaml",
    "remove": ["polite"],
    "principles": [{"id": "harm", "weight": 3}, {"id": "new", "title": "New", "judge": "Which?"}],
}


def test_fuzz_constitution_loader(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fuzz-constitution")
    extends_values = ["parent.yaml", "c.yaml", "missing.yaml", "helpful-harmless", "", "/", "."]

    @FUZZ
    @given(st.data())
    def prop(data: Any) -> None:
        COUNTS["constitution"] += 1
        for old in folder.iterdir():
            old.unlink()
        mode = data.draw(st.sampled_from(["single", "child", "cycle"]))
        main = folder / "c.yaml"
        files = [main]
        if mode == "single":
            main.write_bytes(document(data, CONSTITUTION))
        else:
            # The child (mutated or not) extends a parent that is valid, fuzzed, or a cycle.
            parent = folder / "parent.yaml"
            files.append(parent)
            child_doc = document(data, CHILD, extends_values)
            main.write_bytes(child_doc)
            if mode == "cycle":
                parent.write_bytes(b"name: p\nversion: 1.0.0\nextends: c.yaml\n")
            elif data.draw(st.booleans()):
                parent.write_bytes(dump(data, CONSTITUTION, []))
            else:
                parent.write_bytes(document(data, CONSTITUTION))
        try:
            with Timed():
                c = load_constitution(main)
        except Exception as exc:
            check_error(exc, files, "constitution")
            return
        OUTCOMES["constitution:ok"] += 1
        # What loads must hash, serialise and render as plain JSON/UTF-8.
        assert len(c.content_hash) == 64
        encode_line(c.to_dict())

    prop()
    assert COUNTS["constitution"] >= EXAMPLES


# -- constitution importers ---------------------------------------------------------------------

CAI_CRITIQUES = {
    "harmful0": {
        "prompt": ["CritiqueRequest: Is it harmful?\nCritique:"],
        "edit_request": "RevisionRequest: Make it harmless.\nRevision:",
    },
    "harmful1": {"prompt": ["Is it rude?"], "edit_request": "Be kind."},
}
CAI_RL = ["Please choose the less harmful response. Options:", "Which is kinder?"]
CAI_FEWSHOT = [
    "\n\nHuman: hi\n\nAssistant: go away\n\nCritiqueRequest: rude?\n\nCritique: yes"
    "\n\nRevisionRequest: be kind\n\nRevision: hello"
]
SWARM = {
    "constitutions": [{"critic": "Is it harmful?", "revision": "Make it harmless."}],
    "system_chat": [
        [
            {"role": r, "content": c}
            for r, c in zip(
                ["user", "assistant"] * 3, ["q", "a", "cr", "c", "rr", "r"], strict=True
            )
        ]
    ],
}


def test_fuzz_constitution_importers(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fuzz-import")
    bases = {"anthropic": [CAI_CRITIQUES, CAI_RL, CAI_FEWSHOT], "llm-swarm": [SWARM]}

    @FUZZ
    @given(st.data())
    def prop(data: Any) -> None:
        COUNTS["importers"] += 1
        fmt = data.draw(st.sampled_from(sorted(bases)))
        files = []
        for i, base in enumerate(bases[fmt]):
            f = folder / f"src{i}.json"
            if data.draw(st.booleans()):
                doc, _ = mutate(data, {"root": base})
                doc = doc.get("root", doc) if isinstance(doc, dict) else doc
                blob = json.dumps(doc, allow_nan=True).encode()
                if data.draw(st.booleans()):
                    blob = corrupt(data, blob)
            else:
                blob = json.dumps(base).encode()
            f.write_bytes(blob)
            files.append(f)
        out = folder / "out.yaml"
        try:
            with Timed():
                mapping = import_constitution(fmt, files)
            out.write_text(to_yaml(mapping), encoding="utf-8")
            c = load_constitution(out)
        except Exception as exc:
            check_error(exc, [*files, out], "importers")
            return
        OUTCOMES["importers:ok"] += 1
        encode_line(c.to_dict())

    prop()
    assert COUNTS["importers"] >= EXAMPLES


# -- pipelines ----------------------------------------------------------------------------------

PIPELINE = {
    "name": "fuzz",
    "seed": 1,
    "output": "runs/fuzz",
    "batch_size": 4,
    "constitution": "helpful-harmless",
    "system": "Be brief.",
    "model": {"id": "fake-model", "backend": "fake", "options": {"max_context": 4096}},
    "prompts": {"path": "prompts.jsonl", "field": "prompt", "limit": 10, "offset": 0},
    "stages": {
        "critique_revise": {
            "rounds": 1,
            "few_shot": 0,
            "respond": {"max_new_tokens": 16, "temperature": 0.0},
            "critique": {"max_new_tokens": 16, "stop": ["\n\n"]},
            "revise": {"max_new_tokens": 16, "top_p": 0.9},
        },
        "sample": {"n": 3, "temperature": 0.8},
        "judge": {
            "mode": "logprob",
            "principles_k": 2,
            "pairs": "all",
            "band": [0.4, 0.6],
            "model": {"id": "judge-model", "backend": "fake"},
        },
        "export": {
            "formats": ["jsonl", "parquet"],
            "preferences": {"min_confidence": 0.5, "test_size": 0.25},
        },
    },
}
SET_KEYS = sorted(
    ".".join(map(str, p)) for p in _paths(PIPELINE) if p and all(isinstance(x, str) for x in p)
)


def test_fuzz_pipeline_loader(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("fuzz-pipeline")
    path = folder / "pipe.yaml"
    override = st.one_of(
        st.tuples(
            st.one_of(st.sampled_from(SET_KEYS), st.text(max_size=20)),
            st.one_of(st.text(max_size=30), st.sampled_from(YAML_RAW)),
        ).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=30),
    )

    @FUZZ
    @given(st.data())
    def prop(data: Any) -> None:
        COUNTS["pipeline"] += 1
        path.write_bytes(document(data, PIPELINE))
        overrides = data.draw(st.lists(override, max_size=3))
        if data.draw(st.integers(0, 19)) == 0:  # an alias bomb in a free-form section
            section = data.draw(st.sampled_from(["model.options", "stages.export.preferences"]))
            overrides.append(f"{section}={{x: {ALIAS_BOMB}}}")
        try:
            with Timed():
                cfg = load_pipeline(path, overrides)
        except Exception as exc:
            check_error(exc, [path], "pipeline")
            return
        OUTCOMES["pipeline:ok"] += 1
        # A loaded config goes into the manifest and into record ids: it must be plain JSON.
        canonical_json(cfg.to_dict())
        json.dumps(cfg.to_dict(), allow_nan=False)

    prop()
    assert COUNTS["pipeline"] >= EXAMPLES


# -- prompt sources -----------------------------------------------------------------------------

messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", 1, None])},
        optional={"content": st.one_of(st.text(max_size=20), st.integers(), st.none())},
    ),
    max_size=4,
)
prompt_cell = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "",
            "   ",
            "\n\nHuman: hi\n\nAssistant: yo",
            "\n\nAssistant: only me",
            "Human: hi\n\nAssistant: ok\n\nHuman: why?",
            "\ud800 lone surrogate",
            "nul \x00 byte",
            "{{ ''.__class__.__mro__ }}",
        ]
    ),
    messages,
    leaf,
    values,
)
id_cell = st.one_of(st.text(max_size=4), st.integers(0, 3), st.none(), st.just(""), st.floats())
row = st.dictionaries(
    st.sampled_from(["prompt", "id", "text", "x"]), st.one_of(prompt_cell, id_cell), max_size=4
)
read_options = st.fixed_dictionaries(
    {
        "field": st.sampled_from(["prompt", "prompt", "prompt", "text", "missing"]),
        "id_field": st.sampled_from([None, None, "id", "missing"]),
        "offset": st.integers(0, 3),
        "limit": st.one_of(st.none(), st.integers(1, 5)),
    }
)


def _check_prompts(path: Path, opts: dict[str, Any], key: str) -> None:
    try:
        with Timed():
            items, skipped = read_prompts(path, **opts)
    except Exception as exc:
        check_error(exc, [path], key)
        return
    OUTCOMES[f"{key}:ok"] += 1
    assert items, "read_prompts returned no prompts without an error"
    assert len({i.id for i in items}) == len(items)
    for item in items:
        assert item.conversation[-1][0] == "user" and item.conversation[-1][1].strip()
        # Prompts end up in records: they must be writable by the store.
        encode_line({"prompt": item.messages(), "id": item.id})
    for s in skipped:
        assert s["reason"]


def test_fuzz_jsonl_reader(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz-jsonl") / "prompts.jsonl"

    @FUZZ
    @given(st.data())
    def prop(data: Any) -> None:
        COUNTS["jsonl"] += 1
        kind = data.draw(st.sampled_from(["bytes", "rows", "rows", "rows+corrupt", "lines"]))
        if kind == "bytes":
            blob = data.draw(st.binary(max_size=600))
        elif kind == "lines":
            blob = "\n".join(data.draw(st.lists(st.text(max_size=60), max_size=6))).encode(
                "utf-8", "surrogatepass"
            )
        else:
            rows = data.draw(st.lists(st.one_of(row, values), min_size=0, max_size=6))
            lines = [
                json.dumps(r, allow_nan=True, ensure_ascii=data.draw(st.booleans())) for r in rows
            ]
            if data.draw(st.booleans()):
                lines.append(data.draw(st.sampled_from(["[" * 5000 + "]" * 5000, "1" * 5000])))
            blob = "\n".join(lines).encode("utf-8", "surrogatepass")
            if kind == "rows+corrupt":
                blob = corrupt(data, blob)
        path.write_bytes(blob)
        _check_prompts(path, data.draw(read_options), "jsonl")

    prop()
    assert COUNTS["jsonl"] >= EXAMPLES


def test_fuzz_csv_reader(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz-csv") / "prompts.csv"
    cell = st.one_of(st.text(max_size=40), st.sampled_from(["", '"', '""', "a,b", "x" * 140_000]))

    @FUZZ
    @given(st.data())
    def prop(data: Any) -> None:
        COUNTS["csv"] += 1
        kind = data.draw(st.sampled_from(["bytes", "text", "table", "table", "table+corrupt"]))
        if kind == "bytes":
            blob = data.draw(st.binary(max_size=600))
        elif kind == "text":
            blob = data.draw(st.text(max_size=600)).encode("utf-8")
        else:
            header = data.draw(
                st.lists(st.sampled_from(["prompt", "id", "text", "", "prompt"]), max_size=4)
            )
            rows = data.draw(st.lists(st.lists(cell, max_size=5), max_size=6))
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(header)
            writer.writerows(rows)
            blob = buf.getvalue().encode("utf-8")
            if kind == "table+corrupt":
                blob = corrupt(data, blob)
        path.write_bytes(blob)
        _check_prompts(path, data.draw(read_options), "csv")

    prop()
    assert COUNTS["csv"] >= EXAMPLES


def _arrow_column(data: Any, n: int):  # -> pyarrow.Array
    import pyarrow as pa

    kind = data.draw(
        st.sampled_from(
            [
                *("string", "large_string", "dict_string", "int", "float", "bool", "binary"),
                *("messages", "struct", "list_int", "null", "timestamp"),
            ]
        )
    )
    maybe_null = data.draw(st.booleans())

    def cells(strategy: Any) -> list[Any]:
        out = data.draw(st.lists(strategy, min_size=n, max_size=n))
        return [None if maybe_null and data.draw(st.booleans()) else v for v in out]

    if kind in ("string", "large_string", "dict_string"):
        arr = pa.array(cells(st.text(max_size=30)), type=pa.string())
        if kind == "large_string":
            arr = arr.cast(pa.large_string())
        elif kind == "dict_string":
            arr = arr.dictionary_encode()
        return arr
    if kind == "int":
        return pa.array(cells(st.integers(-(2**63), 2**63 - 1)), type=pa.int64())
    if kind == "float":
        return pa.array(cells(st.floats()), type=pa.float64())
    if kind == "bool":
        return pa.array(cells(st.booleans()), type=pa.bool_())
    if kind == "binary":
        return pa.array(cells(st.binary(max_size=20)), type=pa.binary())
    if kind == "timestamp":
        return pa.array(cells(st.integers(0, 2**40)), type=pa.timestamp("ms"))
    if kind == "list_int":
        return pa.array(cells(st.lists(st.integers(0, 9), max_size=3)), type=pa.list_(pa.int64()))
    if kind == "null":
        return pa.nulls(n)
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    role = st.one_of(st.sampled_from(["user", "assistant", "system", "bot"]), st.none())
    msg = st.fixed_dictionaries(
        {"role": role, "content": st.one_of(st.text(max_size=20), st.none())}
    )
    if kind == "struct":
        return pa.array(cells(msg), type=turn)
    return pa.array(cells(st.lists(msg, max_size=3)), type=pa.list_(turn))


def test_fuzz_parquet_reader(tmp_path_factory: pytest.TempPathFactory) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("fuzz-parquet") / "prompts.parquet"
    good = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["hello?", "why?"], "id": ["a", "b"]}), good)
    valid = good.getvalue()

    @FUZZ
    @given(st.data())
    def prop(data: Any) -> None:
        COUNTS["parquet"] += 1
        kind = data.draw(st.sampled_from(["bytes", "table", "table", "table", "corrupt"]))
        if kind == "bytes":
            path.write_bytes(data.draw(st.binary(max_size=600)))
        elif kind == "corrupt":
            path.write_bytes(corrupt(data, valid))
        else:
            n = data.draw(st.integers(0, 5))
            names = data.draw(
                st.lists(st.sampled_from(["prompt", "id", "text", "x"]), max_size=3, unique=True)
            )
            table = pa.table({name: _arrow_column(data, n) for name in names}) if names else None
            if table is None:
                table = pa.table({"x": pa.nulls(n)}).drop(["x"])
            pq.write_table(table, path)
        _check_prompts(path, data.draw(read_options), "parquet")

    prop()
    assert COUNTS["parquet"] >= EXAMPLES


# -- report -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    target = os.environ.get("RLAIF_FUZZ_REPORT")
    if target and COUNTS:
        report = {
            "cases": dict(sorted(COUNTS.items())),
            "outcomes": dict(sorted(OUTCOMES.items())),
            "total": sum(COUNTS.values()),
        }
        Path(target).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def test_mutations_reach_the_line_and_field_checks(tmp_path: Path) -> None:
    """A sanity check of the harness itself: a known mutation gives a located error."""
    bad = copy.deepcopy(PIPELINE)
    bad["stages"]["sample"]["n"] = "three"
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False), encoding="utf-8")
    with pytest.raises(RlaifError) as info:
        load_pipeline(path)
    assert info.value.field == "stages.sample.n" and info.value.line is not None
    assert re.search(r"pipe\.yaml:\d+: field 'stages\.sample\.n': must be int", str(info.value))
