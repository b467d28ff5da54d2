"""Checkpoints that a killed training run resumes from: written atomically, picked safely.

Layout under a run's output folder::

    checkpoints/run.json           the settings hash the checkpoints belong to
    checkpoints/step-00000040/     complete checkpoints, renamed into place when whole
    checkpoints/checkpoint-60/     transformers writing one (a staging name, never resumed)
    checkpoints/.step-...tmp-*     rlaif's PPO loop writing one (likewise)

A checkpoint is written under a staging name, every file in it fsynced, then renamed to
``step-<N>`` in one ``os.replace``: a folder with that name is complete by construction, so a
kill in the middle of a save leaves only a staging folder, which the next start removes.
Each holds ``rlaif_state.json`` (its step and how many ``curves.jsonl`` lines were written by
then): on resume the curves are cut back to that line, so no step is logged twice. Older
checkpoints beyond ``keep_checkpoints`` are removed (renamed away first, so a half-deleted
one is never taken for whole); the folder goes once the final model is saved.

TRL trainers write their checkpoints with transformers (model or adapter, optimizer,
scheduler, RNG states, trainer state with the step and data position) and resume with
``resume_from_checkpoint``; :func:`trl_checkpoints` renames each into place. The PPO loop
saves its own (:func:`save_state` / :func:`load_state`). A changed configuration (anything
but ``quiet``, the checkpoint settings and ``report_to``) starts afresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.store import content_hash
from rlaif.store.atomic import (
    fsync_dir,
    fsync_tree,
    temp_sibling,
    write_atomic,
    write_json_atomic,
)
from rlaif.train.curves import CurveLogger, is_main_process

CHECKPOINTS = "checkpoints"
RUN = "run.json"
STATE = "rlaif_state.json"
_COMPLETE = re.compile(r"^step-(\d+)$")
# settings that change nothing a run computes, so a run resumes across them
NOT_HASHED = ("quiet", "checkpoint_every", "keep_checkpoints", "report_to")

__all__ = ["Resume", "fit", "load_state", "prepare", "save_state", "trl_checkpoints"]


def settings_hash(cfg: Any) -> str:
    """Hash of a training config's settings, less :data:`NOT_HASHED`."""
    settings = dataclasses.asdict(cfg)
    for key in NOT_HASHED:
        settings.pop(key, None)
    return content_hash(json.loads(json.dumps(settings, default=str)))


def complete(root: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := _COMPLETE.match(p.name))]
    return sorted(f for f in found if f[1].is_dir())


@dataclass
class Resume:
    """Where a run stands: its checkpoint folder and the checkpoint it resumes from.

    Attributes:
        out: the run's output folder.
        root: ``out/checkpoints``.
        path: the latest complete checkpoint, or None (the run starts from step 0).
        step: that checkpoint's step (0 when none).
        curve_rows: ``curves.jsonl`` lines written when it was saved.
        keep: complete checkpoints to keep.
        state: that checkpoint's ``rlaif_state.json``.
        seconds: time spent writing checkpoints in this process (the cost of checkpointing).
    """

    out: Path
    root: Path
    path: Path | None = None
    step: int = 0
    curve_rows: int = 0
    keep: int = 2
    state: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    def curves(self) -> CurveLogger:
        """The run's :class:`CurveLogger`: fresh, or cut back to the checkpoint's lines."""
        curves = CurveLogger(self.out, fresh=self.path is None)
        if self.path is not None and curves.enabled and curves.path.is_file():
            with curves.path.open(encoding="utf-8") as fh:
                kept = [line for line in fh if line.strip()][: self.curve_rows]
            write_atomic(curves.path, "".join(kept))
        return curves

    def commit(self, staging: Path, step: int, curve_rows: int, **extra: Any) -> Path:
        """Make the folder ``staging`` the complete checkpoint of ``step``, then prune."""
        write_json_atomic(staging / STATE, {**extra, "step": step, "curve_rows": curve_rows})
        fsync_tree(staging)
        final = self.root / f"step-{step:08d}"
        if final.exists():  # the same step saved again (a resume that ran no step)
            _remove(final)
        os.replace(staging, final)
        fsync_dir(self.root)
        for _, old in complete(self.root)[: -self.keep]:
            _remove(old)
        return final

    def finish(self) -> None:
        """Remove the checkpoints: the final model is saved."""
        if is_main_process() and self.root.is_dir():
            _remove(self.root)


