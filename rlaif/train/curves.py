"""What a training run shows and records: progress lines, ``curves.jsonl`` / ``curves.png``
and ``metrics.json``.

:class:`CurveLogger` is plain Python (matplotlib only when plotting); ``CurveCallback``, the
``transformers.TrainerCallback`` that feeds it, is built on first access because importing
transformers' callback module pulls in torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlaif.progress import Progress
from rlaif.store.atomic import write_json_atomic


def is_main_process() -> bool:
    """False on every rank but the first of a distributed launch (torchrun, accelerate and
    DeepSpeed set ``RANK``), so files are written once."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


__all__ = ["CurveLogger", "quiet_bars", "watch", "write_metrics"]  # and CurveCallback, lazily


# Subplots in this order first (substring match), then the rest alphabetically.
# Subplots: these names first, in this order; then names containing one of _PLOT_WORDS; then
# the rest. Series that never change (clip ratios of 0, ...) go last. At most _MAX_PLOTS.
_PLOT_FIRST = (
    "loss", "eval_loss", "reward", "eval_accuracy", "accuracy", "rewards/accuracies",
    "eval_rewards/accuracies", "kl", "rewards/margins", "margin", "reward_std", "entropy",
)  # fmt: skip
_PLOT_WORDS = ("loss", "reward", "kl", "accuracy", "margin", "entropy", "grad_norm")
_NOT_PLOTTED = {"epoch", "step", "total_flos", "train_runtime"}
# The trainer's end-of-run summary: logged to curves.jsonl, one point, not worth a subplot.
_SUMMARY = {"train_loss", "train_samples_per_second", "train_steps_per_second"}
_MAX_PLOTS = 12


class CurveLogger:
    """Append training metrics to ``out_dir/curves.jsonl`` and plot them to ``curves.png``.

    Args:
        out_dir: folder for both files (created if needed).
        fresh: remove curves of an earlier run in the same folder first.
    """

    def __init__(self, out_dir: str | Path, *, fresh: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "curves.jsonl"
        self.png = self.out_dir / "curves.png"
        # Under torchrun / accelerate every rank runs the recipe; one writes the curves.
        self.enabled = is_main_process()
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            self.path.unlink(missing_ok=True)
            self.png.unlink(missing_ok=True)

    def log(self, step: int, **metrics: Any) -> None:
        """Append one line ``{"step": step, metric: value, ...}``; non-numbers are skipped."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
                with contextlib.suppress(Exception):
                    value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row[key] = float(value) if math.isfinite(value) else None
        if len(row) == 1:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()

    def rows(self) -> list[dict[str, Any]]:
        """The lines logged so far."""
        if not self.path.is_file():
            return []
        with self.path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def plot(self) -> Path | None:
        """Write ``curves.png``: one subplot per metric against the step; None if no data."""
        if not self.enabled:
            return None
        series: dict[str, tuple[list[int], list[float]]] = {}
        for row in self.rows():
            for key, value in row.items():
                if key in _NOT_PLOTTED or key in _SUMMARY or value is None:
                    continue
                xs, ys = series.setdefault(key, ([], []))
                xs.append(row["step"])
                ys.append(value)
        if not series:
            return None

        def rank(name: str) -> tuple[int, int, str]:
            flat = 3 if len(set(series[name][1])) == 1 and len(series[name][1]) > 1 else 0
            if name in _PLOT_FIRST:
                return (flat, _PLOT_FIRST.index(name), name)
            hits = [i for i, k in enumerate(_PLOT_WORDS) if k in name.lower()]
            return (flat + (1 if hits else 2), hits[0] if hits else 0, name)

        names = sorted(series, key=rank)[:_MAX_PLOTS]
        import matplotlib

        matplotlib.use("Agg")  # no display; safe in CI and worker threads
        import matplotlib.pyplot as plt

        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names, strict=False):
            xs, ys = series[name]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(self.png, dpi=90)
        plt.close(fig)
        return self.png


def _curve_callback_class() -> type:
    # Built on first use: importing transformers' callback module pulls in torch (seconds),
    # which ``import rlaif.train`` (and ``rlaif --help``) should not pay for.
    from transformers import TrainerCallback

    class CurveCallback(TrainerCallback):
        """A ``TrainerCallback`` that feeds the trainer's logs to a :class:`CurveLogger` and
        prints progress (steps done / total, rate, ETA) with :class:`rlaif.progress.Progress`.

        Args:
            curves: where the metrics go.
            desc: label of the progress line, e.g. ``"dpo"``.
            quiet: print no progress.

        Attributes:
            last: the latest value of every metric logged (for ``metrics.json``).
        """

        def __init__(self, curves: CurveLogger, desc: str = "train", *, quiet: bool = False):
            self.curves = curves
            self.desc = desc
            self.quiet = quiet
            self.progress: Progress | None = None
            self.last: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.progress = Progress(
                state.max_steps or None,
                self.desc,
                unit="steps",
                initial=state.global_step,
                quiet=self.quiet,
            )

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(max(0, state.global_step - self.progress.n))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = {k: v for k, v in (logs or {}).items() if k not in _NOT_PLOTTED}
            self.curves.log(state.global_step, **logs)
            for key, value in logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.last[key] = float(value)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.close()

    CurveCallback.__module__ = __name__
    CurveCallback.__qualname__ = "CurveCallback"
    return CurveCallback


def _curve_callback() -> type:
    cls = globals().get("CurveCallback")
    if cls is None:
        cls = globals()["CurveCallback"] = _curve_callback_class()  # build once
    return cls


def __getattr__(name: str) -> Any:
    if name == "CurveCallback":
        return _curve_callback()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def watch(trainer: Any, curves: CurveLogger, desc: str, *, quiet: bool = False) -> Any:
    """Attach a :class:`CurveCallback` to a transformers ``Trainer`` and return the callback.

    Also removes the trainer's own printing callbacks: with ``disable_tqdm`` transformers
    prints every log dict to stdout, which the progress line replaces.
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    callback = _curve_callback()(curves, desc, quiet=quiet)
    trainer.add_callback(callback)
    return callback


@contextlib.contextmanager
def quiet_bars() -> Iterator[None]:
    """Silence the per-call progress bars of ``datasets`` (tokenizing, filtering) and
    ``transformers`` (loading and writing weights) for a while; the recipe's own progress
    line says what is happening."""
    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as tf_logging

    restore = []
    for module in (ds_logging, tf_logging):
        if module.is_progress_bar_enabled():
            module.disable_progress_bar()
            restore.append(module)
    try:
        yield
    finally:
        for module in restore:
            module.enable_progress_bar()


_SECRET = re.compile(r"(^|_)(api_?key|token|secret|password|authorization)$", re.IGNORECASE)


def redacted(v: Any) -> Any:
    """``v`` ready for JSON and for trackers: NaN / inf become None, paths text, and values of
    keys that look like credentials ``<redacted>`` (backend options may carry an API key)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {
            str(k): "<redacted>" if _SECRET.search(str(k)) and v[k] else redacted(x)
            for k, x in v.items()
        }
    if isinstance(v, (list, tuple)):
        return [redacted(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def write_metrics(out_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` (sorted keys; NaN / inf become null; values of keys that look
    like credentials are redacted) and return its path."""
    path = Path(out_dir) / "metrics.json"
    if not is_main_process():
        return path
    return write_json_atomic(path, redacted(metrics), indent=1, sort_keys=True)
