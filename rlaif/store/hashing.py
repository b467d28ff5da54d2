"""Canonical JSON and the content hashes built on it: record ids and model-call cache keys.

A hash is only useful if the same content always gives the same bytes. ``canonical_json``
therefore fixes every choice ``json.dumps`` leaves open: keys are sorted, there is no
whitespace, text is written as UTF-8 rather than ``\\u`` escapes, tuples become lists, and
numbers that compare equal in Python (``1 == 1.0``, ``0.0 == -0.0``) are written the same way.
Non-finite floats (NaN, Infinity) have no JSON form, so they are rejected with the path of the
offending value instead of being written in a form other tools cannot read.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any

from rlaif.errors import StoreError
from rlaif.store.jsonenc import compact_encoder, encode_str

__all__ = [
    "RECORD_ID_HEX",
    "CanonicalJSONError",
    "Encoded",
    "cache_key",
    "canonical_json",
    "content_hash",
    "plain_fields",
    "record_id",
]

# 24 hex chars = 96 bits. For n ids the chance of any collision is about n**2 / 2**97:
# ~6e-18 at a million records and ~6e-12 at a billion, far below the odds of a disk error.
RECORD_ID_HEX = 24

# Floats beyond 2**53 are not exact integers, so only smaller ones are folded to int form.
_EXACT_INT_LIMIT = 2**53

# Parameters that decide *how* a call is executed, never *what* it returns. They are dropped
# from cache keys so that re-running with another batch size or device still hits the cache.
_EXECUTION_ONLY_PARAMS = frozenset(
    {"batch_size", "device", "num_workers", "workers", "max_batch_tokens"}
)


# Sorted keys, no whitespace, UTF-8 text, no NaN. Given only what ``_plain`` returns: a fresh
# tree (a value that contains itself fails there, with RecursionError).
_CANONICAL = compact_encoder(sort_keys=True)


class CanonicalJSONError(StoreError, ValueError):
    """A value cannot be written as canonical JSON (NaN, Infinity, or a non-JSON type)."""


def _normalize(obj: Any, path: str) -> Any:
    """Return ``obj`` as plain JSON types, folding equal numbers to one form."""
    # bool before int: bool is an int subclass, but JSON keeps true/false apart from 1/0.
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str.__str__(obj)  # plain str for str subclasses (e.g. str enums)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise CanonicalJSONError(
                f"{obj!r} at {path} has no JSON form; use null or a string instead"
            )
        if obj.is_integer() and abs(obj) < _EXACT_INT_LIMIT:
            return int(obj)
        return float(obj)
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                # json would turn 1 into "1" and make {1: a} and {"1": a} hash alike.
                raise CanonicalJSONError(
                    f"key {key!r} at {path} is a {type(key).__name__}; JSON keys must be strings"
                )
            out[str.__str__(key)] = _normalize(value, f"{path}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalize(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Encoded):
        return json.loads(obj.text)
    raise CanonicalJSONError(f"value at {path} is a {type(obj).__name__}, which is not JSON")


# Exact types whose values canonical JSON keeps as they are (subclasses go the long way).
_KEPT = frozenset({str, int, bool, type(None)})


def _plain(obj: Any) -> Any:
    """:func:`_normalize` without the paths (building them for every value was most of its
    cost): exact JSON types are handled inline, anything else by :func:`_normalize` itself.
    Raises :class:`CanonicalJSONError` (without a useful path) where ``_normalize`` would;
    the caller re-walks to name the path."""
    t = type(obj)
    if t in _KEPT:
        return obj
    if t is dict:
        out = {}
        for key, value in obj.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise CanonicalJSONError("non-string key")
                key = str.__str__(key)
            out[key] = value if type(value) in _KEPT else _plain(value)
        return out
    if t is list or t is tuple:
        return [v if type(v) in _KEPT else _plain(v) for v in obj]
    if t is float:
        if obj - obj != 0.0:  # NaN or +-inf (for a finite x, x - x is 0.0)
            raise CanonicalJSONError("non-finite float")
        if obj.is_integer() and -_EXACT_INT_LIMIT < obj < _EXACT_INT_LIMIT:
            return int(obj)
        return obj
    if t is Encoded:
        raise _Splice
    return _normalize(obj, "$")


class _Splice(Exception):
    """``_plain`` met an :class:`Encoded` part: the value is written by ``_compose``."""


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` to the one canonical JSON text used for hashing.

    Args:
        obj: dicts with string keys, lists, tuples, str, int, float, bool and None, and
            :class:`Encoded` values (written as the values they encode).

    Returns:
        Compact JSON with sorted keys and unescaped Unicode.

    Raises:
        CanonicalJSONError: for NaN / Infinity, non-string keys or non-JSON types; the
            message names the path of the value (e.g. ``$.params.temperature``).
    """
    if type(obj) is list:
        chat = _chat_json(obj)
        if chat is not None:
            return chat
    try:
        plain = _plain(obj)
    except CanonicalJSONError:
        plain = _normalize(obj, "$")  # raises again, naming the path of the value
    except RecursionError:
        raise CanonicalJSONError("the value contains itself (or nests too deep)") from None
    except _Splice:
        try:
            return _compose(obj)
        except CanonicalJSONError:
            _normalize(obj, "$")  # raises again, naming the path of the value
            raise
    return _CANONICAL(plain)


