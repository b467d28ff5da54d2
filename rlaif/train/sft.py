"""``rlaif train sft``: supervised fine-tuning on chat data (TRL SFTTrainer), the SL-CAI step:
fine-tune the policy on the final revisions of the critique-and-revise loop.

The data are chat rows in one of three shapes (the first that fits the columns is used):

* ``messages``: a conversation, as ``rlaif run`` exports SL-CAI (``export/sft``). The turns
  before the **last** assistant turn are the prompt, that turn is the completion; turns after
  it are ignored.
* ``prompt`` + ``completion``: TRL's prompt-completion rows, as message lists or plain text
  (text becomes one user / one assistant message).
* ``prompt`` + ``chosen``: preference rows; the chosen response is the completion (for CAI-SL
  pairs that is the final revision, the same target as ``export/sft``).

Every row becomes conversational prompt / completion, so TRL renders it with the model's own
chat template and trains on the **completion only**: ``completion_only_loss=True`` makes the
labels of the prompt tokens (system and user turns, earlier assistant turns, the generation
prompt) -100; the completion's tokens, its end-of-turn token included, carry the loss.

Run: ``rlaif train sft configs/train/sft.yaml --set dataset=runs/quickstart``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlaif.errors import DataError, ModelError
from rlaif.train.checkpoints import fit, prepare
from rlaif.train.common import (
    TrainResult,
    peft_config,
    require_trl,
    resolve_model_path,
    save_model,
    set_cpu_threads,
    trl_args,
)
from rlaif.train.config import BaseTrainConfig
from rlaif.train.curves import quiet_bars, watch, write_metrics
from rlaif.train.data import load_preferences

# Where a run directory keeps the SL-CAI SFT export (``rlaif.export.sl_cai``), in the order
# tried; a run directory without one falls back to its preference data (see load_sft_rows).
RUN_DIR_SFT = ("export/sft", "export/sft.jsonl", "export/sft.parquet")
ROW_SHAPES = (("messages",), ("prompt", "completion"), ("prompt", "chosen"))


@dataclass
class SFTTrainConfig(BaseTrainConfig):
    """An SFT run; the shared fields are in :class:`BaseTrainConfig`.

    ``dataset`` is chat data: a JSONL / Parquet file, a ``save_to_disk`` folder, or an rlaif
    run directory (its ``export/sft``, else its preference data, trained on ``chosen``).
    ``max_length`` bounds prompt + completion; longer rows are cut at the end, and rows whose
    prompt alone fills it are dropped.

    Attributes:
        eval_at_end: evaluate the held-out split (``test_size``) after training.
    """

    output: str = "runs/train/sft"
    learning_rate: float = 2e-5
    eval_at_end: bool = True

    trl_config = "trl:SFTConfig"


# -- data -------------------------------------------------------------------------------------


def _turns(value: Any, role: str) -> list[dict[str, str]] | None:
    """Messages as ``[{role, content}]`` (text becomes one ``role`` message); None if malformed."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        return None
    out = []
    for m in value:
        if not isinstance(m, dict):
            return None
        r, content = m.get("role"), m.get("content")
        if not isinstance(r, str) or not isinstance(content, str):
            return None
        out.append({"role": r, "content": content})
    return out


def to_prompt_completion(row: dict[str, Any], shape: tuple[str, ...]) -> dict[str, Any] | str:
    """One row as ``{"prompt": [...], "completion": [...]}``, or the reason it is unusable.

    Args:
        row: a dataset row.
        shape: its columns, one of :data:`ROW_SHAPES`.
    """
    if shape == ("messages",):
        turns = _turns(row["messages"], "user") if isinstance(row["messages"], list) else None
        if turns is None:
            return "messages is not a list of {role, content}"
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=-1)
        if last < 0:
            return "no assistant turn"
        prompt, completion = turns[:last], [turns[last]]
    else:
        prompt = _turns(row["prompt"], "user")
        completion = _turns(row[shape[1]], "assistant")
        if prompt is None or completion is None:
            return f"prompt or {shape[1]} is not text or a list of {{role, content}}"
        if not completion or completion[-1]["role"] != "assistant":
            return f"{shape[1]} does not end with an assistant turn"
    if not prompt:
        return "no prompt before the assistant turn"
    if not completion[-1]["content"].strip():
        return "empty assistant turn"
    return {"prompt": prompt, "completion": completion}


def _sft_source(path: Path) -> Path:
    """A run directory's SFT export, if it has one; else ``path`` itself."""
    if path.is_dir() and not (path / "dataset_dict.json").is_file():
        for rel in RUN_DIR_SFT:
            if (path / rel).exists():
                return path / rel
    return path


