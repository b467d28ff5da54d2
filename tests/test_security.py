"""Security, end to end: templates, YAML, model loading, saved weights and secrets.

tests/test_prompts.py covers the sandbox at the PromptBook level (escapes, includes leaving the
folder, role markers in data). Here the same guarantees are checked through a whole pipeline
run and the CLI, plus what only shows there: YAML tags in every file a run reads, remote code
in model folders, pickles next to safetensors, and tokens in the environment never reaching
a file or a log.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlaif.backends import FakeBackend, resolve_model
from rlaif.cli.main import main
from rlaif.constitution import import_constitution, load_constitution
from rlaif.errors import ConfigError, ModelError
from rlaif.pipeline import load_pipeline, run_pipeline
from rlaif.store import StageStore

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlaif"
QUIET = open(os.devnull, "w")  # noqa: SIM115 - progress output of in-process runs

ESCAPE = "{{ ''.__class__.__mro__ }}"
BLOCK = "{% for x in range(3) %}{{ x }}{% endfor %}"

PIPE = """\
name: sec
seed: 2
batch_size: 4
constitution: {constitution}
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl}}
stages:
  critique_revise: {{rounds: 1}}
  sample: {{n: 2, temperature: 0.7}}
  judge: {{principles_k: 1}}
  export:
    formats: [jsonl, disk, parquet]
    show: 1
    preferences: {{min_confidence: 0.5, max_length_ratio: null, test_size: 0.3}}
"""

CONSTITUTION = f"""\
name: jinja-in-text
version: 1.0.0
principles:
  - id: p1
    title: Literal braces
    critique: "Does the reply mention {ESCAPE}? {BLOCK}"
    revision: "Rewrite it without {ESCAPE}."
    judge: "Which reply is safer, given {ESCAPE}?"