def _chat_json(messages: list) -> str | None:
    """``canonical_json`` of chat messages (dicts of exactly a string ``role`` and
    ``content``: every request a run hashes), written directly; None for anything else."""
    parts = []
    for m in messages:
        if type(m) is not dict or len(m) != 2:
            return None
        content, role = m.get("content"), m.get("role")
        if type(content) is not str or type(role) is not str:
            return None
        parts.append(f'{{"content":{encode_str(content)},"role":{encode_str(role)}}}')
    return "[" + ",".join(parts) + "]"


class Encoded:
    """A value already written as canonical JSON, to be placed as it is inside a larger value.

    The canonical JSON of a dict or list is its parts' canonical JSON joined (keys sorted, no
    whitespace), so a value hashed in several places (a request's messages: once for its cache
    key, again inside its judge record's id) is encoded once and spliced; the hashes are the
    same as if the value itself were there.
    """

    __slots__ = ("text",)

    def __init__(self, value: Any) -> None:
        self.text = canonical_json(value)


def _compose(obj: Any) -> str:
    """``canonical_json`` of ``obj`` where :class:`Encoded` parts are spliced in as written."""
    t = type(obj)
    if t is str:
        return encode_str(obj)
    if t is Encoded:
        return obj.text
    if t is dict:
        for key in obj:
            if type(key) is not str:
                obj = _str_keys(obj)
                break
        return "{" + ",".join([f"{encode_str(k)}:{_compose(obj[k])}" for k in sorted(obj)]) + "}"
    if t is list or t is tuple:
        return "[" + ",".join([_compose(v) for v in obj]) + "]"
    if obj is None:
        return "null"
    if t is bool:
        return "true" if obj else "false"
    if t is int:
        return int.__repr__(obj)
    return _CANONICAL(_plain(obj))


def _str_keys(obj: dict) -> dict:
    """``obj`` with str-subclass keys as plain str; any other key is an error (named by the
    caller's walk)."""
    if not all(isinstance(key, str) for key in obj):
        raise CanonicalJSONError("non-string key")
    return {str.__str__(key): value for key, value in obj.items()}


def content_hash(obj: Any) -> str:
    """SHA-256 (hex) of ``canonical_json(obj)`` encoded as UTF-8."""
    # surrogatepass: a lone surrogate in user text must still hash, not crash the run.
    data = canonical_json(obj).encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


