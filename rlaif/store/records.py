"""What a stage record must look like: validation for reading and for writing a shard line."""

from __future__ import annotations

from typing import Any

from rlaif.errors import StoreError
from rlaif.store.hashing import CanonicalJSONError, canonical_json
from rlaif.store.jsonl import encode_line

__all__ = ["CODE", "STATUSES", "encode_record", "record_problem"]

STATUSES = ("ok", "error", "skipped")

CODE = {s: i for i, s in enumerate(STATUSES)}


def record_problem(value: Any) -> str | None:
    """Why a parsed line is not a record (``None`` if it is one)."""
    if not isinstance(value, dict):
        return f"expected a JSON object, got {type(value).__name__}"
    rid = value.get("id")
    if not isinstance(rid, str) or not rid:
        return "record has no string 'id'"
    if value.get("status") not in CODE:
        return f"record {rid} has status {value.get('status')!r}, expected one of {STATUSES}"
    return None


def encode_record(record: Any, position: int) -> tuple[str, int, bytes]:
    """Validate one record for writing; return ``(id, status code, line bytes)``."""
    where = f"record #{position}"
    if not isinstance(record, dict):
        raise StoreError(f"{where}: expected a dict, got {type(record).__name__}")
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        raise StoreError(f"{where}: needs a non-empty string id", field="id")
    if record.get("status") not in CODE:
        raise StoreError(
            f"{where} ({rid}): status {record.get('status')!r} is not one of {STATUSES}",
            field="status",
        )
    rid, status = record["id"], record["status"]
    if status != "ok":
        reason = record.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            # Every input must be accountable: a non-ok record without a reason is not.
            raise StoreError(f"{where} ({rid}): status '{status}' needs a reason", field="reason")
    try:
        data = encode_line(record)
    except (ValueError, TypeError) as exc:
        try:
            canonical_json(record)  # re-walk to name the offending path
        except CanonicalJSONError as located:
            raise StoreError(f"record {rid}: {located.message}") from exc
        raise StoreError(f"record {rid} cannot be written as JSON: {exc}") from exc
    return rid, CODE[status], data
