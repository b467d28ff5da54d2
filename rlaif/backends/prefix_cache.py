"""Shared-prefix reuse for one-prompt forwards: where a prompt splits into a prefix it shares
with its siblings and the rest, an LRU of the prefixes' KV tensors, and the forward that
continues from a stored prefix (see the transformers backend's module notes)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from rlaif.backends.base import Conversation, PrefixHint
from rlaif.backends.torch_utils import left_pad, prefill

# A marked prefix shorter than this is not split off: a second forward costs about as much
# as this many prompt tokens on a CPU (each forward reads every weight once).
MIN_PREFIX_TOKENS = 32
_MARK = "\ue000"  # private-use character that locates a prefix hint in the rendered prompt


class PrefixKV:
    """LRU of prompt-prefix KV tensors, keyed by a hash of the prefix's token ids, bounded
    in bytes; an entry is a tuple of (keys, values) per layer, never modified after storing.

    Args:
        max_bytes: memory for the stored tensors; 0 stores nothing.

    Attributes:
        hits: lookups that found their prefix.
        misses: lookups that did not.
        reused_tokens: prefix tokens not computed again thanks to a hit (counted by
            :func:`forward_tail`).
        bytes: memory the stored tensors take now.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[tuple[tuple[Any, Any], ...], int]] = OrderedDict()
        self.hits = self.misses = 0
        self.reused_tokens = 0

    @staticmethod
    def key(ids: Sequence[int]) -> str:
        """The cache key of a prefix's token ids."""
        return hashlib.blake2b(repr(list(ids)).encode(), digest_size=16).hexdigest()

    def get(self, key: str) -> Any:
        """The stored KV for ``key`` (now the most recently used), or None; counts the hit
        or miss."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: str, kv: tuple[tuple[Any, Any], ...]) -> None:
        """Store ``kv`` (a (keys, values) pair per layer), evicting the least recently used
        entries past ``max_bytes``; an entry larger than that is not stored."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes:
            return
        self._items[key] = (kv, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        self._items.clear()
        self.bytes = 0


def plain_kv_cache(config: Any) -> bool:
    """Whether a model's KV cache can be stored after a prefix and continued from.

    Args:
        config: the model's transformers config.

    Returns:
        True if every layer keeps a plain, growing KV cache (no sliding window, no
        recurrent state).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # an unusual cache layout: do not split
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def split_point(
    tokenizer: Any, conversation: Conversation, ids: list[int], hint: PrefixHint
) -> int:
    """Prompt tokens before the hinted point (0: no split), from the request alone.

    The hint is located by rendering the prompt with a marker character at that point;
    the split follows the last line break before it (tokens can merge across the point
    differently in each sibling, not across a line break).

    Args:
        tokenizer: the model's Hugging Face tokenizer (a fast one: offsets are needed).
        conversation: the request's conversation.
        ids: the prompt's token ids, as the backend rendered them.
        hint: ``(message index, character offset)`` where the shared text ends.

    Returns:
        The number of prefix tokens to compute separately, or 0 when the marker cannot be
        placed, the tokens differ from ``ids``, or the prefix is shorter than
        :data:`MIN_PREFIX_TOKENS`.
    """
    try:
        index, offset = int(hint[0]), int(hint[1])
    except (TypeError, ValueError, IndexError):
        return 0
    if not 0 <= index < len(conversation):
        return 0
    content = conversation[index].get("content")
    if not isinstance(content, str) or not 0 <= offset <= len(content):
        return 0
    if any(_MARK in str(m.get("content", "")) for m in conversation):
        return 0
    marked = [dict(m) for m in conversation]
    marked[index]["content"] = content[:offset] + _MARK + content[offset:]
    try:
        text = tokenizer.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        at = text.find(_MARK)
        if at < 0 or text.count(_MARK) != 1:
            return 0
        plain = text.replace(_MARK, "")
        enc = tokenizer(plain, add_special_tokens=False, return_offsets_mapping=True)
    except Exception:  # no offsets (slow tokenizer) or a template that rejects the mark
        return 0
    if list(enc["input_ids"]) != ids:
        return 0
    # The split goes after the last token that ends a line before the hint: what follows
    # the hint differs between siblings and can merge with the tokens just before it
    # ("A. Apologise" / "A. Hide" tokenize ". " differently), never across a line break.
    k = 0
    for n, (_, end) in enumerate(enc["offset_mapping"]):
        if end > at:
            break
        if end and plain[end - 1] == "\n":
            k = n + 1
    return k if MIN_PREFIX_TOKENS <= k < len(ids) - 1 else 0


def forward_tail(
    model: Any,
    seq: list[int],
    split: int,
    keep: int,
    *,
    pad_id: int,
    device: torch.device,
    prefixes: PrefixKV,
) -> torch.Tensor:
    """Logits of the last ``keep`` positions of one unpadded sequence.

    Args:
        model: a Hugging Face causal LM with a plain KV cache (see :func:`plain_kv_cache`).
        seq: the token ids.
        split: 0 for one forward over ``seq``; else the prefix length (from
            :func:`split_point`) whose KV is taken from ``prefixes``, or computed and stored
            there, before one forward over the rest.
        keep: how many last positions to return logits for.
        pad_id: the model's padding id.
        device: where the model runs.
        prefixes: the LRU of prefix KV.

    Returns:
        Logits of shape (``keep``, vocabulary).
    """
    from transformers import DynamicCache

    if split == 0:
        ids, mask, pos = left_pad([seq], pad_id, device)
        return model(
            input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep
        ).logits[0]
    key = prefixes.key(seq[:split])
    kv = prefixes.get(key)
    if kv is None:
        cache = DynamicCache(config=model.config)
        prefill(model, *left_pad([seq[:split]], pad_id, device), cache)
        kv = tuple((layer.keys, layer.values) for layer in cache.layers)
        prefixes.put(key, kv)
    else:
        prefixes.reused_tokens += split
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)  # copies: the stored tensors stay as they were
    n = len(seq)
    return model(
        input_ids=torch.tensor([seq[split:]], device=device),
        attention_mask=torch.ones((1, n), dtype=torch.long, device=device),
        position_ids=torch.arange(split, n, device=device).unsqueeze(0),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=keep,
    ).logits[0]
