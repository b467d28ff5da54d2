"""Engine processes that outlived the rlaif process which started them, found and ended.

The vLLM backend runs vLLM's engine inside the rlaif process (see
:mod:`rlaif.backends.vllm_backend`), so killing rlaif, even with SIGKILL, ends the engine
too. When vLLM is made to run its engine in child processes anyway
(``VLLM_ENABLE_V1_MULTIPROCESSING=1``), a SIGKILL of rlaif leaves ``VLLM::EngineCore`` and
``VLLM::Worker`` running, re-parented to init and holding their memory. So that a resume
never starts a second engine beside them, every engine process rlaif starts carries
``RLAIF_ENGINE_OWNER=<pid>:<start time>`` of its rlaif process in its environment, and a
backend about to start an engine first kills the engine processes whose owner is gone.

Only processes of vLLM's engine (named ``VLLM::...``) or of multiprocessing (spawned
children, the resource tracker) that carry the mark of a dead owner are touched; a live
rlaif's engines and processes without the mark never are. Linux only (``/proc``); elsewhere
these functions do nothing.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_ENV = "RLAIF_ENGINE_OWNER"
_PROC = Path("/proc")


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def owner_tag(pid: int | None = None) -> str:
    """``<pid>:<start time>``: names a process even after its pid is reused."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{start_time(pid)}"


def mark_children() -> None:
    """Mark the processes this process starts from now on as its own (by environment)."""
    if _PROC.is_dir():
        os.environ[OWNER_ENV] = owner_tag()


def _alive(tag: str) -> bool:
    pid, _, started = tag.partition(":")
    return pid.isdigit() and start_time(int(pid)) == started


def _is_engine(pid: int) -> bool:
    try:
        comm = (_PROC / str(pid) / "comm").read_text(encoding="utf-8", errors="replace")
        cmd = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return comm.startswith("VLLM::") or b"multiprocessing" in cmd


def _owner(pid: int) -> str | None:
    try:
        env = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:  # gone, or another user's
        return None
    prefix = OWNER_ENV.encode() + b"="
    for item in env.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode("ascii", "replace")
    return None


def leftovers() -> dict[int, str]:
    """Engine processes whose rlaif owner is gone: pid -> the owner's tag."""
    if not _PROC.is_dir():
        return {}
    me = os.getpid()
    found: dict[int, str] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        tag = _owner(pid)
        if tag is not None and not _alive(tag) and _is_engine(pid):
            found[pid] = tag
    return found


def reap_leftovers() -> list[int]:
    """Kill (SIGKILL) the engine processes of dead rlaif processes; return their pids."""
    found = leftovers()
    killed = []
    for pid in sorted(found):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already, or not ours to kill
            continue
        killed.append(pid)
    if killed:
        owners = sorted({found[p].partition(":")[0] for p in killed})
        log.warning(
            "killed %d engine process(es) left by rlaif process(es) %s that died without "
            "ending them: %s",
            len(killed),
            ", ".join(owners),
            ", ".join(map(str, killed)),
        )
    return killed
