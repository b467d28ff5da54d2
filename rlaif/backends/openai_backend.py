"""The OpenAI-compatible backend: any server that speaks ``/v1/chat/completions``.

vLLM's ``vllm serve``, llama.cpp's server, TGI and hosted APIs answer the same JSON, so one
client covers them. This module holds the request format and the options; the HTTP layer
(keep-alive per thread, retries, masking) is :mod:`rlaif.backends.http_transport`.

* **Retries**: connection errors, timeouts, HTTP 408/409/429/5xx are retried ``max_retries``
  times with exponential backoff and full jitter (``Retry-After`` honoured). Records are
  written by the store after a call returns, keyed by content, so a retry never duplicates one.
* **Whose fault**: another 4xx is the request's (e.g. a prompt longer than the context):
  :class:`BackendError`, which the caller isolates to that request. An unreachable server,
  a 429/502/503/504 that outlasts the retries, a refused key (401/403) or an unknown model
  (404) is the run's: :class:`ModelError` stops the run cleanly and a resume continues.
* **Seeds**: completion ``j`` is its own request with ``seed + j``; greedy is asked once.
* **Choice scores** (the judge's log-prob mode): one ``max_tokens=1`` request per
  conversation. On vLLM the choices go through its ``/tokenize`` and their exact log-probs
  come from ``logprob_token_ids``; elsewhere from ``top_logprobs`` (a choice missing there is
  an error for that request, never a guess). A server with no log-probs at all stops the run
  with a pointer to ``stages.judge.mode: reasoning``: no silent switch, since the mode decides
  the judge's prompt and is part of every verdict's provenance.
* **Secrets**: the key goes only into the ``Authorization`` header; never into
  ``describe()``, logs or errors (masked should a server echo it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from rlaif.backends.base import Backend, ChoiceScores, Completion, Conversation, SamplingParams
from rlaif.backends.http_transport import HttpClient
from rlaif.errors import BackendError, ModelError

log = logging.getLogger(__name__)

_SCORE_MODES = ("auto", "token_ids", "top")
_MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit, and vLLM's default --max-logprobs


@dataclass
class Usage:
    """Token usage (the answers' ``usage`` fields) and request counts over the backend's life:
    ``requests`` answered, ``retries`` of failed attempts, ``failures`` for good."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failures: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class OpenAIBackend(Backend):
    """A model behind an OpenAI-compatible HTTP server.

    Args:
        model: the model name the server knows (vLLM: ``--served-model-name``).
        base_url: e.g. ``http://127.0.0.1:8000/v1``; default ``$OPENAI_BASE_URL``. A URL with
            no path gets ``/v1``.
        api_key: bearer token; default the variable named by ``api_key_env``, else
            ``$OPENAI_API_KEY``, else none (local servers started without ``--api-key``).
        api_key_env: name of the environment variable holding the key.
        revision: what to record as the model's revision (the server does not say).
        trust_remote_code: accepted for a uniform config; the server decides.
        max_concurrency: requests in flight at once.
        timeout: seconds to wait for an answer (read timeout).
        connect_timeout: seconds to wait for a connection.
        max_retries: retries of a request after the first attempt.
        backoff: first retry delay in seconds; doubles each retry (full jitter).
        max_backoff: cap on one delay.
        max_context: the model's context in tokens; default what ``/models`` reports
            (vLLM's ``max_model_len``), else unknown.
        scores: how to score choices: ``"auto"`` (exact ``logprob_token_ids`` when the server
            has vLLM's ``/tokenize``, else ``"top"``), ``"token_ids"`` or ``"top"``.
        top_logprobs: how many top tokens to read in ``"top"`` mode.
        extra_body: more JSON fields for every chat request (e.g. ``{"top_k": 20}``).
        headers: more HTTP headers (e.g. an organization id).

    Attributes:
        usage: :class:`Usage` so far (tokens from the answers' ``usage``, requests, retries).

    Raises:
        ModelError: no base URL, an unset key variable, bad options, or a server that
            cannot be reached or refuses the key.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_context: int | None = None,
        scores: str = "auto",
        top_logprobs: int = _MAX_TOP_LOGPROBS,
        extra_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        del trust_remote_code  # the server loads the model, not us
        if not model or not str(model).strip():
            raise ModelError("no model name given", field="model.id")
        url = base_url or os.environ.get("OPENAI_BASE_URL")
        if not url:
            raise ModelError(
                "backend 'openai' needs a server: set model.options.base_url "
                "(e.g. http://127.0.0.1:8000/v1) or OPENAI_BASE_URL",
                field="model.options.base_url",
            )
        parts = urllib.parse.urlsplit(str(url).strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ModelError(
                "base_url must be an http:// or https:// URL", field="model.options.base_url"
            )
        if parts.path in ("", "/"):
            parts = parts._replace(path="/v1")
        if api_key is None and api_key_env:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ModelError(
                    f"environment variable {api_key_env} (api_key_env) is not set",
                    field="model.options.api_key_env",
                )
        if api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY") or None
        checks = [
            ("max_concurrency", max_concurrency >= 1),
            ("timeout", timeout > 0),
            ("connect_timeout", connect_timeout > 0),
            ("max_retries", max_retries >= 0),
            ("backoff", backoff >= 0 and max_backoff >= 0),
            ("top_logprobs", 1 <= top_logprobs <= _MAX_TOP_LOGPROBS),
        ]
        for name, ok in checks:
            if not ok:
                raise ModelError("out of range", field=f"model.options.{name}")
        if scores not in _SCORE_MODES:
            raise ModelError(
                f"'{scores}' is not one of {', '.join(_SCORE_MODES)}", field="model.options.scores"
            )
        self.model_id = str(model).strip()
        self.model_revision = revision
        self.max_concurrency = max_concurrency
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.scores = scores
        self.top_logprobs = top_logprobs
        self.extra_body = dict(extra_body or {})
        self.usage = Usage()
        self._http = HttpClient(
            parts,
            model=self.model_id,
            api_key=api_key,
            headers=headers,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            max_retries=max_retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            counters=self.usage,
        )
        self.base_url = self._http.base_url
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="rlaif-openai"
        )
        self._token_ids: dict[str, list[int]] | None = {} if scores != "top" else None
        # Answers of requests that succeeded in a batch that failed as a whole: the caller
        # re-sends those requests while isolating the bad one, and they come from here.
        self._kept: dict[str, dict[str, Any]] = {}
        self._max_context = max_context if max_context is not None else self._probe_models()

    # -- requests ------------------------------------------------------------------------------

    def _probe_models(self) -> int | None:
        """Check the server answers; return the model's context length if it says."""
        try:
            listing = self._http.request("GET", "/models", None)
        except BackendError:  # e.g. a server without /models: generation may still work
            return None
        except ModelError as exc:
            if getattr(exc, "status", None) == 404:
                return None
            raise
        for entry in listing.get("data") or []:
            if isinstance(entry, dict) and entry.get("id") == self.model_id:
                length = entry.get("max_model_len")
                return int(length) if isinstance(length, int) and length > 0 else None
        return None

    def _map(self, fn: Any, jobs: list[Any]) -> list[Any]:
        """``fn`` over ``jobs`` on the pool; the worst failure (ModelError first) is raised
        after every job has finished, so no request is left running in the background."""
        if self._pool is None:
            raise BackendError("the openai backend is closed")
        futures = [self._pool.submit(fn, job) for job in jobs]
        results, errors = [], []
        for fut in futures:
            try:
                results.append(fut.result())
            except Exception as exc:
                results.append(None)
                errors.append(exc)
        if errors:
            raise next((e for e in errors if isinstance(e, ModelError)), errors[0])
        return results

    def _chat(self, payload: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(payload, sort_keys=True)
        with self._lock:
            kept = self._kept.pop(key, None)
        if kept is not None:
            return kept
        answer = self._http.request("POST", "/chat/completions", payload)
        usage = answer.get("usage") or {}
        with self._lock:
            self.usage.requests += 1
            self.usage.prompt_tokens += _int(usage.get("prompt_tokens"))
            self.usage.completion_tokens += _int(usage.get("completion_tokens"))
        return answer

    def _chat_all(self, payloads: list[dict[str, Any]], parse: Any) -> list[Any]:
        """Send every payload; ``parse(index, answer)`` each answer, in input order.

        When some request fails, the caller will split the batch and send the rest again:
        the answers that parsed are kept for those repeats instead of asking the server twice.
        """
        answers: dict[int, dict[str, Any]] = {}

        def one(i: int) -> Any:
            answer = self._chat(payloads[i])
            result = parse(i, answer)
            answers[i] = answer
            return result

        try:
            return self._map(one, list(range(len(payloads))))
        except BackendError:
            with self._lock:
                if len(self._kept) > 4096:  # bounded: forget answers nobody asked for again
                    self._kept.clear()
                for i, answer in answers.items():
                    self._kept[json.dumps(payloads[i], sort_keys=True)] = answer
            raise

    def _payload(self, conversation: Conversation, **fields: Any) -> dict[str, Any]:
        go_on = {}
        if conversation and conversation[-1].get("role") == "assistant":
            # continue the final assistant message (RLCD's affix); vLLM's server reads these
            # two fields, other servers may ignore them and start a new message
            go_on = {"continue_final_message": True, "add_generation_prompt": False}
        return {
            **self.extra_body,
            "model": self.model_id,
            "messages": [{"role": m["role"], "content": m["content"]} for m in conversation],
            **go_on,
            **fields,
        }

    # -- Backend API -----------------------------------------------------------------------

    def generate(
        self, conversations: list[Conversation], params: SamplingParams
    ) -> list[list[Completion]]:
        """Return ``params.n`` completions per conversation, in input order.

        Args:
            conversations: chat conversations.
            params: sampling parameters; completion ``j`` is sampled with ``seed + j``.

        Returns:
            One list of ``params.n`` completions per conversation.

        Raises:
            BackendError: a request the server rejects (e.g. longer than the context).
            ModelError: the server is gone (after retries) or refuses the key or model.
        """
        if not conversations:
            return []
        stop = [s for s in params.stop if s]
        rows = [
            (i, j)
            for i in range(len(conversations))
            for j in range(1 if params.greedy else params.n)
        ]
        payloads = []
        for i, j in rows:
            fields: dict[str, Any] = {
                "max_tokens": params.max_new_tokens,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "n": 1,
            }
            if stop:
                fields["stop"] = stop
            if not params.greedy:
                fields["seed"] = params.seed + j
            payloads.append(self._payload(conversations[i], **fields))
        comps = self._chat_all(payloads, lambda k, a: self._completion(rows[k][0], a, stop))
        done = dict(zip(rows, comps, strict=True))
        # Greedy rows were asked once; copies keep callers free to mutate their own.
        return [
            [replace(done[(i, 0 if params.greedy else j)]) for j in range(params.n)]
            for i in range(len(conversations))
        ]

    def _completion(self, index: int, answer: dict[str, Any], stop: list[str]) -> Completion:
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise BackendError(f"request {index}: the server's answer has no message") from None
        reason = choice.get("finish_reason") or "stop"
        if reason == "content_filter":
            raise BackendError(f"request {index}: the server's content filter stopped the reply")
        # Servers differ on stop strings (some keep the matched one): cut as the local
        # backends do, before the first occurrence.
        cuts = [text.find(s) for s in stop if s in text]
        usage = answer.get("usage") or {}
        return Completion(
            text[: min(cuts)] if cuts else text,
            _int(usage.get("prompt_tokens")),
            _int(usage.get("completion_tokens")),
            "length" if reason == "length" else "stop",
        )

    def score_choices(
        self, conversations: list[Conversation], choices: list[str]
    ) -> list[ChoiceScores]:
        """Log-probability of each choice as the assistant's first token.

        Args:
            conversations: chat conversations.
            choices: option strings, each one token of the served model (e.g. ``"A"``).

        Returns:
            One :class:`ChoiceScores` per conversation, keyed by choice.

        Raises:
            BackendError: no choices, a multi-token choice, or a choice not among the
                server's top tokens for that request.
            ModelError: the server returns no log-probabilities (use the judge's reasoning
                mode), or is gone.
        """
        if not choices or any(not c for c in choices):
            raise BackendError("score_choices needs non-empty choices")
        if not conversations:
            return []
        ids = self._choice_token_ids(choices)
        fields: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "logprobs": True}
        if ids is not None:
            fields["logprob_token_ids"] = sorted(set(ids.values()))
            fields["return_tokens_as_token_ids"] = True
        else:
            fields["top_logprobs"] = self.top_logprobs
        return self._chat_all(
            [self._payload(c, **fields) for c in conversations],
            lambda i, a: self._scores(i, a, choices, ids),
        )

    def _choice_token_ids(self, choices: list[str]) -> dict[str, int] | None:
        """Choice -> its one token id via the server's ``/tokenize`` (vLLM), or None when
        scores are read from ``top_logprobs``."""
        if self._token_ids is None:
            return None
        for c in choices:
            if c in self._token_ids:
                continue
            try:
                answer = self._http.request(
                    "POST",
                    "/tokenize",
                    {"model": self.model_id, "prompt": c, "add_special_tokens": False},
                    root=True,
                )
            except (BackendError, ModelError) as exc:
                # Only "no such endpoint / request not understood" means a server without
                # vLLM's /tokenize; a server that is gone or refuses the key stops the run.
                unknown = getattr(exc, "status", None) in (400, 404, 405, 422)
                if self.scores == "token_ids" or not unknown:
                    raise
                answer = {}
            tokens = answer.get("tokens")
            if not (isinstance(tokens, list) and tokens and all(type(t) is int for t in tokens)):
                if self.scores == "token_ids":
                    raise BackendError(f"server {self.base_url}: /tokenize gave no token ids")
                log.info("no vLLM /tokenize at %s: reading top_logprobs", self.base_url)
                self._token_ids = None
                return None
            self._token_ids[c] = tokens
        multi = next((c for c in choices if len(self._token_ids[c]) != 1), None)
        if multi is not None:
            raise BackendError(
                f"choice {multi!r} is {len(self._token_ids[multi])} tokens; the openai backend "
                "scores one-token choices only"
            )
        return {c: self._token_ids[c][0] for c in choices}

    def _scores(
        self, index: int, answer: dict[str, Any], choices: list[str], ids: dict[str, int] | None
    ) -> ChoiceScores:
        try:
            content = answer["choices"][0].get("logprobs") or {}
            first = (content.get("content") or [None])[0]
        except (KeyError, IndexError, TypeError, AttributeError):
            first = None
        if not isinstance(first, dict):
            raise ModelError(
                f"server {self.base_url} returned no log-probabilities for model "
                f"'{self.model_id}'; set stages.judge.mode: reasoning",
                field="stages.judge.mode",
            )
        top: dict[str, float] = {}
        for entry in [first, *(first.get("top_logprobs") or [])]:
            if isinstance(entry, dict) and isinstance(entry.get("token"), str):
                lp = entry.get("logprob")
                if isinstance(lp, (int, float)):
                    # vLLM clamps -inf to -9999 for JSON: that is "impossible".
                    top[entry["token"]] = -math.inf if lp <= -9999 else float(lp)
        want = {c: (f"token_id:{ids[c]}" if ids is not None else c) for c in choices}
        missing = [c for c in choices if want[c] not in top]
        if missing:
            where = "in the answer" if ids is not None else f"among the top {self.top_logprobs}"
            raise BackendError(
                f"request {index}: choice {missing[0]!r} is not {where} tokens; "
                "is it one token of this model?"
            )
        usage = answer.get("usage") or {}
        return ChoiceScores(
            logprobs={c: top[want[c]] for c in choices},
            prompt_tokens=_int(usage.get("prompt_tokens")),
        )

    @property
    def max_context(self) -> int | None:
        return self._max_context

    def describe(self) -> dict[str, Any]:
        """Provenance: backend, model, revision and the server (never the key)."""
        return {
            "backend": self.name,
            "model": self.model_id,
            "revision": self.model_revision,
            "base_url": self.base_url,
        }

    def close(self) -> None:
        """Stop the worker threads; requests in flight finish first."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._http.close()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