def load_sft_rows(
    path: str | Path, test_size: float = 0.1, seed: int = 0
) -> tuple[dict[str, Any], Path, Counter[str]]:
    """Load chat data as conversational prompt / completion splits.

    Args:
        path: a file, a ``save_to_disk`` folder or a run directory (see :class:`SFTTrainConfig`).
        test_size: share held out when the data has no test split (0 keeps all).
        seed: seed of that split.

    Returns:
        ``{"train": Dataset, "test": Dataset}`` (no ``test`` when none is left), the file or
        folder read, and the unusable rows counted by reason.

    Raises:
        DataError: one line naming the file: missing, unreadable, no known columns, or no
            usable rows.
    """
    import datasets

    if not str(path).strip():
        raise DataError("no dataset given", field="dataset")
    source = _sft_source(Path(path).expanduser())
    splits = load_preferences(source, test_size, seed, columns=())
    columns = splits["train"].column_names
    shape = next((s for s in ROW_SHAPES if all(c in columns for c in s)), None)
    if shape is None:
        raise DataError(
            "no chat columns: expected messages, prompt + completion, or prompt + chosen "
            f"(has: {', '.join(columns) or 'none'})",
            file=source,
        )
    dropped: Counter[str] = Counter()
    out: dict[str, Any] = {}
    for name, split in splits.items():
        missing = [c for c in shape if c not in split.column_names]
        if missing:
            raise DataError(f"split '{name}' lacks column(s) {', '.join(missing)}", file=source)
        rows = []
        for row in split:
            converted = to_prompt_completion(row, shape)
            if isinstance(converted, str):
                dropped[converted] += 1
            else:
                rows.append(converted)
        if rows:
            out[name] = datasets.Dataset.from_list(rows)
    if "train" not in out:
        reasons = ", ".join(f"{n} {why}" for why, n in dropped.most_common())
        raise DataError(f"no usable chat rows ({reasons})", file=source)
    return out, source, dropped


# -- training ---------------------------------------------------------------------------------


@dataclass
class SFTSetup:
    """A trainer ready to run, and what went into it.

    Attributes:
        trainer: the ``trl.SFTTrainer`` (datasets tokenized, labels built).
        tokenizer: its tokenizer.
        source: the data file or folder read.
        rows: usable training rows before tokenizing.
        dropped: unusable source rows (train and test), by reason.
    """

    trainer: Any
    tokenizer: Any
    source: Path
    rows: int
    dropped: Counter[str] = field(default_factory=Counter)


def build_sft_trainer(cfg: SFTTrainConfig) -> SFTSetup:
    """Load the data and the model and build the ``SFTTrainer`` (no training yet).

    Raises:
        ConfigError, DataError, ModelError: one-line, naming what is wrong.
    """
    cfg.check()
    require_trl()
    data, source, dropped = load_sft_rows(
        cfg.dataset, cfg.test_size if cfg.eval_at_end else 0.0, cfg.seed
    )

    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from rlaif.train.dpo import load_causal_lm
    from rlaif.train.reward import load_tokenizer

    path = resolve_model_path(cfg.model, cfg.revision, cfg.trust_remote_code)
    set_cpu_threads(cfg.device)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None) and "chat_template_path" not in cfg.trl:
        raise ModelError(
            "the tokenizer has no chat template; SFT on chat data needs one "
            "(or set trl.chat_template_path)",
            file=path,
        )
    model = load_causal_lm(path, cfg.trust_remote_code)
    args = trl_args(
        SFTConfig,
        {
            **cfg.training_kwargs(),
            "max_length": cfg.max_length,
            # Labels of the prompt tokens are -100: only the assistant completion is learned.
            "completion_only_loss": True,
        },
        cfg.trl,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=data.get("test"),
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora, "CAUSAL_LM"),
    )
    if len(trainer.train_dataset) == 0:
        raise DataError(
            f"no training rows left after tokenizing (every prompt fills max_length "
            f"{cfg.max_length})",
            file=source,
        )
    return SFTSetup(trainer, tokenizer, source, len(data["train"]), dropped)


def train_sft(cfg: SFTTrainConfig) -> TrainResult:
    """Fine-tune a policy on chat data (loss on the assistant completion only) and save it
    under ``cfg.output``.

    Args:
        cfg: the run's settings (see :class:`SFTTrainConfig`).

    Returns:
        Where the model went, ``metrics`` (train loss, held-out ``eval_loss``, rows used and
        dropped, steps, seconds) and the curves file.

    Raises:
        ConfigError, DataError, ModelError: one-line, naming what is wrong.
    """
    with quiet_bars():  # the progress line says what happens
        return _train_sft(cfg)


def _train_sft(cfg: SFTTrainConfig) -> TrainResult:
    started = time.perf_counter()
    setup = build_sft_trainer(cfg)
    trainer = setup.trainer
    out = Path(cfg.output)
    resume = prepare(out, cfg)  # the last complete checkpoint of these settings, if any
    curves = resume.curves()
    callback = watch(trainer, curves, "sft", quiet=cfg.quiet)
    output = fit(trainer, resume, curves, callback, cfg.report_to)

    metrics: dict[str, Any] = {
        "recipe": "sft",
        "model": cfg.model,
        "dataset": cfg.dataset,
        "data_source": str(setup.source),
        "train_rows": len(trainer.train_dataset),
        "dropped_rows": dict(setup.dropped),
        # Rows whose prompt alone fills max_length (TRL drops them: nothing left to learn).
        "too_long_rows": setup.rows - len(trainer.train_dataset),
        "lora": cfg.lora.enabled,
        "steps": trainer.state.global_step,
        "resumed_from_step": resume.step,
        "train_loss": output.training_loss,
        "last": dict(callback.last),
    }
    test_set = trainer.eval_dataset
    if cfg.eval_at_end and test_set is not None and len(test_set):
        evaluation = trainer.evaluate()
        metrics.update({k: v for k, v in evaluation.items() if isinstance(v, (int, float))})
        metrics["test_rows"] = len(test_set)
    save_model(trainer.model, setup.tokenizer, out)
    curves.plot()
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics["config"] = asdict(cfg)
    write_metrics(out, metrics)
    resume.finish()
    return TrainResult(out, metrics, curves.path)