"""


def write_run(tmp_path: Path, prompts: list[str], constitution: str = "helpful-harmless") -> Path:
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
    )
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPE.format(constitution=constitution))
    return pipe


def all_bytes(run: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file())


# -- templates: constitution text, template files, data -----------------------------------------


def test_principle_text_with_jinja_is_sent_and_stored_literally(tmp_path):
    (tmp_path / "c.yaml").write_text(CONSTITUTION)
    pipe = write_run(tmp_path, ["Tell me about bread.", "Tell me about the sea."], "c.yaml")
    backend = FakeBackend()
    run = tmp_path / "run"
    run_pipeline(load_pipeline(pipe), out=run, backend=backend, stream=QUIET)
    sent = [m["content"] for _, convs in backend.history for c in convs for m in c]
    assert any(f"Does the reply mention {ESCAPE}? {BLOCK}" in s for s in sent)  # critique
    assert any(f"Rewrite it without {ESCAPE}." in s for s in sent)  # revision
    assert any(f"Which reply is safer, given {ESCAPE}?" in s for s in sent)  # judge
    everything = all_bytes(run)
    assert b"<class '" not in everything and b"? 012" not in everything
    trace = next(StageStore(run, "critique_revise", readonly=True).iter_records())
    assert trace["rounds"][0]["critique_request"] == f"Does the reply mention {ESCAPE}? {BLOCK}"


def test_prompts_and_model_outputs_with_jinja_stay_text(tmp_path):
    prompt = "What is {{ 7*7 }}? {% raw %}{{ config }}{% endraw %} {{ lipsum.__globals__ }}"
    pipe = write_run(tmp_path, [prompt, "A plain question."])
    canned = "The answer is {{ 6*7 }} and {{ ''.__class__.__base__.__subclasses__() }}"
    backend = FakeBackend(responses={"A plain": canned})
    run = tmp_path / "run"
    run_pipeline(load_pipeline(pipe), out=run, backend=backend, stream=QUIET)
    sent = [m["content"] for _, convs in backend.history for c in convs for m in c]
    assert prompt in sent  # the user turn went to the model exactly as written
    assert any(canned in s for s in sent)  # the model's output, quoted in the critique request
    pairs = [json.loads(x) for x in (run / "export/pairs.jsonl").read_text().splitlines()]
    prompts = {r["prompt"][-1]["content"] for r in pairs}
    assert prompt in prompts
    assert any(r["rejected"][0]["content"] == canned for r in pairs)
    everything = all_bytes(run)
    assert b"What is 49" not in everything and b"The answer is 42" not in everything


@pytest.mark.parametrize(
    "expr",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
        "{{ conversation.__class__.__base__ }}",
    ],
)
def test_user_template_with_an_escape_stops_the_run(tmp_path, capsys, expr):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "respond.jinja").write_text(
        f'{{% call message("user") %}}\n{expr}\n{{% endcall %}}\n', encoding="utf-8"
    )
    pipe = write_run(tmp_path, ["hi"])
    pipe.write_text(pipe.read_text() + "templates: templates\n")  # next to the pipeline
    assert main(["run", str(pipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"rlaif: error: {folder / 'respond.jinja'}:2: template 'respond': ")
    assert "refused by the sandbox" in line or "undefined" in line
    assert not (tmp_path / "PWNED").exists()


def test_user_template_importing_a_module_is_refused(tmp_path, capsys):
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "respond.jinja").write_text(
        '{% import "os" as os %}\n{% call message("user") %}x{% endcall %}\n'
    )
    pipe = write_run(tmp_path, ["hi"])
    pipe.write_text(pipe.read_text() + f"templates: {folder}\n")
    assert main(["run", str(pipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{folder / 'respond.jinja'}:1: template 'respond': cannot load 'os'" in line


# -- YAML: only safe loaders ----------------------------------------------------------------------


def _tag(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]'


def test_python_tags_are_refused_in_every_yaml_file(tmp_path):
    marker = tmp_path / "PWNED"
    bad = {
        "constitution": f"name: x\nversion: 1.0.0\ndescription: {_tag(marker)}\nprinciples: []\n",
        "parent": "name: child\nversion: 1.0.0\nextends: parent.yaml\n",
        "pipeline": PIPE.format(constitution="helpful-harmless") + f"system: {_tag(marker)}\n",
    }
    (tmp_path / "c.yaml").write_text(bad["constitution"])
    with pytest.raises(ConfigError, match=r"c\.yaml:3: invalid YAML: could not determine a "):
        load_constitution(tmp_path / "c.yaml")
    (tmp_path / "parent.yaml").write_text(bad["constitution"])
    (tmp_path / "child.yaml").write_text(bad["parent"])
    with pytest.raises(ConfigError, match=r"parent\.yaml:3: invalid YAML"):
        load_constitution(tmp_path / "child.yaml")
    (tmp_path / "pipe.yaml").write_text(bad["pipeline"])
    with pytest.raises(
        ConfigError, match=r"pipe\.yaml:15: invalid YAML: could not determine a constructor"
    ):
        load_pipeline(tmp_path / "pipe.yaml")
    # A tag in --set is not YAML that builds an object: the value is kept as plain text.
    (tmp_path / "ok.yaml").write_text(PIPE.format(constitution="helpful-harmless"))
    cfg = load_pipeline(tmp_path / "ok.yaml", [f"system={_tag(marker)}"])
    assert cfg.system == _tag(marker)
    # Imported files are JSON: a tag there is just text inside a principle.
    src = tmp_path / "swarm.json"
    src.write_text(json.dumps({"constitutions": [{"critic": _tag(marker), "revision": "x"}]}))
    mapping = import_constitution("llm-swarm", [src])
    assert mapping["principles"][0]["critique"] == _tag(marker)
    assert not marker.exists()


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    # A call on an expression (``model.to(x).eval()``) is not a module function.
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")
    return ".".join(reversed(parts))


def test_source_uses_only_safe_loaders():
    """Every ``yaml.load(`` in rlaif/ passes the SafeLoader subclass; no unsafe YAML, pickle,
    marshal, eval or exec; ``torch.load`` only with ``weights_only=True``; no hard-coded
    ``trust_remote_code=True`` or ``safe_serialization=False``."""
    from rlaif import yamlio

    assert issubclass(yamlio._LineLoader, yaml.SafeLoader)
    forbidden = {
        "yaml.unsafe_load",
        "yaml.full_load",
        "yaml.load_all",
        "yaml.unsafe_load_all",
        "pickle.load",
        "pickle.loads",
        "marshal.load",
        "marshal.loads",
        "dill.load",
        "dill.loads",
        "shelve.open",
        "eval",
        "exec",
    }
    problems = []
    yaml_loads = 0
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        for word in ("unsafe_load", "FullLoader", "UnsafeLoader", "yaml.Loader"):
            if word in text:
                problems.append(f"{path}: mentions {word}")
        for node in ast.walk(ast.parse(text, str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if name in forbidden:
                problems.append(f"{where}: {name}(")
            if name == "yaml.load":
                yaml_loads += 1
                loader = kwargs.get("Loader")
                if not (isinstance(loader, ast.Name) and loader.id == "_LineLoader"):
                    problems.append(f"{where}: yaml.load without the SafeLoader subclass")
            if name == "torch.load":
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            trc = kwargs.get("trust_remote_code")
            if isinstance(trc, ast.Constant) and trc.value is True:
                problems.append(f"{where}: trust_remote_code=True hard-coded")
            ss = kwargs.get("safe_serialization")
            if isinstance(ss, ast.Constant) and ss.value is False:
                problems.append(f"{where}: safe_serialization=False")
            if name.endswith("torch.save"):
                problems.append(f"{where}: torch.save (pickle) instead of safetensors")
    assert yaml_loads >= 1  # the check above did look at the one loader
    assert problems == []


def test_grep_finds_no_unsafe_yaml_text():
    """Plain grep as a second net (covers code the AST walk might not see as a call)."""
    hits = []
    for path in _python_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#")[0]
            if re.search(r"\byaml\.load\(", code) and "Loader=_LineLoader" not in code:
                hits.append(f"{path}:{n}: {line.strip()}")
            if re.search(r"\b(unsafe_load|pickle\.loads?|torch\.load)\(", code):
                hits.append(f"{path}:{n}: {line.strip()}")
    assert hits == []


# -- model loading: remote code and weights -------------------------------------------------------


@pytest.fixture
def remote_code_model(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "remote-code-model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("import os\nos.system('touch PWNED')\n")
    return folder


def test_remote_code_is_refused_unless_trusted(remote_code_model, tmp_path, capsys):
    with pytest.raises(ModelError) as info:
        resolve_model(str(remote_code_model))
    assert str(info.value) == (
        f"model '{remote_code_model}' needs its own Python code (auto_map in config.json); "
        "pass trust_remote_code=True only if you trust its authors"
    )
    assert resolve_model(str(remote_code_model), trust_remote_code=True).path == remote_code_model
    pipe = write_run(tmp_path, ["hi"])
    pipe.write_text(
        pipe.read_text().replace(
            "{id: fake-model, backend: fake}", f"{{id: {remote_code_model}, backend: transformers}}"
        )
    )
    assert main(["run", str(pipe), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == f"rlaif: error: {info.value}"
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()


def test_backend_loads_without_remote_code_and_prefers_safetensors(
    tiny_model_dir, tmp_path, monkeypatch
):
    import transformers

    from rlaif.backends import TransformersBackend

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    # A pickle next to the safetensors: loading must never unpickle it.
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    seen: list[dict[str, Any]] = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    backend = TransformersBackend(str(folder), device="cpu")
    assert seen and all(k.get("trust_remote_code") is False for k in seen)
    assert not marker.exists()
    assert backend.model_revision is not None
    assert backend.model_revision.startswith("sha256:")  # the hash of model.safetensors
    backend.close()


def test_models_are_saved_as_safetensors(tmp_path):
    from rlaif.testing import build_tiny_model

    folder = build_tiny_model(tmp_path / "m")
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names
    assert not names & {"pytorch_model.bin", "model.pt", "model.pth"}


# -- secrets --------------------------------------------------------------------------------------

SECRETS = {
    "HF_TOKEN": "hf_FAKEabcdefghijklmnopqrstuvwxyz0123",
    "HUGGING_FACE_HUB_TOKEN": "hf_FAKEzyxwvutsrqponmlkjihgfedcba9876",
    "OPENAI_API_KEY": "sk-FAKE-0123456789abcdefghijklmnopqrstuv",
    "RLAIF_API_KEY": "rk-FAKE-secret-value-4242",
}


def test_secrets_in_the_environment_never_reach_files_or_logs(tmp_path, monkeypatch, capfd, caplog):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    caplog.set_level(logging.DEBUG)
    pipe = write_run(tmp_path, [f"Tell me about topic {i}." for i in range(6)])
    run = tmp_path / "run"
    assert main(["run", str(pipe), "--out", str(run)]) == 0
    out, err = capfd.readouterr()
    card = (run / "export/preferences/README.md").read_text()
    assert "fake-model" in card  # the card was written, with provenance
    files = [p for p in run.rglob("*") if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert {".jsonl", ".json", ".parquet", ".arrow", ".md", ".png"} <= suffixes
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["stdout"], blobs["stderr"] = out.encode(), err.encode()
    blobs["logs"] = "\n".join(r.getMessage() for r in caplog.records).encode()
    for name, value in SECRETS.items():
        for where, blob in blobs.items():
            assert value.encode() not in blob, f"{name} found in {where}"
            assert value[8:].encode() not in blob, f"the tail of {name} found in {where}"


def test_secret_named_backend_options_are_not_written_to_disk(tmp_path):
    pipe = write_run(tmp_path, ["hi"])
    run = tmp_path / "run"
    secret = SECRETS["OPENAI_API_KEY"]
    main(
        ["run", str(pipe), "--out", str(run), "--quiet", "--set", f"model.options.api_key={secret}"]
    )
    assert secret.encode() not in all_bytes(run)