# Types whose values asdict (through copy.deepcopy) returns as they are.
_ATOMIC = frozenset({str, int, float, bool, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


@dataclass
class _Box:
    value: Any


def plain_fields(obj: Any) -> Any:
    """``dataclasses.asdict(obj)``, the same dicts and values, several times faster.

    Records hash and store verdicts by the thousand; ``asdict`` looks up each class's fields
    and deep-copies every string and number on each call. Here field names are looked up once
    per class and exact JSON types are returned or copied directly; any other value (a
    subclass, a set, a namedtuple) goes through ``asdict`` itself, so the result never differs.
    """
    t = type(obj)
    if t in _ATOMIC:
        return obj
    if t is list:
        return [v if type(v) in _ATOMIC else plain_fields(v) for v in obj]
    if t is dict:
        return {
            (k if type(k) in _ATOMIC else plain_fields(k)): (
                v if type(v) in _ATOMIC else plain_fields(v)
            )
            for k, v in obj.items()
        }
    if t is tuple:
        return tuple([plain_fields(v) for v in obj])
    names = _FIELD_NAMES.get(t)
    if names is None:
        if not is_dataclass(t):
            return asdict(_Box(obj))["value"]
        names = _FIELD_NAMES[t] = tuple(f.name for f in fields(t))
    out = {}
    for name in names:
        v = getattr(obj, name)
        out[name] = v if type(v) in _ATOMIC else plain_fields(v)
    return out


def record_id(stage: str, inputs: Mapping[str, Any]) -> str:
    """Stable id of a record: the content hash of its stage name and inputs.

    The first :data:`RECORD_ID_HEX` hex digits (96 bits) are kept; see the note on that
    constant for why collisions are not a practical concern.

    Args:
        stage: stage name, so the same inputs in two stages get different ids.
        inputs: everything the record's outputs are derived from.
    """
    return content_hash({"stage": stage, "inputs": inputs})[:RECORD_ID_HEX]


def cache_key(
    *,
    model: str,
    revision: str | None,
    messages: list[dict[str, Any]],
    params: Mapping[str, Any] | Any,
    template_hash: str | None,
    kind: str = "generate",
) -> str:
    """Key of one model call: a hash of everything that changes its output.

    Covered: the call kind (``"generate"``, ``"score_choices"``, ...), model id and revision,
    the rendered messages, all sampling params (seed included) and the template hash. Not
    covered, by design: batch size, device and worker count; any such key found in ``params``
    (``batch_size``, ``device``, ``num_workers``, ``workers``, ``max_batch_tokens``) is ignored.

    Args:
        model: model id or path, as the backend reports it.
        revision: resolved revision or weights hash; ``None`` if unknown.
        messages: the rendered chat messages sent to the model (or them :class:`Encoded`).
        params: sampling params as a mapping, or an object with ``to_dict()`` (for example
            :class:`rlaif.backends.base.SamplingParams`). For ``score_choices`` pass the choices.
        template_hash: hash of the prompt template that rendered ``messages``.
        kind: what the call does; calls of different kinds never share a key.

    Returns:
        64 hex characters (full SHA-256; cache entries are not user-facing, so no shortening).
    """
    head, tail = cache_key_frame(
        model=model, revision=revision, params=params, template_hash=template_hash, kind=kind
    )
    try:
        msgs = messages.text if type(messages) is Encoded else canonical_json(messages)
    except CanonicalJSONError:
        canonical_json({"messages": messages})  # raises again, naming $.messages...
        raise
    return key_of_frame(head, msgs, tail)


def cache_key_frame(
    *,
    model: str,
    revision: str | None,
    params: Mapping[str, Any] | Any,
    template_hash: str | None,
    kind: str = "generate",
) -> tuple[str, str]:
    """The text of a :func:`cache_key` before and after its messages.

    Every request of a stage with the same params and template shares it, so a caller that
    keys many requests builds it once and calls :func:`key_of_frame` per request; the keys
    are those of :func:`cache_key` (which is built on this).
    """
    if not isinstance(params, Mapping) and hasattr(params, "to_dict"):
        params = params.to_dict()
    if not isinstance(params, Mapping):
        raise CanonicalJSONError(f"params must be a mapping, not {type(params).__name__}")
    kept = {k: v for k, v in params.items() if k not in _EXECUTION_ONLY_PARAMS}
    # canonical_json({"v": 1, "kind": kind, "model": model, "revision": revision,
    # "messages": messages, "params": kept, "template_hash": template_hash}), written out in
    # key order: keys are hashed for every request. Bump "v" if the layout changes, so old
    # caches miss instead of lying.
    head = f'{{"kind":{_compose(kind)},"messages":'
    tail = (
        f',"model":{_compose(model)},"params":{canonical_json(kept)},'
        f'"revision":{_compose(revision)},"template_hash":{_compose(template_hash)},"v":1}}'
    )
    return head, tail


def key_of_frame(head: str, messages: str, tail: str) -> str:
    """The cache key of canonical-JSON ``messages`` in a :func:`cache_key_frame`."""
    return hashlib.sha256((head + messages + tail).encode("utf-8", "surrogatepass")).hexdigest()
