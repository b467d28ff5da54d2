"""``rlaif report``: one self-contained HTML page per run, checked as text and in Chromium.

The runs are real: the RL-CAI pipeline on the fake backend, training curves and metrics
written by the trainer's own writers, an evaluation by ``run_eval`` / ``write_eval``. A
script-injection payload goes into the prompts, the model outputs and a principle's title and
text; it must come out as visible text and never as markup. The browser test drives headless
Chromium (Debian package ``chromium``) over the DevTools protocol on a pipe, stdlib only.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from rlaif.backends.fake import FakeBackend
from rlaif.calls.caller import ModelCaller
from rlaif.cli.main import main
from rlaif.constitution import load_constitution
from rlaif.evaluate.policy_eval import eval_metrics, run_eval, write_eval
from rlaif.pipeline import load_pipeline, read_prompts, run_pipeline
from rlaif.report import SECTIONS, build_report, write_report
from rlaif.report.stats import judge_stats, principle_usage
from rlaif.stages.judge import JudgeConfig, verdict_from_logprobs
from rlaif.store import CallCache, StageStore
from rlaif.train.curves import CurveLogger, write_metrics

ROOT = Path(__file__).resolve().parents[1]
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
CHROMIUM_HINT = "install it with: apt-get install -y chromium"

CONSTITUTION = """\
name: xss-test
version: 1.2.3
extends: helpful-harmless
principles:
  - id: sneaky
    title: 'Sneaky {xss}'
    weight: 50
    critique: 'Critique {xss}'
    revision: 'Revise it.'
    judge: 'Which is better? {xss}'
