"""The transformers backend: batched generation and choice scoring on CPU or GPU.

Conventions every backend must match (the vLLM backend reuses the helpers below):

* **Prompt** = ``tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
  tokenize=False)`` tokenized with ``add_special_tokens=False`` (the template already has its
  markers); see :func:`prompt_ids`.
* **Completion text** = the generated tokens decoded with ``skip_special_tokens=True``, the
  end-of-sequence token excluded, cut before the first ``stop`` string. ``completion_tokens``
  counts every token sampled, the EOS token or the token that completed a stop string
  included. ``finish_reason`` is ``"stop"`` (EOS or a stop string) or ``"length"``.
  End-of-sequence ids = ``generation_config.eos_token_id`` (int or list) plus the
  tokenizer's ``eos_token_id``.
* **Seeds**: completion ``j`` of a conversation samples from its own ``torch.Generator``
  seeded with ``seed + j`` (one uniform draw per token, inverse-CDF over the
  temperature-scaled, top-p-filtered distribution), so results don't depend on batch
  composition. Greedy ignores the seed; ``n`` greedy completions are one decode, copied.
* **Choice scores**: a choice's log-probability is the sum of the log-probs of
  ``tokenizer(choice, add_special_tokens=False)`` tokens following the prompt above
  (see :func:`choice_ids`). Single-token choices need one forward pass over the prompts.
* **Shared prefixes** (``score_choices(..., prefixes=)``, one-prompt forwards): a prompt
  whose request marks where the text it shares with its siblings ends (the judge's two orders
  share the conversation) is scored as two forwards, the prefix and then the rest over the
  prefix's KV cache. The prefix's KV is kept in a small LRU keyed by its token ids, so its
  siblings skip it. The split is a function of the request alone, and a cached prefix holds
  exactly what computing it again would, so scores stay independent of batching, call order
  and cache state; they differ from an unsplit forward in the last digits (~1e-5 in log-prob).
* **Context**: a prompt (plus the longest choice when scoring) that leaves no room in
  ``max_position_embeddings`` raises :class:`BackendError` naming the request index;
  generation stops with ``"length"`` when the context fills up.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from rlaif.backends.base import (
    ChoiceScores,
    Completion,
    Conversation,
    PrefixHint,
    SamplingParams,
)
from rlaif.backends.local import LocalModelBackend, choice_ids
from rlaif.backends.resolve import DEFAULT_MODEL, resolve_model
from rlaif.errors import BackendError, ModelError

log = logging.getLogger(__name__)

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


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}", field="device") from exc


def _pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
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
    are the faster. So threads = cores minus the 1-minute load average, never more than
    torch's default. ``OMP_NUM_THREADS`` set by the user always wins.
    """
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return default
    try:
        cores = len(os.sched_getaffinity(0))
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not Linux / no load average: keep torch's choice
        return default
    return max(1, min(default, cores - round(busy)))


def _left_pad(seqs: Sequence[list[int]], pad_id: int, device: torch.device):
    """(input_ids, attention_mask, position_ids) for left-padded ``seqs``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    # Positions count real tokens only, so a row's numbers don't depend on its padding.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


# A marked prefix shorter than this is not split off: a second forward costs about as much
# as this many prompt tokens on a CPU (each forward reads every weight once).
MIN_PREFIX_TOKENS = 32
_MARK = "\ue000"  # private-use character that locates a prefix hint in the rendered prompt


class _PrefixKV:
    """LRU of prompt-prefix KV tensors, keyed by a hash of the prefix's token ids, bounded
    in bytes; an entry is a tuple of (keys, values) per layer, never modified after storing."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[tuple[tuple[Any, Any], ...], int]] = OrderedDict()
        self.hits = self.misses = 0
        self.reused_tokens = 0

    @staticmethod
    def key(ids: Sequence[int]) -> str:
        return hashlib.blake2b(repr(list(ids)).encode(), digest_size=16).hexdigest()

    def get(self, key: str) -> Any:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: str, kv: tuple[tuple[Any, Any], ...]) -> None:
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes:
            return
        self._items[key] = (kv, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.bytes -= old

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def _prefill(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
) -> Any:
    """One forward over (left-padded) prompts that fills ``cache``; logits of the last position
    only."""
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )


