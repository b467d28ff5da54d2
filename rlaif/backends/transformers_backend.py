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
  The split, the LRU and the split forward are :mod:`rlaif.backends.prefix_cache`.
* **Context**: a prompt (plus the longest choice when scoring) that leaves no room in
  ``max_position_embeddings`` raises :class:`BackendError` naming the request index;
  generation stops with ``"length"`` when the context fills up.
"""

from __future__ import annotations

import gc
import logging
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
from rlaif.backends.prefix_cache import PrefixKV, forward_tail, plain_kv_cache, split_point
from rlaif.backends.resolve import DEFAULT_MODEL, resolve_model
from rlaif.backends.torch_utils import (
    cpu_threads,
    left_pad,
    pick_device,
    pick_dtype,
    pick_score_batch,
    prefill,
)
from rlaif.errors import BackendError, ModelError

log = logging.getLogger(__name__)

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
        score_batch_size: prompts per forward pass in :meth:`score_choices`, or ``"auto"``
            (the default): 1 on CPU, 64 on a GPU. One prompt per forward makes judge
            log-probs independent of how requests were batched (a float32 forward over a
            batch of another shape rounds 1-2 ulp differently), so preference margins are
            byte-identical across batch sizes and after a resume; larger values give scores
            that differ in their last digits. On a GPU one prompt per forward is mostly
            kernel-launch overhead (27 ms a request against 0.77 ms in batches of 64 on an
            H200); set 1 there to keep byte-identical margins at that price.
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
        score_batch_size: int | str = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        num_threads: int | None = None,
        prefix_cache_mb: float = 256,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ModelError("batch_size must be >= 1", field="batch_size")
        if not prefix_cache_mb >= 0:
            raise ModelError("prefix_cache_mb must be >= 0", field="prefix_cache_mb")
        self.prefix_kv = PrefixKV(int(prefix_cache_mb * (1 << 20)))
        self.resolved = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model_id = model
        self.model_revision = self.resolved.revision
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.score_batch_size = pick_score_batch(score_batch_size, self.device)
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
        self._splittable = plain_kv_cache(self.model.config)
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

    def _split_at(self, conversation: Conversation, ids: list[int], hint: PrefixHint | None) -> int:
        """Prompt tokens before the hinted point (0: no split); see :func:`split_point`."""
        if hint is None or not self._splittable or self.prefix_kv.max_bytes == 0:
            return 0
        return split_point(self.tokenizer, conversation, ids, hint)

    def _forward_tail(self, seq: list[int], split: int, keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions of ``seq``; see :func:`forward_tail`."""
        return forward_tail(
            self._live(),
            seq,
            split,
            keep,
            pad_id=self.pad_id,
            device=self.device,
            prefixes=self.prefix_kv,
        )

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
        ids, mask, pos = left_pad(prompts, self.pad_id, dev)
        ctx = self._max_context or 1 << 62
        limits = [min(params.max_new_tokens, ctx - len(p)) for p in prompts]
        stop = tuple(s for s in params.stop if s)
        window = max((len(s) for s in stop), default=0) + 4
        generators = []
        if not params.greedy:
            generators = [torch.Generator(device=dev).manual_seed(s) for s in seeds]
        cache = DynamicCache(config=model.config)
        logits = prefill(model, ids, mask, pos, cache).logits[:, -1, :]
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
        take ``score_batch_size`` rows (1 on CPU: batch-shape independent scores). With one
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
                ids, mask, pos = left_pad([prompts[i] for i in chunk], self.pad_id, self.device)
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
            ids, mask, pos = left_pad(seqs, self.pad_id, self.device)
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
