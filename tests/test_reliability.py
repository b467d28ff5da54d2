"""Reliability of a whole run: disk errors, failure isolation, dead backends, kill and resume.

Each test runs the RL-CAI pipeline of ``bench/kill_resume.py`` (critique_revise + sample +
judge + preference export) on the fake backend, breaks something part-way, and checks that:
the run stops with one clear line (or isolates the bad request as an error record), every
record written before stays readable, and a resumed run finishes with outputs identical to an
uninterrupted one (no record lost, duplicated or changed; every exported file byte-identical).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from rlaif.backends import FakeBackend, load_backend
from rlaif.cli.main import main
from rlaif.errors import ModelError, StoreError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.store import StageStore
from rlaif.store import jsonl as jsonl_mod

ROOT = Path(__file__).resolve().parents[1]


def _load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "bench" / "kill_resume.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KR = _load_bench()
QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The pipeline file and an uninterrupted run of it (fake backend, 12 prompts)."""
    work = tmp_path_factory.mktemp("reliability")
    pipe = KR.setup(work, "fake", prompts=12, tokens=16)
    run_pipeline(load_pipeline(pipe), out=work / "ref", stream=QUIET)
    return pipe, work / "ref"


def like_config(backend: FakeBackend) -> FakeBackend:
    """A fake backend passed in makes the same record ids as ``backend: fake`` in the config
    (which resolves no revision), so its runs compare with the reference."""
    backend.model_revision = None
    return backend


def assert_same_as_reference(ref: Path, run: Path) -> None:
    diff = KR.compare(ref, run)
    assert diff["records_lost"] == 0 and diff["records_duplicated"] == 0, diff
    assert diff["records_changed"] == 0 and diff["records_extra"] == 0, diff
    assert diff["files_differ"] == 0 and diff["export_files"] > 20, diff
    assert diff["cache_duplicated"] == 0 and diff["manifest_equal"], diff


def assert_records_readable(run: Path) -> int:
    """Every committed line parses, and each stage opens for writing (no corruption)."""
    n = 0
    for folder in sorted((run / "stages").iterdir()):
        with StageStore(run, folder.name) as store:
            n += sum(1 for _ in store.iter_records(all_versions=True))
    return n


def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def disk_full_after(n: int, where: str) -> Any:
    """An ``os.write`` that fails with ENOSPC on the ``n``-th batch written under ``where``."""
    seen = {"writes": 0}

    def write(fd: int, data: Any) -> int:
        path = _fd_path(fd)
        # the wave ledger (run/waves/stages/ledger) counts as "waves", not as "stages"
        if f"/{where}/" in path and (where == "waves" or "/waves/" not in path):
            seen["writes"] += 1
            if seen["writes"] >= n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    return write


# -- disk errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "n"),
    [("stages", 1), ("stages", 5), ("stages", 10), ("stages", 14), ("cache", 9), ("waves", 2)],
)
def test_disk_full_stops_cleanly_and_resumes(reference, tmp_path, monkeypatch, where, n):
    pipe, ref = reference
    run = tmp_path / "run"
    monkeypatch.setattr(jsonl_mod, "_os_write", disk_full_after(n, where))
    with pytest.raises(StoreError) as info:
        run_pipeline(load_pipeline(pipe), out=run, stream=QUIET)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"cannot write {run}/{where}/")
    assert msg.endswith(
        ": No space left on device; records up to the previous batch are safe; "
        "free space and re-run to resume"
    )
    monkeypatch.setattr(jsonl_mod, "_os_write", os.write)  # space freed
    before = assert_records_readable(run)
    run_pipeline(load_pipeline(pipe), out=run, stream=QUIET)
    assert assert_records_readable(run) >= before
    assert_same_as_reference(ref, run)