NUCLEUS_PREFIX = 1024  # top-p looks for its nucleus among this many tokens first


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index per row where the cumulative mass passes ``u`` x the row's total mass."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)


def _nucleus(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the smallest most-likely prefix whose mass reaches top_p (the first token stays).
    return sorted_probs * ((sorted_probs.cumsum(-1) - sorted_probs) < top_p)


def _sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row: greedy, or temperature/top-p with each row's own generator."""
    if params.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    # One uniform draw per row from that row's generator: the row's stream is independent
    # of which other rows share the batch.
    u = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators])
    u = u.to(probs.device)
    if params.top_p >= 1.0:
        return _inverse_cdf(probs, u)
    # Sorting a 49k vocabulary per step costs more than the rest of sampling; the nucleus
    # lies inside the top-k prefix whenever that prefix already holds top_p of the mass, so
    # only rows where it doesn't pay for a full sort. The choice is made per row, from the
    # row's own probabilities, so it doesn't depend on the batch either.
    k = min(NUCLEUS_PREFIX, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)
    picks = order.gather(-1, _inverse_cdf(_nucleus(top, params.top_p), u).unsqueeze(-1))
    picks = picks.squeeze(-1)
    short = (top.sum(-1) < params.top_p).nonzero().squeeze(-1)
    if len(short):
        full, full_order = probs[short].sort(dim=-1, descending=True)
        pick = _inverse_cdf(_nucleus(full, params.top_p), u[short])
        picks[short] = full_order.gather(-1, pick.unsqueeze(-1)).squeeze(-1)
    return picks