def _remove(folder: Path) -> None:
    # Renamed first: a kill half-way through rmtree must not leave a "complete" name.
    gone = temp_sibling(folder, "del")
    os.replace(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)


def prepare(out: str | Path, cfg: Any) -> Resume:
    """Find the checkpoint a run in ``out`` resumes from, and clear what cannot be used.

    Staging folders of killed saves are removed; checkpoints of other settings too (the run
    then starts from step 0). ``cfg`` needs ``keep_checkpoints``.
    """
    out = Path(out)
    resume = Resume(out, out / CHECKPOINTS, keep=max(1, int(cfg.keep_checkpoints)))
    root, digest = resume.root, settings_hash(cfg)
    if not is_main_process():
        return _latest(resume)
    if root.is_dir():
        try:
            same = json.loads((root / RUN).read_text(encoding="utf-8"))["settings"] == digest
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if not same:
            shutil.rmtree(root)
        else:
            for p in root.iterdir():
                if p.name != RUN and not _COMPLETE.match(p.name):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    if not (root / RUN).is_file():
        write_json_atomic(root / RUN, {"settings": digest})
    return _latest(resume)


def _latest(resume: Resume) -> Resume:
    for step, path in reversed(complete(resume.root)):
        try:
            state = json.loads((path / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        resume.path, resume.step, resume.state = path, step, state
        resume.curve_rows = int(state.get("curve_rows", 0))
        break
    return resume


# -- TRL trainers -----------------------------------------------------------------------------


def trl_checkpoints(trainer: Any, resume: Resume, curves: CurveLogger) -> None:
    """Have a transformers ``Trainer`` (``output_dir`` = ``resume.root``) put each checkpoint
    into place atomically; the trainer's own rotation is off (``save_total_limit`` None).
    The last step gets no checkpoint (a run killed after it resumes from the one before).

    Two running totals that transformers 5 and TRL 1.x keep outside their checkpoints are
    saved beside them and restored on resume, so the numbers read as after an uninterrupted
    run: the summed loss behind the final ``train_loss`` (transformers' ``_total_loss_scalar``,
    averaged over the steps of this ``train()`` call only) and TRL's token count
    (``_total_train_tokens``, logged as ``num_tokens``).
    """
    from transformers import TrainerCallback

    class AtomicCheckpoints(TrainerCallback):
        started = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.started = time.perf_counter()  # the save, if any, comes next
            if state.max_steps and state.global_step >= state.max_steps:
                # No checkpoint of the last step: the model is saved next anyway, and
                # transformers 5, resumed from a checkpoint at max_steps, trains one step more.
                control.should_save = False

        def on_train_begin(self, args, state, control, **kwargs):
            if resume.path is None:
                return
            if "loss_sum" in resume.state and hasattr(trainer, "_total_loss_scalar"):
                trainer._total_loss_scalar = float(resume.state["loss_sum"])
                trainer._initial_global_step = 0  # train_loss: the mean over every step
            if "tokens" in resume.state and hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = resume.state["tokens"]

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            staging = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not staging.is_dir():
                return
            totals: dict[str, Any] = {}
            if hasattr(trainer, "_total_loss_scalar") and hasattr(trainer, "_tr_loss"):
                totals["loss_sum"] = trainer._total_loss_scalar + float(trainer._tr_loss)
            if hasattr(trainer, "_total_train_tokens"):
                totals["tokens"] = trainer._total_train_tokens
            resume.commit(staging, state.global_step, len(curves.rows()), **totals)
            resume.seconds += time.perf_counter() - self.started

    trainer.add_callback(AtomicCheckpoints())


def fit(trainer: Any, resume: Resume, curves: CurveLogger, watcher: Any, report_to: list) -> Any:
    """``trainer.train()``, resumed from ``resume``'s checkpoint when there is one, with
    checkpoints put into place atomically and the TensorBoard writer of ``report_to``.

    Args:
        trainer: a transformers / TRL trainer whose ``output_dir`` is ``resume.root``.
        resume: from :func:`prepare`.
        curves: the run's curves (from ``resume.curves()``).
        watcher: the recipe's ``CurveCallback``; its ``last`` values start from the curves
            kept, so ``metrics.json`` reads as after an uninterrupted run.
        report_to: the config's trackers.
    """
    from rlaif.train.trackers import trl_trackers

    for callback in trl_trackers(report_to, resume.out, resume.step)[1]:
        trainer.add_callback(callback)
    trl_checkpoints(trainer, resume, curves)
    for row in curves.rows():
        watcher.last.update({k: v for k, v in row.items() if k != "step" and v is not None})
    return trainer.train(resume_from_checkpoint=str(resume.path) if resume.path else None)


# -- rlaif's own loops (PPO) ----------------------------------------------------------------------


def rng_state(generators: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The state of the run's own random streams and of the global ones (torch, Python,
    numpy)."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "generators": {name: g.get_state() for name, g in generators.items()},
        "rng": rng.getstate(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generators: dict[str, Any], rng: random.Random) -> None:
    """Undo :func:`rng_state`: every stream continues where it was saved."""
    import numpy as np
    import torch

    for name, g in generators.items():
        g.set_state(state["generators"][name])
    rng.setstate(_tuples(state["rng"]))
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _pack(value: Any, tensors: dict[str, Any]) -> Any:
    """``value`` as JSON with its tensors moved into ``tensors`` (saved as safetensors, never
    pickled): dicts keep their key types (an optimizer's state is keyed by int), tuples stay
    tuples."""
    import torch

    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"t": key}
    if isinstance(value, dict):
        return {"d": [[_pack(k, tensors), _pack(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"u": [_pack(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_pack(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


def _unpack(tree: Any, tensors: dict[str, Any]) -> Any:
    """Undo :func:`_pack`."""
    if isinstance(tree, list):
        return [_unpack(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "t" in tree:
            return tensors[tree["t"]]
        if "u" in tree:
            return tuple(_unpack(v, tensors) for v in tree["u"])
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in tree["d"]}
    return tree


def save_state(resume: Resume, step: int, model: Any, optimizer: Any, extra: dict) -> Path:
    """Save a loop's checkpoint at ``step``: the trainable weights of ``model`` (LoRA adapters
    and the value head, or all weights), the optimizer, and ``extra`` (RNG states, data
    position, curve so far, ...: tensors and plain Python values)."""

    if not is_main_process():
        return resume.root
    started = time.perf_counter()
    staging = temp_sibling(resume.root / f"step-{step:08d}")
    staging.mkdir(parents=True)
    weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    tree = _pack(
        {"step": step, "weights": weights, "optimizer": optimizer.state_dict(), "extra": extra},
        tensors,
    )
    save_file(tensors, str(staging / "state.safetensors"))
    (staging / "state.json").write_text(json.dumps(tree), encoding="utf-8")
    path = resume.commit(staging, step, int(extra.get("curve_rows", step)))
    resume.seconds += time.perf_counter() - started
    return path


def load_state(resume: Resume, model: Any, optimizer: Any) -> dict[str, Any]:
    """Load the checkpoint :func:`save_state` wrote into ``model`` and ``optimizer``;
    returns its ``extra``."""
    import torch

    assert resume.path is not None
    from safetensors.torch import load_file

    tensors = load_file(str(resume.path / "state.safetensors"))
    tree = json.loads((resume.path / "state.json").read_text(encoding="utf-8"))
    state = _unpack(tree, tensors)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return state["extra"]