def test_disk_full_through_the_cli(reference, tmp_path, monkeypatch, capsys):
    pipe, ref = reference
    run = tmp_path / "cli"
    monkeypatch.setattr(jsonl_mod, "_os_write", disk_full_after(10, "stages"))
    assert main(["run", str(pipe), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("rlaif: error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err
    assert "No space left on device" in errors[0] and "re-run to resume" in errors[0]
    monkeypatch.setattr(jsonl_mod, "_os_write", os.write)
    assert assert_records_readable(run) > 0
    assert main(["run", str(pipe), "--out", str(run), "--quiet"]) == 0
    assert_same_as_reference(ref, run)


def test_disk_full_during_the_preference_export(reference, tmp_path, monkeypatch, capsys):
    import rlaif.export.preferences as prefs

    pipe, ref = reference
    run = tmp_path / "run"

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prefs, "_write_variant", full)
    assert main(["run", str(pipe), "--out", str(run), "--quiet"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"rlaif: error: {run}/export/preferences: cannot write the preference export: "
        "No space left on device; the records are safe, re-run to export again"
    )
    monkeypatch.undo()
    assert main(["run", str(pipe), "--out", str(run), "--quiet"]) == 0
    assert_same_as_reference(ref, run)
    assert not list((run / "export").glob(".preferences*"))  # no staging folder left behind


# -- failure isolation ------------------------------------------------------------------------


def _preference_rows(run: Path) -> list[str]:
    folder = run / "export/preferences/conversational"
    return [x for s in ("train", "test") for x in (folder / f"{s}.jsonl").read_text().splitlines()]


def test_backend_exception_is_isolated_to_its_prompt(reference, tmp_path):
    pipe, ref = reference
    with open(pipe.parent / "prompts.jsonl", encoding="utf-8") as fh:
        lines = fh.readlines()
    poisoned = tmp_path / "poisoned.jsonl"
    poisoned.write_text("".join([*lines[:5], '{"prompt": "a POISON prompt"}\n', *lines[5:]]))
    cfg = load_pipeline(pipe, [f"prompts.path={poisoned}"])
    res = run_pipeline(
        cfg,
        out=tmp_path / "run",
        backend=like_config(FakeBackend(fail_marker="POISON")),
        stream=QUIET,
    )
    stages = res.manifest.stages
    assert (stages["critique_revise"].ok, stages["critique_revise"].error) == (12, 1)
    assert (stages["sample"].ok, stages["sample"].error) == (12, 1)
    reason = next(iter(stages["sample"].reasons["error"]))
    assert reason.startswith("BackendError: fake backend: request 0 contains the failure marker")
    assert res.manifest.problems() == []  # the failed prompt is accounted for, not missing
    # The other prompts' rows are exactly those of a run without the bad prompt (the split is
    # a hash of each prompt, so it does not move either).
    assert _preference_rows(tmp_path / "run") == _preference_rows(ref)


def test_judge_failure_is_isolated(reference, tmp_path):
    pipe, _ = reference
    judge = FakeBackend(fail_marker="Question 3:")
    res = run_pipeline(load_pipeline(pipe), out=tmp_path / "run", judge_backend=judge, stream=QUIET)
    j = res.manifest.stages["judge"]
    assert j.error == 4 and j.ok == 44  # prompt 3's pairs (1 CAI-SL + 3 sampled) failed
    assert all(
        r.startswith("judge error: judge call failed: BackendError") for r in j.reasons["error"]
    )
    stats = res.exports["preferences"]
    assert stats["filtered"]["judge error"] == 4
    assert stats["kept"] + sum(stats["filtered"].values()) == stats["inputs"]


class NaNJudge(FakeBackend):
    """Scores NaN for every conversation that mentions ``marker``."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def score_choices(self, conversations, choices):  # type: ignore[no-untyped-def]
        out = super().score_choices(conversations, choices)
        for conv, scores in zip(conversations, out, strict=True):
            if any(self.marker in m["content"] for m in conv):
                scores.logprobs = {c: math.nan for c in choices}
        return out


def test_nan_scores_are_isolated_errors_and_stay_errors_on_resume(reference, tmp_path):
    pipe, _ = reference
    run = tmp_path / "run"
    res = run_pipeline(
        load_pipeline(pipe), out=run, judge_backend=NaNJudge("Question 7:"), stream=QUIET
    )
    j = res.manifest.stages["judge"]
    assert (j.ok, j.error) == (44, 4)
    assert list(j.reasons["error"]) == [
        "judge error: judge call failed: BackendError: backend returned log-probability nan for 'A'"
    ]
    before = sorted(StageStore(run, "judge", readonly=True).iter_records(), key=lambda r: r["id"])
    # A crash between the cache append and the judge records: the cache must not turn the NaN
    # into a confident verdict (null in the cache reads back as -inf).
    for f in (run / "stages" / "judge").glob("shard-*.jsonl"):
        f.unlink()
    run_pipeline(load_pipeline(pipe), out=run, judge_backend=NaNJudge("Question 7:"), stream=QUIET)
    after = sorted(StageStore(run, "judge", readonly=True).iter_records(), key=lambda r: r["id"])
    assert after == before


def test_context_overflow_is_isolated(tiny_model_dir, tmp_path):
    """The tiny model has a 256-token context; one huge prompt fails alone, the rest go on."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Tell me about {t}."} for t in ("bread", "the sea", "Paris", "a fox")]
    rows.insert(1, {"prompt": "why " * 600})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(
        f"model: {{id: {tiny_model_dir}, backend: transformers}}\n"
        "batch_size: 4\nprompts: {path: prompts.jsonl}\n"
        "stages: {sample: {n: 2, temperature: 0.8, max_new_tokens: 6}}\n"
    )
    res = run_pipeline(load_pipeline(pipe), out=tmp_path / "run", stream=QUIET)
    s = res.manifest.stages["sample"]
    assert (s.ok, s.error) == (4, 1)
    (reason,) = s.reasons["error"]
    assert reason.startswith("BackendError: request 0: prompt has ")
    assert reason.endswith("exceeds the model context of 256")
    assert res.stats["errors"] == 1 and res.stats["model_calls"] > 2  # split until alone


class DyingBackend(FakeBackend):
    """Works for ``calls`` model calls, then the engine is gone (raises ModelError)."""

    def __init__(self, calls: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.left = calls

    def _tick(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise ModelError("the engine died (simulated crash); re-run to resume")

    def generate(self, conversations, params):  # type: ignore[no-untyped-def]
        self._tick()
        return super().generate(conversations, params)

    def score_choices(self, conversations, choices):  # type: ignore[no-untyped-def]
        self._tick()
        return super().score_choices(conversations, choices)


@pytest.mark.parametrize("calls", [3, 11, 20])
def test_dead_backend_stops_the_run_and_resume_loses_nothing(reference, tmp_path, calls):
    pipe, ref = reference
    run = tmp_path / "run"
    with pytest.raises(ModelError, match="engine died"):
        run_pipeline(
            load_pipeline(pipe), out=run, backend=like_config(DyingBackend(calls)), stream=QUIET
        )
    assert assert_records_readable(run) > 0
    run_pipeline(load_pipeline(pipe), out=run, backend=like_config(FakeBackend()), stream=QUIET)
    assert_same_as_reference(ref, run)


def test_dead_backend_through_the_cli(reference, tmp_path, monkeypatch, capsys):
    import rlaif.calls.factory as steps

    pipe, ref = reference
    run = tmp_path / "run"
    monkeypatch.setattr(steps, "load_backend", lambda kind, model, **kw: DyingBackend(8))
    assert main(["run", str(pipe), "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "rlaif: error: the engine died (simulated crash); re-run to resume"
    )
    monkeypatch.undo()
    assert main(["run", str(pipe), "--out", str(run), "--quiet"]) == 0
    assert_same_as_reference(ref, run)


def test_backend_that_cannot_start_is_one_error_not_one_per_request(reference, tmp_path, capsys):
    pipe, _ = reference
    run = tmp_path / "run"
    code = main(["run", str(pipe), "--out", str(run), "--set", "model.options.api_key=x"])
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("rlaif: error: field 'model': cannot start the backend for model")
    assert "unexpected keyword argument 'api_key'" in line
    # Nothing was recorded as a failed request, so fixing the option needs no --retry-errors.
    assert not any(f.stat().st_size for f in (run / "stages").rglob("shard-*.jsonl"))


# -- SIGKILL ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_and_resume_five_times(tmp_path):
    """``bench/kill_resume.py`` with 5 kills: nothing lost, duplicated or changed."""
    result = KR.run_bench("fake", kills=5, seed=1, prompts=16, workdir=tmp_path, verbose=False)
    s = result["summary"]
    assert s["trials"] == 5 and s["killed_mid_run"] >= 4
    for key in ("records_lost", "records_duplicated", "records_changed", "files_differ"):
        assert s[key] == 0, (key, result["trials"])
    assert s["manifests_equal"] == 5


# -- what the user sees: every message quoted in docs/reliability.md is the real one ----------

DOC = ROOT / "docs" / "reliability.md"
GOOD_PIPE = """\
name: doc
batch_size: 4
constitution: helpful-harmless
model: {id: fake-model, backend: fake}
prompts: {path: prompts.jsonl}
stages:
  critique_revise: {rounds: 1}
  sample: {n: 2, temperature: 0.7}
  judge: {principles_k: 1}
  export: {formats: [jsonl], show: 0}
"""
GOOD_CONSTITUTION = """\
name: mine
version: 1.0.0
principles:
  - id: harm
    title: Avoid harm
    critique: Is it harmful?
    revision: Make it harmless.
    judge: Which is less harmful?
"""
# Nine levels of ten: 10**9 strings once expanded.
BOMB = (
    "[&a0 [x, x, x, x, x, x, x, x, x, x]"
    + "".join(f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9))
    + "]"
)


def _bad_inputs(
    w: Path, tiny_model_dir: Path, cli: Any, monkeypatch: Any, caplog: Any
) -> dict[str, str]:
    """Make each bad input in ``w`` (the working directory); return what the user sees: the
    CLI's error line, or the reason recorded for a failure isolated to one request."""

    def write(name: str, text: str | bytes) -> str:
        (w / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            (w / name).write_bytes(text)
        else:
            (w / name).write_text(text, encoding="utf-8")
        return name

    def prompts(*rows: str) -> None:
        write("prompts.jsonl", "".join(json.dumps({"prompt": r}) + "\n" for r in rows))

    def reason(stage: str) -> str:
        manifest = json.loads((w / "run" / "manifest.json").read_text())
        (text,) = manifest["stages"][stage]["reasons"]["error"]
        shutil.rmtree(w / "run")
        return text

    def source(name: str, content: str | bytes) -> str:
        return cli("run", pipe, "--set", f"prompts.path={write(name, content)}")

    prompts("Tell me about bread.", "Tell me about the sea.")
    pipe = write("pipe.yaml", GOOD_PIPE)
    seen: dict[str, str] = {}
    # pipeline files and --set
    seen["malformed YAML"] = cli("run", write("p1.yaml", GOOD_PIPE.replace("1}", "1")))
    seen["wrong type"] = cli("run", write("p2.yaml", GOOD_PIPE.replace("4", "four")))
    seen["unknown key"] = cli("run", write("p3.yaml", GOOD_PIPE.replace("batch_size", "batchsize")))
    seen["missing field"] = cli(
        "run", write("p4.yaml", GOOD_PIPE.replace("{path: prompts.jsonl}", "{}"))
    )
    seen["missing pipeline file"] = cli("run", "nope.yaml")
    seen["YAML alias bomb"] = cli(
        "run",
        write(
            "p5.yaml",
            GOOD_PIPE.replace("backend: fake}", "backend: fake, options: {x: " + BOMB + "}}"),
        ),
    )
    seen["NaN in a config"] = cli("run", pipe, "--set", "stages.sample.temperature=.nan")
    seen["bad --set (no value)"] = cli("run", pipe, "--set", "batch_size")
    seen["bad --set (wrong type)"] = cli("run", pipe, "--set", "batch_size=lots")
    # constitutions
    lint = ("constitution", "lint")
    c = GOOD_CONSTITUTION
    seen["constitution missing a field"] = cli(
        *lint, write("c1.yaml", c.replace("version: 1.0.0\n", ""))
    )
    seen["non-UTF-8 constitution"] = cli(*lint, write("c2.yaml", c.encode() + b"# \xff\n"))
    seen["duplicate principle ids"] = cli(*lint, write("c3.yaml", c + c.split("principles:\n")[1]))
    seen["bad semver"] = cli(*lint, write("c4.yaml", c.replace("1.0.0", "1.0")))
    write("a.yaml", "name: a\nversion: 1.0.0\nextends: b.yaml\n")
    write("b.yaml", "name: b\nversion: 1.0.0\nextends: a.yaml\n")
    seen["extends cycle"] = cli(*lint, "a.yaml")
    tag = '    tags: !!python/object/apply:os.system ["id"]\n'
    seen["YAML python tag"] = cli(*lint, write("c5.yaml", c + tag))
    seen["unknown constitution"] = cli("run", pipe, "--set", "constitution=nope")
    # prompt sources
    seen["missing prompt file"] = cli("run", pipe, "--set", "prompts.path=nope.jsonl")
    seen["empty prompt set"] = source("e.jsonl", "")
    seen["empty prompt"] = source("e2.jsonl", json.dumps({"prompt": " "}))
    seen["non-UTF-8 prompt file"] = source("b.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    seen["lone surrogate in a prompt"] = source("s.jsonl", '{"prompt": "\\ud800 hi"}\n')
    seen["invalid JSON line"] = source("j.jsonl", '{"prompt": "ok"}\n{"prompt"\n')
    seen["deeply nested JSON"] = source("d.jsonl", "[" * 100_000 + "]" * 100_000 + "\n")
    seen["huge line"] = source("h.jsonl", b'{"prompt": "' + b"x" * (16 << 20) + b'"}\n')
    seen["missing column"] = source("p.csv", "question,id\nhello?,1\n")
    seen["broken Parquet file"] = source("p.parquet", b"PAR1 not really")
    # models and templates
    seen["unknown model"] = cli("run", pipe, "--set", "model={id: no-org/no-such-model}")
    seen["model path that does not exist"] = cli("run", pipe, "--set", "model={id: ./no-model}")
    seen["backend option that does not exist"] = cli("run", pipe, "--set", "model.options.x=1")
    write("t/respond.jinja", '{% call message("user") %}\n{{ "".__class__ }}\n{% endcall %}\n')
    seen["template escape"] = cli("run", pipe, "--set", "templates=t")
    # the run itself
    monkeypatch.setattr(jsonl_mod, "_os_write", disk_full_after(3, "stages"))
    seen["disk full"] = cli("run", pipe, "--out", "run")
    monkeypatch.setattr(jsonl_mod, "_os_write", os.write)
    shutil.rmtree(w / "run")
    import rlaif.calls.factory as steps

    monkeypatch.setattr(steps, "load_backend", lambda kind, model, **kw: DyingBackend(2))
    seen["dead backend"] = cli("run", pipe, "--out", "run")
    monkeypatch.setattr(steps, "load_backend", load_backend)
    shutil.rmtree(w / "run")
    # the record store
    assert cli("run", pipe, "--out", "run") == ""
    shard = w / "run/stages/respond/shard-00000.jsonl"
    lines = shard.read_bytes().splitlines(keepends=True)
    shard.write_bytes(
        lines[0] + lines[1] + b'{"id": "torn',
    )
    caplog.clear()
    assert cli("run", pipe, "--out", "run") == ""
    (torn,) = [r.getMessage() for r in caplog.records if "unfinished write" in r.getMessage()]
    seen["torn last line (after a crash)"] = torn
    shard.write_bytes(b"garbage\n" + shard.read_bytes())
    seen["corrupt line inside a shard"] = cli("run", pipe, "--out", "run")
    shutil.rmtree(w / "run")
    from rlaif.store import RunLock

    with RunLock(w / "run"):
        seen["run dir in use"] = cli("run", pipe, "--out", "run")
    shutil.rmtree(w / "run")
    # failures isolated to one request: the run finishes, the reason is in manifest.json
    prompts("Tell me about bread.", "why " * 600)
    tiny = GOOD_PIPE.replace(
        "fake-model, backend: fake", f"{tiny_model_dir}, backend: transformers"
    )
    sets = ["stages.critique_revise=null", "stages.judge=null", "stages.sample.max_new_tokens=4"]
    assert cli("run", write("tiny.yaml", tiny), "--out", "run", *_sets(sets)) == ""
    seen["context overflow"] = reason("sample")
    prompts("Tell me about bread.", "a POISON prompt")
    quiet = {"stream": QUIET}
    run_pipeline(
        load_pipeline(pipe),
        out=w / "run",
        backend=like_config(FakeBackend(fail_marker="POISON")),
        **quiet,
    )
    seen["backend exception"] = reason("sample")
    prompts("Tell me about bread.", "Tell me about the sea.")
    cfg = load_pipeline(pipe, ["stages.judge.mode=reasoning"])
    judge = FakeBackend(responses={"": "I think A is better."})
    run_pipeline(cfg, out=w / "run", judge_backend=judge, **quiet)
    seen["unparseable judge verdict"] = reason("judge")
    run_pipeline(load_pipeline(pipe), out=w / "run", judge_backend=NaNJudge("bread"), **quiet)
    seen["NaN judge scores"] = reason("judge")
    return seen


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def normalize(text: str, folder: Path) -> str:
    """Stable form for the docs: no temporary folder, no lists that grow with the project."""
    text = text.replace(f"{folder}/", "").replace(str(folder), ".")
    text = re.sub(r"\(allowed: [^)]*\)", "(allowed: ...)", text)
    text = re.sub(r"\(built-ins: [^)]*\)", "(built-ins: ...)", text)
    text = re.sub(r"\bpid \d+", "pid N", text)
    return text


def test_documented_messages_are_the_real_ones(
    tmp_path, tiny_model_dir, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)

    def cli(*args: str) -> str:
        capsys.readouterr()
        code = main([*args, *(["--quiet"] if args[0] == "run" else [])])
        err = capsys.readouterr().err
        if code == 0:
            return ""
        # `rlaif run` exits 2 with "rlaif: error: ..."; `constitution lint` reports each bad
        # file as "error: ..." and exits 1.
        lines = [x for x in err.splitlines() if x.startswith(("rlaif: error: ", "error: "))]
        assert code in (1, 2) and len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    seen = {
        k: normalize(v, tmp_path)
        for k, v in _bad_inputs(tmp_path, tiny_model_dir, cli, monkeypatch, caplog).items()
    }
    target = os.environ.get("RLAIF_DOC_MESSAGES")
    if target:  # to regenerate the table in docs/reliability.md
        Path(target).write_text(json.dumps(seen, indent=1, ensure_ascii=False) + "\n")
    assert all(seen.values()), [k for k, v in seen.items() if not v]
    doc = DOC.read_text(encoding="utf-8")
    missing = {k: v for k, v in seen.items() if f"`{v}`" not in doc}
    assert missing == {}, "docs/reliability.md does not quote these messages as they are now"