class TransformersBackend(LocalModelBackend):
    """A Hugging Face causal LM served in-process with a KV-cached decode loop.

    Args:
        model: hub id, local folder or ``.gguf`` file (see :func:`resolve_model`).
        device: ``"auto"`` (CUDA if present, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"`` (bf16 on GPUs that support it, else fp16; fp32 on CPU, where it
            keeps greedy output independent of batch size), or ``"float32"`` /
            ``"bfloat16"`` / ``"float16"``.
        batch_size: rows (conversation x completion) decoded together.
        score_batch_size: prompts per forward pass in :meth:`score_choices`. The default 1
            makes judge log-probs independent of how requests were batched (a float32 forward
            over a batch of another shape rounds 1-2 ulp differently), so preference margins
            are byte-identical across batch sizes and after a resume. Larger values are faster
            on some machines and give scores that differ in their last digits.
        trust_remote_code: allow models with their own Python code.
        revision: hub branch, tag or commit.
        num_threads: torch CPU threads (process-wide); None picks :func:`cpu_threads` when
            running on CPU.
        prefix_cache_mb: memory for the KV of shared prompt prefixes (see the module notes);
            0 turns prefix reuse off (each prompt is then one forward, as before).
    """

    name = "transformers"
    reuses_prefixes = True

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        batch_size: int = 16,
        score_batch_size: int = 1,
        trust_remote_code: bool = False,
        revision: str | None = None,
        num_threads: int | None = None,
        prefix_cache_mb: float = 256,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ModelError("batch_size must be >= 1", field="batch_size")
        if score_batch_size < 1:
            raise ModelError("score_batch_size must be >= 1", field="score_batch_size")
        if not prefix_cache_mb >= 0:
            raise ModelError("prefix_cache_mb must be >= 0", field="prefix_cache_mb")
        self.prefix_kv = _PrefixKV(int(prefix_cache_mb * (1 << 20)))
        self.resolved = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model_id = model
        self.model_revision = self.resolved.revision
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.score_batch_size = score_batch_size
        if num_threads or self.device.type == "cpu":
            torch.set_num_threads(num_threads or cpu_threads())
        path = self.resolved.path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
            self.model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            msg = " ".join(str(exc).split())[:200]
            raise ModelError(f"cannot load model '{model}' from '{path}': {msg}") from exc
        if not self.tokenizer.chat_template:
            raise ModelError(f"model '{model}' has no chat template; use an instruct/chat model")
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        if not eos:
            raise ModelError(f"model '{model}' defines no end-of-sequence token")
        self.eos_ids = frozenset(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else eos[0]
        self._max_context = getattr(self.model.config, "max_position_embeddings", None)
        self._splittable = self._plain_kv_cache()
        log.info(
            "loaded %s (%s) on %s as %s, %d CPU threads",
            model,
            self.model_revision,
            self.device,
            self.dtype,
            torch.get_num_threads(),
        )

    # -- helpers ---------------------------------------------------------------------------

    def _live(self) -> Any:
        if self.model is None:
            raise BackendError("the transformers backend is closed")
        return self.model

    def _plain_kv_cache(self) -> bool:
        """True if every layer keeps a plain, growing KV cache (no sliding window, no
        recurrent state), so a prefix's cache can be stored and continued from."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        try:
            layers = DynamicCache(config=self.model.config).layers
        except Exception:  # an unusual cache layout: do not split
            return False
        return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def _split_at(self, conversation: Conversation, ids: list[int], hint: PrefixHint | None) -> int:
        """Prompt tokens before the hinted point (0: no split), from the request alone.

        The hint is located by rendering the prompt with a marker character at that point;
        the split follows the last line break before it (tokens can merge across the point
        differently in each sibling, not across a line break). No split when the marker
        cannot be placed, the tokens differ from the prompt's, or the prefix is short.
        """
        if hint is None or not self._splittable or self.prefix_kv.max_bytes == 0:
            return 0
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
            text = self.tokenizer.apply_chat_template(
                marked, add_generation_prompt=True, tokenize=False
            )
            at = text.find(_MARK)
            if at < 0 or text.count(_MARK) != 1:
                return 0
            plain = text.replace(_MARK, "")
            enc = self.tokenizer(plain, add_special_tokens=False, return_offsets_mapping=True)
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

    def _forward_tail(self, seq: list[int], split: int, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions of ``seq`` (one row, no padding): one
        forward, or with ``split`` > 0 the prefix's KV (cached or computed now) + the rest."""
        from transformers import DynamicCache

        model, dev = self._live(), self.device
        if split == 0:
            ids, mask, pos = _left_pad([seq], self.pad_id, dev)
            return model(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep
            ).logits[0]
        key = self.prefix_kv.key(seq[:split])
        kv = self.prefix_kv.get(key)
        if kv is None:
            cache = DynamicCache(config=model.config)
            _prefill(model, *_left_pad([seq[:split]], self.pad_id, dev), cache)
            kv = tuple((layer.keys, layer.values) for layer in cache.layers)
            self.prefix_kv.put(key, kv)
        else:
            self.prefix_kv.reused_tokens += split
        cache = DynamicCache(config=model.config)
        for layer, (k, v) in enumerate(kv):
            cache.update(k, v, layer)  # copies: the stored tensors stay as they were
        n = len(seq)
        return model(
            input_ids=torch.tensor([seq[split:]], device=dev),
            attention_mask=torch.ones((1, n), dtype=torch.long, device=dev),
            position_ids=torch.arange(split, n, device=dev).unsqueeze(0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits[0]

    def _stopped(self, tokens: list[int], stop: tuple[str, ...], window: int) -> bool:
        # A stop string of k characters spans at most k (+ partial-UTF-8) tokens.
        tail = self.tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    def _decode_rows(
        self, prompts: list[list[int]], seeds: list[int], params: SamplingParams
    ) -> list[tuple[list[int], str]]:
        """Decode one batch; return (generated ids without EOS, finish_reason) per row."""
        from transformers import DynamicCache

        model = self._live()
        dev = self.device
        ids, mask, pos = _left_pad(prompts, self.pad_id, dev)
        ctx = self._max_context or 1 << 62
        limits = [min(params.max_new_tokens, ctx - len(p)) for p in prompts]
        stop = tuple(s for s in params.stop if s)
        window = max((len(s) for s in stop), default=0) + 4
        generators = []
        if not params.greedy:
            generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        cache = DynamicCache(config=model.config)
        logits = _prefill(model, ids, mask, pos, cache).logits[:, -1, :]
        next_pos = pos[:, -1] + 1
        active = list(range(len(prompts)))
        tokens: list[list[int]] = [[] for _ in prompts]
        finish = ["length"] * len(prompts)
        while active:
            picked = _sample(logits, params, generators).tolist()
            keep = []
            for k, row in enumerate(active):
                tok = picked[k]
                tokens[row].append(tok)  # an EOS is counted, and left out of the text later
                if tok in self.eos_ids or (stop and self._stopped(tokens[row], stop, window)):
                    finish[row] = "stop"
                elif len(tokens[row]) < limits[row]:
                    keep.append(k)
            if not keep:
                break
            if len(keep) < len(active):
                # Drop finished rows so later steps only pay for rows still going.
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                active = [active[k] for k in keep]
                generators = [generators[k] for k in keep] if generators else []
                picked = [picked[k] for k in keep]
            step_ids = torch.tensor(picked, device=dev).unsqueeze(-1)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            out = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=next_pos.unsqueeze(-1),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        return list(zip(tokens, finish, strict=True))

    def _text(self, tokens: list[int], stop: tuple[str, ...]) -> str:
        if tokens and tokens[-1] in self.eos_ids:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s and s in text]
        return text[: min(cuts)] if cuts else text

    # -- Backend API -----------------------------------------------------------------------

    def generate(
        self, conversations: list[Conversation], params: SamplingParams
    ) -> list[list[Completion]]:
        """Return ``params.n`` completions per conversation, in input order.

        Args:
            conversations: chat conversations.
            params: sampling parameters.

        Returns:
            One list of ``params.n`` completions per conversation.

        Raises:
            BackendError: a prompt does not fit the context, or its chat template fails.
        """
        if not conversations:
            return []
        prompts = self._prompts(conversations, reserve=1)
        # Greedy completions are all the same: decode each conversation once.
        rows = [
            (i, j) for i in range(len(prompts)) for j in range(1 if params.greedy else params.n)
        ]
        # Longest first: similar lengths share a batch (less padding), and the memory peak
        # comes first, so a too-big batch fails early.
        rows.sort(key=lambda r: -len(prompts[r[0]]))
        done: dict[tuple[int, int], tuple[list[int], str]] = {}
        with torch.inference_mode():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                outs = self._decode_rows(
                    [prompts[i] for i, _ in chunk], [params.seed + j for _, j in chunk], params
                )
                done.update(zip(chunk, outs, strict=True))
        result = []
        for i, prompt in enumerate(prompts):
            row = []
            for j in range(params.n):
                tokens, finish = done[(i, 0 if params.greedy else j)]
                text = self._text(tokens, params.stop)
                row.append(Completion(text, len(prompt), len(tokens), finish))
            result.append(row)
        return result

    def score_choices(
        self,
        conversations: list[Conversation],
        choices: list[str],
        prefixes: Sequence[PrefixHint | None] | None = None,
    ) -> list[ChoiceScores]:
        """Log-probability of each choice string as the start of the assistant's reply.

        Single-token choices (the judge's "A" / "B") cost one forward pass over the prompts;
        longer choices one forward over prompt + choice per (conversation, choice). Forwards
        take ``score_batch_size`` rows (default 1: batch-shape independent scores). With one
        row per forward, ``prefixes`` (one :data:`PrefixHint` or None per conversation) lets
        prompts that share a prefix compute it once (see the module notes).

        Raises:
            BackendError: no choices, an empty choice, or a prompt that doesn't fit.
        """
        if not choices:
            raise BackendError("score_choices needs at least one choice")
        cids = {c: choice_ids(self.tokenizer, c) for c in choices}
        empty = [c for c, t in cids.items() if not t]
        if empty:
            raise BackendError(f"choice {empty[0]!r} has no tokens")
        if not conversations:
            return []
        if prefixes is not None and len(prefixes) != len(conversations):
            raise BackendError(
                f"{len(prefixes)} prefix hints for {len(conversations)} conversations"
            )
        longest = max(len(t) for t in cids.values())
        prompts = self._prompts(conversations, reserve=longest)
        if self.score_batch_size == 1:
            with torch.inference_mode():
                scores = self._score_one_by_one(conversations, prompts, cids, prefixes)
        else:
            with torch.inference_mode():
                scores = self._score_batched(prompts, cids)
        return [
            ChoiceScores(logprobs={c: s[c] for c in cids}, prompt_tokens=len(p))
            for s, p in zip(scores, prompts, strict=True)
        ]

    def _score_one_by_one(
        self,
        conversations: list[Conversation],
        prompts: list[list[int]],
        cids: dict[str, list[int]],
        prefixes: Sequence[PrefixHint | None] | None,
    ) -> list[dict[str, float]]:
        hints = prefixes or [None] * len(prompts)
        splits = [
            self._split_at(c, p, h) for c, p, h in zip(conversations, prompts, hints, strict=True)
        ]
        # Prompts with the same prefix one after another, so the LRU holds what is reused.
        order = sorted(range(len(prompts)), key=lambda i: (prompts[i][: splits[i]], i))
        longest = max(len(t) for t in cids.values())
        scores: list[dict[str, float]] = [{} for _ in prompts]
        for i in order:
            if longest == 1:
                logits = self._forward_tail(prompts[i], splits[i], 1)
                logp = torch.log_softmax(logits[-1].float(), dim=-1)
                scores[i] = {c: float(logp[t[0]]) for c, t in cids.items()}
                continue
            for c, toks in cids.items():
                # The last longest+1 positions hold the logits that predict the choice.
                keep = longest + 1
                logits = self._forward_tail(prompts[i] + toks, splits[i], keep)[-keep:]
                logp = torch.log_softmax(logits.float(), dim=-1)
                first = keep - 1 - len(toks)
                at = torch.arange(first, first + len(toks), device=logp.device)
                scores[i][c] = float(logp[at, torch.tensor(toks, device=logp.device)].sum())
        return scores

    def _score_batched(
        self, prompts: list[list[int]], cids: dict[str, list[int]]
    ) -> list[dict[str, float]]:
        """``score_batch_size`` prompts per forward (no prefix reuse)."""
        longest = max(len(t) for t in cids.values())
        scores: list[dict[str, float]] = [{} for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        if longest == 1:
            vocab_ids = torch.tensor([cids[c][0] for c in cids], device=self.device)
            for start in range(0, len(order), self.score_batch_size):
                chunk = order[start : start + self.score_batch_size]
                ids, mask, pos = _left_pad([prompts[i] for i in chunk], self.pad_id, self.device)
                out = self._live()(
                    input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=1
                )
                logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)
                picked = logp[:, vocab_ids].tolist()
                for i, values in zip(chunk, picked, strict=True):
                    scores[i] = dict(zip(cids, values, strict=True))
            return scores
        pairs = [(i, c) for i in order for c in cids]
        for start in range(0, len(pairs), self.score_batch_size):
            chunk = pairs[start : start + self.score_batch_size]
            seqs = [prompts[i] + cids[c] for i, c in chunk]
            ids, mask, pos = _left_pad(seqs, self.pad_id, self.device)
            # Rows end together (left padding), so the logits that predict each row's choice
            # tokens are among the last longest+1 positions.
            keep = longest + 1
            out = self._live()(
                input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep
            )
            logp = torch.log_softmax(out.logits.float(), dim=-1)
            for r, (i, c) in enumerate(chunk):
                toks = cids[c]
                first = keep - 1 - len(toks)
                at = torch.arange(first, first + len(toks), device=logp.device)
                tok_t = torch.tensor(toks, device=logp.device)
                scores[i][c] = float(logp[r, at, tok_t].sum())
        return scores

    def reset_prefix_cache(self) -> None:
        """Drop every cached judge prefix KV (``prefix_cache_mb`` stays as set)."""
        self.prefix_kv.clear()

    def close(self) -> None:
        """Drop the model and free its memory (CPU RAM and, on GPU, the CUDA cache)."""
        if getattr(self, "model", None) is None:
            return
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
