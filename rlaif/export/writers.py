"""Datasets written as streams: rows go out as they come, never the whole dataset in memory.

:class:`RowSink` writes one dataset (one split) in any of three formats at once:

* JSONL: one line per row (keys sorted, UTF-8 as is), written when the row arrives.
* Parquet: ``pyarrow.parquet.ParquetWriter`` with the schema of the dataset's
  ``datasets.Features`` and the options ``Dataset.to_parquet`` uses (content-defined chunking,
  page index, per-column options), one row group per :data:`BATCH_ROWS` rows (fewer when the
  rows are long, :data:`BATCH_BYTES`). ``to_parquet`` sizes its row groups by the whole
  dataset (about 100 MB each), so a file of more than one row group has other bytes than it
  would write; the rows read back are the same.
* ``disk``: the folder ``Dataset.save_to_disk`` writes (``data-*.arrow`` shards written by
  ``datasets``' own ``ArrowWriter`` in batches of the same rows, ``dataset_info.json``,
  ``state.json``), read by ``datasets.load_from_disk``. A shard is closed at
  :data:`SHARD_BYTES` (``save_to_disk`` divides the rows evenly instead; the rows are the same)
  and the fingerprint in ``state.json`` is a hash of the shards' bytes, not of the in-memory
  table ``save_to_disk`` hashes: the same rows give the same bytes.

Memory held per sink: the rows of one batch, whatever the number of rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BATCH_ROWS = 1000  # datasets' own writer batch (config.DEFAULT_MAX_BATCH_SIZE)
BATCH_BYTES = 32 << 20  # text held before a batch is written early (long rows)
SHARD_BYTES = 500 * 10**6  # datasets' save_to_disk default shard size (config.MAX_SHARD_SIZE)


def json_line(row: Mapping[str, Any]) -> bytes:
    """One JSONL line of a row: keys sorted, non-ASCII kept (the format of every export)."""
    return (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def _text_size(value: Any) -> int:
    """About how many bytes a row's values take in a batch (strings count their length)."""
    if isinstance(value, str):
        return len(value) + 8
    if isinstance(value, Mapping):
        return sum(_text_size(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(v) for v in value) + 8
    return 8


class RowSink:
    """One dataset written in each format given a path, row by row.

    Args:
        features: the ``datasets.Features`` of the rows (the schema of every format).
        jsonl: the JSONL file to write, or None.
        parquet: the Parquet file to write, or None.
        disk: the ``save_to_disk`` folder to write (created), or None.

    Use :meth:`write` for each row, then :meth:`close` (or :meth:`abort` after a failure).
    """

    def __init__(
        self,
        features: Any,
        *,
        jsonl: Path | None = None,
        parquet: Path | None = None,
        disk: Path | None = None,
    ) -> None:
        self.features, self.rows = features, 0
        self._batch: list[Mapping[str, Any]] = []
        self._batch_bytes = 0
        self._jsonl = open(jsonl, "wb") if jsonl is not None else None  # noqa: SIM115
        self._parquet = _parquet_writer(parquet, features) if parquet is not None else None
        self._disk = disk
        self._shards: list[Path] = []
        self._shard: Any = None  # the open datasets.arrow_writer.ArrowWriter
        self._shard_bytes = 0
        self._closed = False
        if disk is not None:
            disk.mkdir(parents=True)

    def write(self, row: Mapping[str, Any]) -> None:
        """Add one row (a mapping with the features' columns)."""
        self.rows += 1
        if self._jsonl is not None:
            self._jsonl.write(json_line(row))
        if self._parquet is None and self._disk is None:
            return
        self._batch.append(row)
        self._batch_bytes += _text_size(row)
        if len(self._batch) >= BATCH_ROWS or self._batch_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._batch:
            return
        table = pa.Table.from_pylist(self._batch, schema=self.features.arrow_schema)
        self._batch, self._batch_bytes = [], 0
        if self._parquet is not None:
            self._parquet.write_table(table)
        if self._disk is not None:
            if self._shard is not None and self._shard_bytes >= SHARD_BYTES:
                self._close_shard()
            if self._shard is None:
                self._open_shard()
            self._shard.write_table(table)
            self._shard_bytes += table.nbytes

    def _open_shard(self) -> None:
        from datasets.arrow_writer import ArrowWriter

        path = self._disk / f".shard-{len(self._shards):05d}"  # type: ignore[operator]
        self._shards.append(path)
        self._shard = ArrowWriter(features=self.features, path=str(path), embed_local_files=True)
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        self._shard.finalize()
        self._shard.close()
        self._shard = None

    def close(self) -> int:
        """Write what is left and finish every file; returns the number of rows."""
        self._closed = True
        self._flush()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._parquet is not None:
            from datasets import config

            cdc = json.dumps(config.DEFAULT_CDC_OPTIONS)
            self._parquet.add_key_value_metadata({"content_defined_chunking": cdc})
            self._parquet.close()
        if self._disk is not None:
            if self._shard is None:
                self._open_shard()  # an empty dataset still needs one (empty) shard to load
            self._close_shard()
            _finish_disk(self._disk, self._shards, self.features)
        return self.rows

    def abort(self) -> None:
        """Close the open files after a failure (the caller removes what was written); a
        closed sink is left as it is."""
        if self._closed:
            return
        self._closed = True
        for f in (self._jsonl, self._parquet):
            if f is not None:
                f.close()
        if self._shard is not None:
            self._shard.close()


def _parquet_writer(path: Path, features: Any) -> Any:
    """A ParquetWriter set up as ``datasets.Dataset.to_parquet`` sets up its own."""
    import pyarrow.parquet as pq
    from datasets import config
    from datasets.arrow_writer import get_parquet_column_options

    schema = features.arrow_schema
    return pq.ParquetWriter(
        str(path),
        schema=schema,
        use_content_defined_chunking=config.DEFAULT_CDC_OPTIONS,
        write_page_index=True,
        **get_parquet_column_options(features, schema),
    )


def _finish_disk(folder: Path, shards: list[Path], features: Any) -> None:
    """Name the shards as ``save_to_disk`` does and write its two JSON files next to them."""
    from datasets import DatasetInfo
    from datasets.utils.py_utils import asdict

    fingerprint = hashlib.blake2b(digest_size=8)
    names = []
    for k, shard in enumerate(shards):
        name = f"data-{k:05d}-of-{len(shards):05d}.arrow"
        with open(shard, "rb") as fh:
            while chunk := fh.read(1 << 20):
                fingerprint.update(chunk)
        os.replace(shard, folder / name)
        names.append({"filename": name})
    state = {
        "_data_files": names,
        "_fingerprint": fingerprint.hexdigest(),
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    with open(folder / "state.json", "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
    info = asdict(DatasetInfo(features=features))
    with open(folder / "dataset_info.json", "w", encoding="utf-8") as fh:
        json.dump({k: info[k] for k in sorted(info)}, fh, indent=2)


def write_dataset_dict(folder: Path, splits: tuple[str, ...]) -> None:
    """The ``dataset_dict.json`` that makes a folder of split folders a ``DatasetDict``."""
    with open(folder / "dataset_dict.json", "w", encoding="utf-8") as fh:
        json.dump({"splits": list(splits)}, fh)