"""

PIPE = """\
name: report-test
seed: 2
output: {out}
batch_size: 8
constitution: {constitution}
model: {{id: fake-model, backend: fake}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
{stages}
"""
RL_STAGES = """\
  critique_revise: {rounds: 2}
  sample: {n: 3, temperature: 0.8}
  judge: {principles_k: 2, pairs: all}
  export:
    formats: [jsonl]
    preferences: {min_confidence: 0.5, max_length_ratio: null, test_size: 0.25, formats: [jsonl]}
"""
SL_STAGES = """\
  critique_revise: {rounds: 1}
  export: {formats: [jsonl]}
"""


def _pipeline(tmp: Path, stages: str, n: int = 6) -> Path:
    (tmp / "c.yaml").write_text(CONSTITUTION.format(xss=XSS.replace("'", "''")), "utf-8")
    with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"question {i}: {XSS}"}) + "\n")
    p = tmp / "pipe.yaml"
    text = PIPE.format(out=tmp / "run", constitution=tmp / "c.yaml", stages=stages)
    p.write_text(text, encoding="utf-8")
    return p


def _train(run: Path) -> None:
    """train/dpo and train/reward written by the trainer's own writers, in their formats."""
    curves = CurveLogger(run / "train" / "dpo")
    for step in range(1, 6):
        curves.log(step, loss=0.7 - 0.1 * step, **{"rewards/margins": 0.1 * step})
    curves.log(5, eval_loss=0.3, train_loss=0.5)
    curves.plot()
    write_metrics(run / "train" / "dpo", {"steps": 5, "train_loss": 0.5, "config": {"model": XSS}})
    rm = CurveLogger(run / "train" / "reward")
    rm.log(1, loss=0.69)
    rm.log(2, loss=0.5, eval_accuracy=0.75)
    write_metrics(run / "train" / "reward", {"steps": 2, "eval_accuracy": 0.75})


def _eval(run: Path) -> None:
    """eval/ as ``rlaif eval`` writes it: fake policy (answers with the payload) vs baseline."""
    cache = CallCache(run / "eval" / "cache.jsonl")
    policy = ModelCaller(
        lambda: FakeBackend({"": f"I will not. {XSS}"}), model="policy", revision=None, cache=cache
    )
    base = ModelCaller(lambda: FakeBackend(), model="baseline", revision=None, cache=cache)
    sets = {
        "red_team": read_prompts(ROOT / "pipelines/data/redteam-heldout-50.jsonl", limit=3)[0],
        "safe": read_prompts(ROOT / "pipelines/data/xstest-safe-50.jsonl", limit=3)[0],
    }
    con = load_constitution("helpful-harmless")
    rows = run_eval(
        sets, policy, base, base, con, reward_fn=lambda ps: [len(r) / 10 for _, r in ps], quiet=True
    )
    models = {"policy": {"model": "policy", "backend": "fake"}, "baseline": {"model": "baseline"}}
    report = {"models": models, "metrics": eval_metrics(rows), "seconds": 0.5}
    report["reward_model"] = {"model": "length/10"}
    write_eval(run / "eval", report, rows)
    cache.close()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RL-CAI run (2 critique rounds, 3 samples, judged pairs) with training and eval."""
    tmp = tmp_path_factory.mktemp("full")
    run_pipeline(load_pipeline(_pipeline(tmp, RL_STAGES)), backend=FakeBackend({"": XSS}))
    _train(tmp / "run")
    _eval(tmp / "run")
    return tmp / "run"


class _Page(HTMLParser):
    """Tags, attributes and text of a page, for structural checks."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, Any]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(doc: str) -> _Page:
    page = _Page()
    page.feed(doc)
    return page


def _section_text(doc: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', doc, re.S)
    assert m, sid
    return m.group(1)


def test_full_report_is_self_contained_and_escaped(full_run: Path) -> None:
    doc = build_report(full_run)
    page = _parse(doc)
    ids = [a.get("id") for t, a in page.tags if t == "section"]
    assert ids == [sid for sid, _ in SECTIONS if sid != "contrast"]  # no RLCD stage here
    for sid in ids:  # every section has its data in this run
        assert "not run:" not in _section_text(doc, sid), sid
    # Nothing executable and nothing loaded from outside: no scripts, no event handlers,
    # images only as embedded PNGs, links only to anchors of the page.
    assert not [t for t, _ in page.tags if t in ("script", "iframe", "object", "embed", "link")]
    assert not [a for _, attrs in page.tags for a in attrs if a.startswith("on")]
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) >= 9
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(a["href"].startswith("#") for t, a in page.tags if t == "a")
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", doc)
    # The payload is visible text: in prompts, outputs, the principle's title and text.
    text = "".join(page.text)
    assert text.count(XSS) >= 5
    assert "Sneaky " + XSS in text and "Critique " + XSS in text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in doc
    assert "xss-test v1.2.3" in text and "report-test" in text


def test_counts_principles_and_judge_numbers_match_the_records(full_run: Path) -> None:
    manifest = json.loads((full_run / "manifest.json").read_text())
    doc = build_report(full_run)
    prefs = manifest["info"]["export"]["preferences"]
    counts = _section_text(doc, "counts")
    for reason, n in prefs["filtered"].items():
        assert re.search(rf"<td>{re.escape(reason)}</td><td class=\"num\">{n}</td>", counts)
    # Principle usage equals what the shards say, round by round.
    uses = {u.id: u for u in principle_usage(full_run, sorted(manifest["stages"]))}
    for r in (1, 2):
        recs = list(StageStore(full_run, f"critique-{r}", readonly=True).iter_records())
        assert sum(u.critiques[r] for u in uses.values()) == len(recs) == 6
    judged = list(StageStore(full_run, "judge", readonly=True).iter_records())
    assert sum(u.judged for u in uses.values()) == 2 * len(judged)  # principles_k = 2
    assert uses["sneaky"].judged > 0 and uses["sneaky"].total_critiques > 0
    # The judge section's pair-level numbers are the export card's, computed independently.
    js = judge_stats(full_run, "judge")
    ens = js.metrics["ensemble"]
    assert ens["n"] == len(judged) == prefs["judge"]["verdicts"]
    assert ens["tie_rate"]["rate"] == pytest.approx(prefs["judge"]["tie_rate"], abs=1e-6)
    assert ens["position_consistency"]["rate"] == pytest.approx(
        prefs["judge"]["position_consistency"], abs=1e-6
    )
    assert ens["first_position_rate"]["rate"] == pytest.approx(
        prefs["judge"]["first_position_rate"], abs=1e-6
    )


def test_judge_statistics_by_hand(tmp_path: Path) -> None:
    """Three judged pairs, one principle each:
    1. lp order 1 {A: ln .8, B: ln .2}, order 2 {A: ln .3, B: ln .7}: p1 = .8, p2 = .7,
       winner x, consistent; first position wins in order 1 only. x is the longer response.
    2. P(A) = .9 in order 1 and .85 in order 2: p1 = .9, p2 = .15 -> tie, inconsistent;
       first position wins in both orders.
    3. order 2 scores NaN -> error.
    ok 2 of 3 (error rate 1/3), ties 1/2, consistent 1/2, first position 3/4, the one decided
    verdict went to the longer response (1/1); mean |p - .5| = (.25 + |.525 - .5|) / 2 = .1375.
    """
    import math

    cfg = JudgeConfig()
    ln = math.log
    verdicts = [
        verdict_from_logprobs(
            {"A": ln(0.8), "B": ln(0.2)}, {"A": ln(0.3), "B": ln(0.7)}, cfg, principle_id="harm"
        ),
        verdict_from_logprobs(
            {"A": ln(0.9), "B": ln(0.1)},
            {"A": ln(0.85), "B": ln(0.15)},
            cfg,
            principle_id="helpful",
        ),
        verdict_from_logprobs(
            {"A": -1.0, "B": -2.0}, {"A": float("nan"), "B": -1.0}, cfg, principle_id="harm"
        ),
    ]
    with StageStore(tmp_path, "judge") as store:
        store.append(
            {
                "id": f"p{k}",
                "prompt_id": f"q{k}",
                "source": "samples",
                "x": "a longer reply",
                "y": "short",
                "verdict": v.to_dict(),
                "status": v.status,
                **({"reason": "judge error"} if v.status != "ok" else {}),
            }
            for k, v in enumerate(verdicts)
        )
    m = judge_stats(tmp_path, "judge").metrics["ensemble"]
    assert (m["n"], m["n_ok"]) == (3, 2)
    assert m["error_rate"]["rate"] == pytest.approx(1 / 3)
    assert m["tie_rate"]["rate"] == 0.5 and m["position_consistency"]["rate"] == 0.5
    assert (m["first_position_rate"]["k"], m["first_position_rate"]["n"]) == (3, 4)
    assert m["length_bias"]["judge_prefers_longer"]["rate"] == 1.0
    assert m["mean_confidence"] == pytest.approx(0.1375)
    uses = {u.id: u for u in principle_usage(tmp_path, ["judge"])}
    assert (uses["harm"].judged, uses["harm"].judge_errors, uses["helpful"].judge_ties) == (2, 1, 1)


def test_sections_without_data_say_not_run(tmp_path: Path) -> None:
    run_pipeline(load_pipeline(_pipeline(tmp_path, SL_STAGES, n=3)))
    doc = build_report(tmp_path / "run")
    for sid in ("judge", "margins", "rewards", "training", "eval"):
        assert "not run:" in _section_text(doc, sid), sid
    for sid in ("summary", "principles", "examples"):
        assert "not run:" not in _section_text(doc, sid), sid
    counts = _section_text(doc, "counts")  # parts of a section say so too
    assert counts.count("not run:") == 1 and "not run: the pipeline has no judge" in counts
    assert 'class="missing"' in doc  # greyed in the table of contents
    # Only an evaluation folder: the run sections say not run, eval has its numbers.
    only_eval = tmp_path / "only-eval"
    _eval(only_eval)
    doc = build_report(only_eval)
    assert "not run:" in _section_text(doc, "summary")
    assert "not run:" not in _section_text(doc, "eval")


def test_cli_writes_the_report_and_reports_bad_input(
    full_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "r" / "page.html"
    assert main(["report", str(full_run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path / "r")]) == 2  # a folder that holds no run
    broken = tmp_path / "broken"
    (broken / "eval").mkdir(parents=True)
    (broken / "eval" / "eval.json").write_text('{"metrics": {}\n,,', encoding="utf-8")
    assert main(["report", str(broken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "missing" in err[0] and "not a run directory" in err[1]
    assert "eval.json:2" in err[2]
    assert write_report(full_run) == full_run / "report.html"


# -- the page in a real browser -----------------------------------------------------------------


class _Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, exe: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="rlaif-chromium-")
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()

        def fds() -> None:  # in the child: the protocol pipe on fds 3 and 4
            a = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-sync",
            "--disable-component-update",
            "--window-size=1280,1000",
            "about:blank",
        ]
        self.proc = subprocess.Popen(
            args,
            preexec_fn=fds,
            pass_fds=(3, 4),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> None:
        ready, _, _ = select.select([self._r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError("chromium did not answer in time")
        chunk = os.read(self._r, 1 << 20)
        if not chunk:
            raise RuntimeError("chromium closed the DevTools pipe")
        self._buf += chunk
        *msgs, self._buf = self._buf.split(b"\0")
        self.events += [json.loads(m) for m in msgs if m]

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            for k, e in enumerate(self.events):
                if e.get("id") == self._id:
                    del self.events[k]
                    if "error" in e:
                        raise RuntimeError(f"{method}: {e['error']}")
                    return e["result"]
            self._read(deadline)

    def wait_for(self, method: str) -> None:
        deadline = time.monotonic() + 60
        while not any(e.get("method") == method for e in self.events):
            self._read(deadline)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.send("Browser.close")  # the browser may be gone already
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self.profile, ignore_errors=True)


_PROBE = """JSON.stringify({
  sections: [...document.querySelectorAll('section')].map(s => s.id),
  headings: [...document.querySelectorAll('section h2')].map(h => h.textContent),
  scripts: document.scripts.length,
  handlers: [...document.querySelectorAll('*')].filter(
      e => [...e.attributes].some(a => a.name.startsWith('on'))).length,
  images: [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  xss: window.__xss === undefined ? null : window.__xss,
  payloadAsText: document.body.innerText.includes(%s),
  height: document.documentElement.scrollHeight
})"""


def test_report_in_headless_chromium(full_run: Path, tmp_path: Path) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(f"the browser test needs Chromium, which is not installed; {CHROMIUM_HINT}")
    path = write_report(full_run, tmp_path / "report.html")
    browser = _Chromium(exe)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = s["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": path.as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        probe = _PROBE % json.dumps(XSS)
        found = browser.send(
            "Runtime.evaluate", {"expression": probe, "returnByValue": True}, session=session
        )
        shot = browser.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True},
            session=session,
        )
    finally:
        browser.close()
    dom = json.loads(found["result"]["value"])
    shown = [(sid, name) for sid, name in SECTIONS if sid != "contrast"]  # no RLCD stage here
    assert dom["sections"] == [sid for sid, _ in shown]
    assert dom["headings"] == [name for _, name in shown]
    assert dom["scripts"] == 0 and dom["handlers"] == 0 and dom["xss"] is None
    assert dom["payloadAsText"]
    assert len(dom["images"]) >= 9 and all(c and w > 100 and h > 100 for c, w, h in dom["images"])
    # No console error, no uncaught exception, no failed or outside request.
    errors = [
        e
        for e in browser.events
        if e.get("method") in ("Runtime.exceptionThrown", "Network.loadingFailed")
        or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
    ]
    assert errors == []
    urls = [
        e["params"]["request"]["url"]
        for e in browser.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    assert urls and all(u.startswith(("file:", "data:")) for u in urls), urls
    # It rendered: a tall PNG with real content (many distinct colours, not one blank fill).
    from PIL import Image

    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    with Image.open(tmp_path / "report.png") as im:
        assert im.width >= 1000 and im.height >= 0.9 * dom["height"] > 3000
        colours = im.convert("RGB").resize((200, 400)).getcolors(maxcolors=1 << 16)
    assert colours is not None and len(colours) > 50
    if os.environ.get("RLAIF_REPORT_SCREENSHOT"):  # keep a copy for docs and reviews
        shutil.copy(tmp_path / "report.png", os.environ["RLAIF_REPORT_SCREENSHOT"])


@pytest.mark.slow
def test_report_of_real_training_and_eval(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`rlaif train dpo` and `rlaif eval` on the tiny model write into the run directory; the
    report shows the trainer's own curves and metrics and the evaluation's numbers."""
    run_pipeline(load_pipeline(_pipeline(tmp_path, RL_STAGES, n=6)))
    run = tmp_path / "run"
    data = run / "export/preferences/conversational/train.jsonl"
    train = ["train", "dpo", "--out", str(run / "train" / "dpo"), "--quiet"]
    for kv in (
        f"model={tiny_model_dir}",
        f"dataset={data}",
        "max_steps=2",
        "max_length=96",
        "batch_size=2",
        "device=cpu",
    ):
        train += ["--set", kv]
    assert main(train) == 0
    red = ROOT / "pipelines/data/redteam-heldout-50.jsonl"
    assert (
        main(
            [
                "eval",
                "--policy",
                str(run / "train" / "dpo"),
                "--baseline",
                str(tiny_model_dir),
                "--red-team",
                str(red),
                "--limit",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                str(run / "eval"),
                "--quiet",
            ]
        )
        == 0
    )
    doc = build_report(run)
    training = _section_text(doc, "training")
    assert "Training step &#39;dpo&#39;" in training and "not run:" not in training
    assert "<td>rewards/margins</td>" in training and "data:image/png;base64," in training
    steps = json.loads((run / "train/dpo/metrics.json").read_text())["steps"]
    assert re.search(rf'<td>steps</td><td class="num">{steps}</td>', training)
    evaluation = _section_text(doc, "eval")
    assert "not run:" not in evaluation and "red_team" in evaluation
