"""Pieces the training recipes share around the trainer itself: LoRA, TRL arguments, CPU
threads, model paths and saving.

A recipe (``reward.py``, ``dpo.py``, ``online.py``, ``ppo.py``) is one readable function: its
config from :mod:`rlaif.train.config`, its data from :mod:`rlaif.train.data`, the work handed
to a TRL trainer (or its own loop) and watched by :mod:`rlaif.train.curves`, then
:func:`save_model`. Nothing here knows which algorithm runs.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlaif.errors import ConfigError, ModelError
from rlaif.train.config import LoraSettings, use_cpu


def peft_config(lora: LoraSettings, task_type: str) -> Any:
    """A ``peft.LoraConfig`` for the settings, or None when LoRA is off.

    Args:
        lora: the settings.
        task_type: ``"CAUSAL_LM"`` or ``"SEQ_CLS"`` (the latter also trains the score head).
    """
    if not lora.enabled:
        return None
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ModelError("LoRA needs peft: pip install peft", field="lora.enabled") from exc
    targets: Any = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's shorthand must be a plain string
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=task_type,
        # A reward head starts random: it must be trained and saved in full, not adapted.
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def require_trl() -> None:
    """Fail with one line when TRL (the optional ``train`` extra) is not installed.

    Raises:
        ModelError: naming the install command.
    """
    if importlib.util.find_spec("trl") is None:
        raise ModelError("training needs TRL: pip install 'rlaif[train]'")


def set_cpu_threads(device: str = "auto") -> None:
    """On a CPU run, use one torch thread per idle core (see ``cpu_threads``): spinning
    OpenMP threads on busy cores made small training steps 2-3x slower in our runs."""
    if use_cpu(device):
        import torch

        from rlaif.backends.torch_utils import cpu_threads

        torch.set_num_threads(cpu_threads())


def trl_args(config_cls: type, base: dict[str, Any], extra: dict[str, Any] | None = None) -> Any:
    """Build a TRL / transformers config with rlaif's defaults, then the user's ``trl:`` extras.

    The defaults suit small runs anywhere: no reporting integrations, no checkpoints, fp32
    and no gradient checkpointing on a CPU (TRL defaults to bf16 and checkpointing).

    Args:
        config_cls: e.g. ``trl.DPOConfig``.
        base: fields the recipe sets (``output_dir``, ``max_steps``, ...). A ``use_cpu`` key
            chooses the precision defaults.
        extra: the config file's ``trl:`` section, passed through as is.

    Raises:
        ConfigError: a key in ``extra`` that ``config_cls`` does not have, or a value it refuses.
    """
    cpu = bool(base.get("use_cpu", False))
    kwargs: dict[str, Any] = {
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,  # CurveCallback prints progress lines that suit logs and TTYs
        "gradient_checkpointing": False,
        "bf16": False if cpu else None,
        "dataloader_num_workers": 0,
    }
    kwargs.update(base)
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key, value in (extra or {}).items():
        if key not in names:
            raise ConfigError(f"unknown {config_cls.__name__} field '{key}'", field=f"trl.{key}")
        kwargs[key] = value
    try:
        return config_cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{config_cls.__name__}: {exc}", field="trl") from None


# -- models ----------------------------------------------------------------------------------


def resolve_model_path(
    model_id: str, revision: str | None = None, trust_remote_code: bool = False
) -> str:
    """A local folder for a hub id, a local folder or a ``.gguf`` file (see ``resolve_model``).

    Raises:
        ModelError: the model cannot be found offline or needs untrusted remote code.
    """
    from rlaif.backends.resolve import resolve_model

    return str(resolve_model(model_id, revision=revision, trust_remote_code=trust_remote_code).path)


def _untie_adapted_embeddings(model: Any) -> None:
    """Give a tied output head its own weight when a LoRA adapter sits on it or on the input
    embedding, so that merging keeps the trained function.

    With ``tie_word_embeddings`` (SmolLM2, the tiny test model) ``lm_head`` and
    ``embed_tokens`` share one tensor. An adapter on one of them (``target_modules`` naming
    ``lm_head`` or ``embed_tokens``; ``all-linear`` names neither) changes only that side in
    training, but ``merge_and_unload`` writes its update into the shared tensor, so the saved
    model would compute something else than the trained one under every backend (logits off by
    several units on the tiny model). With the head untied first, each merge goes to its own
    matrix; the folder then holds both and says ``tie_word_embeddings: false``, which
    transformers and vLLM load as is.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    try:
        head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if head is None or embed is None:
        return
    if not (isinstance(head, BaseTunerLayer) or isinstance(embed, BaseTunerLayer)):
        return
    head = head.get_base_layer() if isinstance(head, BaseTunerLayer) else head
    embed = embed.get_base_layer() if isinstance(embed, BaseTunerLayer) else embed
    weight = getattr(head, "weight", None)
    if weight is None or weight.data_ptr() != getattr(embed, "weight", weight).data_ptr():
        return  # already two tensors
    import torch

    head.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
    text_config.tie_word_embeddings = False
    if config is not text_config and hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    if hasattr(base, "get_expanded_tied_weights_keys"):
        # transformers 5 keeps the mapping a later tie_weights() would re-tie: recompute it.
        base.all_tied_weights_keys = base.get_expanded_tied_weights_keys(all_submodels=True)


def save_model(model: Any, tokenizer: Any, out_dir: str | Path) -> Path:
    """Save a trained model as a plain folder ``from_pretrained`` loads (safetensors).

    LoRA adapters are merged into the base weights first (``merge_and_unload``), so the
    folder needs neither peft nor the base model; an adapter on a tied head or embedding
    unties the two first (see :func:`_untie_adapted_embeddings`). The folder loads and
    generates the same under the transformers and vLLM backends, and ``resolve_model`` gives
    it a ``sha256:`` revision of its own weights (tests/test_trained_backends.py).

    Args:
        model: a transformers model, possibly a peft model.
        tokenizer: its tokenizer (saved alongside, with the chat template).
        out_dir: the folder to write.

    Returns:
        ``out_dir``.
    """
    from rlaif.train.curves import is_main_process

    out = Path(out_dir)
    if not is_main_process():  # one writer under a distributed launch
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Unwrap a DeepSpeed / DDP / accelerate wrapper if the trainer left one.
    model = getattr(model, "module", model)
    if hasattr(model, "merge_and_unload"):
        _untie_adapted_embeddings(model)
        model = model.merge_and_unload()
    # Sequence-classification models need the pad id to find the last token of a batch.
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # Trainers switch the KV cache off for training (TRL does); the saved model is for
    # inference, as the starting model's config was.
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    # safetensors writes its files 0600: a server under another account (a vLLM container)
    # could not read the weights. Give them the mode every other file here gets.
    umask = os.umask(0)
    os.umask(umask)
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o666 & ~umask)
    return out


# -- results ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a recipe produced.

    Attributes:
        out_dir: the output folder (model files, ``metrics.json``, curves).
        metrics: final numbers (losses, accuracy, steps, seconds, ...).
        curves: ``curves.jsonl`` path (``curves.png`` sits next to it), or None.
    """

    out_dir: Path
    metrics: dict[str, Any]
    curves: Path | None = None
