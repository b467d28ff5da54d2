"""Child process for the SIGKILL test in test_store.py: append batches until killed.

After each ``StageStore.append`` returns (so after its fsync) it prints the batch number on
stdout; the parent kills it at a random moment and checks that every printed batch survived.
Writes are split into small ``os.write`` calls so that kills often land inside a batch and
leave a torn line for the next open to repair.

Usage: python store_worker.py RUN_DIR BATCH_SIZE SHARD_SIZE CHUNK_BYTES
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rlaif.store import StageStore, jsonl

STAGE = "kill"


def main() -> None:
    run_dir, batch_size, shard_size, chunk = (
        Path(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
    )

    def small_write(fd: int, data: memoryview | bytes) -> int:
        return os.write(fd, data[:chunk])

    jsonl._os_write = small_write
    store = StageStore(run_dir, STAGE, shard_size=shard_size)
    seen = [int(r["batch"]) for r in store.iter_records()]
    # Start two batches back so a resume re-appends work that is already stored: the store
    # must drop those records instead of duplicating them.
    batch = max(0, max(seen, default=0) - 2)
    print("ready", flush=True)
    while True:
        records = [
            {
                "id": f"b{batch}-{i}",
                "status": "ok",
                "batch": batch,
                "text": "é" * (batch % 7) + "x" * (40 + 13 * i),
            }
            for i in range(batch_size)
        ]
        store.append(records)
        print(batch, flush=True)
        batch += 1


if __name__ == "__main__":
    main()
