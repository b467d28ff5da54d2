"""Compact JSON encoders built once.

``JSONEncoder.encode`` builds its C encoder (and a closure) again on every call; for the many
small values a run writes (a cache entry, a record, a hashed request) that set-up is about a
quarter of the encoding. :func:`compact_encoder` builds the C encoder once, and checks at
import that it writes what ``JSONEncoder.encode`` writes; where the interpreter has no C
encoder, or it takes other arguments, the plain ``encode`` is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _json_encoder
from typing import Any

# Covers what the check must see written alike: key order, floats (repr, -0.0, exponents),
# big ints, escapes and non-ASCII text, nesting, null and booleans.
_PROBE = {"b": [1.5, -0.0, 1e-7, 10**20, 'é\n"\\', None, True, False], "a": {"y": [], "x": {}}}

# A str as these encoders write it (quoted, escaped, non-ASCII kept): for text built around
# an encoded value rather than through the encoder.
encode_str: Callable[[str], str] = _json_encoder.encode_basestring


def compact_encoder(*, sort_keys: bool) -> Callable[[Any], str]:
    """``encode`` of ``JSONEncoder(separators=(",", ":"), ensure_ascii=False,
    allow_nan=False, check_circular=False, sort_keys=sort_keys)``, without its per-call set-up.

    The caller's values must not contain themselves (a cycle ends in RecursionError, as with
    ``check_circular=False``). Errors are the encoder's own: ValueError for NaN / Infinity,
    TypeError for values that are not JSON.
    """
    enc = json.JSONEncoder(
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
        check_circular=False,
        sort_keys=sort_keys,
    )
    make = getattr(_json_encoder, "c_make_encoder", None)
    if make is None:
        return enc.encode
    try:
        c_encode = make(
            None, enc.default, encode_str, None, ":", ",",
            sort_keys, False, False,
        )  # fmt: skip
        if "".join(c_encode(_PROBE, 0)) != enc.encode(_PROBE):
            return enc.encode
    except Exception:  # another interpreter's signature: the plain encoder
        return enc.encode
    join = "".join

    def encode(obj: Any) -> str:
        return join(c_encode(obj, 0))

    return encode
