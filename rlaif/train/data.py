"""Preference data for the recipes: a run directory, a ``save_to_disk`` folder or a file,
loaded as a ``DatasetDict`` with a ``train`` (and usually a ``test``) split."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlaif.errors import ConfigError, DataError

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
RUN_DIR_DATASETS = ("export/preferences/conversational/disk", "export/pairs")


def _read_file(path: Path) -> Any:  # -> datasets.Dataset
    """A JSONL / JSON / Parquet file as a Dataset, without the HF datasets cache."""
    import datasets

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return datasets.Dataset(pq.read_table(path))
        except Exception as exc:
            raise DataError(f"cannot read Parquet: {exc}", file=path) from None
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"invalid JSON: {exc.msg}", file=path, line=n) from None
        if not rows:
            raise DataError("no rows", file=path)
        try:
            return datasets.Dataset.from_list(rows)
        except Exception as exc:
            raise DataError(f"rows do not form a table: {exc}", file=path) from None
    raise DataError("expected a .jsonl, .json or .parquet file, or a dataset folder", file=path)


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _load_any(path: Path) -> Any:  # -> Dataset | DatasetDict
    import datasets

    if path.is_file():
        return _read_file(path)
    if _is_saved_dataset(path):
        try:
            return datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"cannot load the saved dataset: {exc}", file=path) from None
    for rel in RUN_DIR_DATASETS:  # a run directory
        if _is_saved_dataset(path / rel):
            return _load_any(path / rel)
    # A folder of split files, as the exporter writes next to disk/: train.jsonl, test.jsonl.
    splits = {}
    for name in ("train", "test"):
        for ext in (".parquet", ".jsonl"):
            if (path / f"{name}{ext}").is_file():
                splits[name] = _read_file(path / f"{name}{ext}")
                break
    if "train" in splits:
        return datasets.DatasetDict(splits)
    raise DataError(
        "not a dataset: expected a save_to_disk folder, a .jsonl/.parquet file, or a run "
        f"directory with {' or '.join(RUN_DIR_DATASETS)}",
        file=path,
    )


def load_preferences(
    path: str | Path,
    split_test: float = 0.1,
    seed: int = 0,
    *,
    columns: tuple[str, ...] = PREFERENCE_COLUMNS,
) -> Any:  # -> datasets.DatasetDict
    """Load a preference dataset as a ``DatasetDict`` with ``train`` (and usually ``test``).

    Accepts a ``save_to_disk`` folder (a Dataset or a DatasetDict), a JSONL / Parquet file,
    a folder with ``train``/``test`` JSONL or Parquet files, or an rlaif run directory
    (``export/preferences/conversational/disk``, else the SL-CAI ``export/pairs``). A dataset
    without a ``test`` split is split deterministically (``seed``) when ``split_test > 0``.

    Args:
        path: where the data is.
        split_test: share of rows held out when there is no test split (0 keeps all).
        seed: seed of that split.
        columns: columns every split must have.

    Raises:
        DataError: missing path, unreadable data, missing columns, no training rows.
    """
    import datasets

    p = Path(path).expanduser()
    if not str(path).strip():
        raise DataError("no dataset given", field="dataset")
    if not p.exists():
        raise DataError("dataset not found", file=p, field="dataset")
    if not 0 <= split_test < 1:
        raise ConfigError(f"must be in [0, 1), got {split_test}", field="test_size")
    data = _load_any(p)
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"no 'train' split (splits: {', '.join(data)})", file=p)
        dd = datasets.DatasetDict({k: data[k] for k in ("train", "test") if k in data})
    else:
        dd = datasets.DatasetDict({"train": data})
    if "test" not in dd and split_test > 0 and len(dd["train"]) >= 2:
        # Always leave at least one row on each side, whatever the share.
        n_test = min(len(dd["train"]) - 1, max(1, math.ceil(split_test * len(dd["train"]))))
        parts = dd["train"].train_test_split(test_size=n_test, seed=seed, shuffle=True)
        dd = datasets.DatasetDict({"train": parts["train"], "test": parts["test"]})
    for name, split in dd.items():
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise DataError(
                f"split '{name}' lacks column(s) {', '.join(missing)} "
                f"(has: {', '.join(split.column_names)})",
                file=p,
            )
    if len(dd["train"]) == 0:
        raise DataError("the train split has no rows", file=p)
    if "test" in dd and len(dd["test"]) == 0:
        dd = datasets.DatasetDict({"train": dd["train"]})
    return dd


def held_out_from(
    data: Any,
    eval_dataset: str,
    split_test: float,
    seed: int,
    *,
    columns: tuple[str, ...] = PREFERENCE_COLUMNS,
) -> Any:
    """``data`` with its test split replaced by the test split of ``eval_dataset``, and the
    train rows of those test prompts left out (no prompt is both trained on and scored).

    Used to measure every model of an experiment against one set of labels: reward models
    trained on an AI judge's labels and on a rule's, both scored on the rule's held-out pairs.

    Raises:
        DataError: ``eval_dataset`` has no test split, or nothing is left to train on.
    """
    import json

    import datasets

    other = load_preferences(eval_dataset, split_test, seed, columns=columns)
    if "test" not in other:
        raise DataError("no test split to evaluate on", file=eval_dataset, field="eval_dataset")

    def key(prompt: Any) -> str:
        return json.dumps(prompt, sort_keys=True, ensure_ascii=False)

    held = {key(p) for p in other["test"]["prompt"]}
    train = data["train"].filter(lambda row: key(row["prompt"]) not in held)
    if len(train) == 0:
        raise DataError("every training prompt is in the evaluation's test split",
                        file=eval_dataset, field="eval_dataset")  # fmt: skip
    return datasets.DatasetDict({"train": train, "test": other["test"]})
