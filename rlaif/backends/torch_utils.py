"""Torch plumbing of the transformers backend: which device, dtype and CPU threads to use,
and how prompts become one left-padded batch whose forward fills a KV cache."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from rlaif.errors import ModelError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# fp32 on CPU: there greedy output is bit-identical whatever the batch size (the cache key
# leaves batch size out), while bf16 changed 7-10 of 16 SmolLM2 greedy replies between batch
# 1 and batch 5/16. bf16 was up to ~1.3x faster on an AVX-512-bf16 EPYC, not worth that.
CPU_AUTO_DTYPE = torch.float32


# Judge prompts per forward on a GPU when ``score_batch_size`` is "auto". One prompt per
# forward is launch-bound there: on an H200 (SmolLM2-135M shape, bf16) it took 27 ms a
# request against 0.77 ms in batches of 64 (bench/gpu.py, bench/README.md).
GPU_SCORE_BATCH = 64


def pick_score_batch(value: int | str, device: torch.device) -> int:
    """Prompts per judge forward that a backend's ``score_batch_size`` option names.

    Args:
        value: a count >= 1, or ``"auto"``: 1 on CPU (scores independent of how requests
            were batched, so margins are byte-identical across batch sizes and resumes) and
            :data:`GPU_SCORE_BATCH` on other devices (where a lone forward is mostly launch
            overhead; bf16 scores then depend on the batch's shape in their last digits).
        device: where the model runs.

    Returns:
        The count.

    Raises:
        ModelError: anything else.
    """
    if value == "auto":
        return 1 if device.type == "cpu" else GPU_SCORE_BATCH
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(
            f"score_batch_size must be an integer >= 1 or 'auto', got {value!r}",
            field="score_batch_size",
        )
    return value


def pick_device(device: str) -> torch.device:
    """The torch device a backend's ``device`` option names.

    Args:
        device: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...

    Returns:
        The device.

    Raises:
        ModelError: a name torch does not know.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}", field="device") from exc


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The torch dtype a backend's ``dtype`` option names, for weights on ``device``.

    Args:
        dtype: a torch dtype, ``"auto"`` (bf16 on GPUs that support it, else fp16;
            :data:`CPU_AUTO_DTYPE` on CPU) or a name such as ``"float32"`` or ``"bf16"``.
        device: where the model will run.

    Returns:
        The dtype.

    Raises:
        ModelError: an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return CPU_AUTO_DTYPE
    if dtype not in _DTYPES:
        raise ModelError(
            f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16", field="dtype"
        )
    return _DTYPES[dtype]


def cpu_threads() -> int:
    """Torch CPU threads to use: one per idle core, at least one.

    OpenMP threads spin at each barrier waiting for their peers; when another process holds
    a core, a peer is descheduled and every barrier costs a scheduler slice. Measured on a
    2-core machine with another process using ~1.3 cores: SmolLM2 greedy at batch 8 ran at
    2-5 tok/s with 2 threads and 45-65 tok/s with 1 thread; on an idle machine 2 threads
    are the faster. So threads = cores minus the cores busy right now (:func:`busy_cores`),
    never more than torch's default. ``OMP_NUM_THREADS`` set by the user always wins.
    """
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return default
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux: keep torch's choice
        return default
    busy = busy_cores(cores)
    return default if busy is None else max(1, min(default, cores - round(busy)))


def busy_cores(cores: int, window: float = 0.3) -> float | None:
    """How many cores other work keeps busy now: ``/proc/stat`` sampled over ``window``
    seconds (this process sleeps meanwhile), else the 1-minute load average.

    Not the load average first: it trails by a minute, so a model engine a pipeline closed a
    moment ago still counts, and the training step after it would get one thread on an idle
    machine. Time of niced processes is not counted: they yield the cores to us.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        busy = v[0] + v[2] + v[5] + v[6] + v[7]  # user, system, irq, softirq, steal
        return busy, busy + v[1] + v[3] + v[4]  # + nice, idle, iowait

    try:
        b0, t0 = sample()
        time.sleep(window)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    return cores * (b1 - b0) / (t1 - t0) if t1 > t0 else None


def left_pad(
    seqs: Sequence[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into one batch.

    Args:
        seqs: token ids per row (at least one row).
        pad_id: the id that fills the left of shorter rows.
        device: where the tensors go.

    Returns:
        ``(input_ids, attention_mask, position_ids)``, each of shape (rows, longest row).
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    # Positions count real tokens only, so a row's numbers don't depend on its padding.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def prefill(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
) -> Any:
    """One forward over (left-padded) prompts that fills ``cache``.

    Args:
        model: a Hugging Face causal LM.
        ids: input ids, as from :func:`left_pad`.
        mask: the attention mask, as from :func:`left_pad`.
        pos: position ids, as from :func:`left_pad`.
        cache: a transformers cache (e.g. ``DynamicCache``), filled in place.

    Returns:
        The model's output, with logits of the last position only.
    """
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
