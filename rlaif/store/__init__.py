"""Records on disk: append-only stage shards, a model-call cache, the run manifest, a run lock.

The store decides nothing about what a record means; it guarantees that what was committed
survives a crash, that a resumed run never duplicates a record, and that every record is
counted in the manifest.
"""

from rlaif.store.cache import CallCache
from rlaif.store.hashing import (
    CanonicalJSONError,
    Encoded,
    cache_key,
    cache_key_frame,
    canonical_json,
    content_hash,
    key_of_frame,
    record_id,
)
from rlaif.store.lock import RunLock
from rlaif.store.manifest import Manifest, StageSummary
from rlaif.store.shards import DEFAULT_SHARD_SIZE, STATUSES, StageStore

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "STATUSES",
    "CallCache",
    "CanonicalJSONError",
    "Encoded",
    "Manifest",
    "RunLock",
    "StageStore",
    "StageSummary",
    "cache_key",
    "cache_key_frame",
    "canonical_json",
    "content_hash",
    "key_of_frame",
    "record_id",
]
