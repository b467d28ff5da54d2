"""The train/test rule of an export: a seeded hash of the prompt text, decided one prompt at a
time, so it can be applied to rows as they stream past.

A prompt goes to test when its hash, read as a number in [0, 1), is below ``test_size``: a
prompt's split never depends on the other prompts, so a grown dataset keeps its test set. Two
corrections need the whole set of prompts, which a first pass over the records collects (a
count and two keys, not the prompts): with two or more prompts and ``test_size > 0`` at least
one prompt (the lowest hash) is in test, and at least one (the highest) is always in train, so
a single prompt is train.
"""

from __future__ import annotations

from rlaif.store import content_hash


class SplitRule:
    """Which split a prompt key (the content hash of its messages) belongs to.

    Call :meth:`add` once per distinct prompt key of the kept rows, then :meth:`of` for each
    row. State: two counts and the lowest and highest hashes with their keys.
    """

    def __init__(self, test_size: float, seed: int) -> None:
        self.test_size, self.seed = test_size, seed
        self.prompts = 0
        self._natural_test = 0  # prompts whose hash alone puts them in test
        self._lowest: tuple[float, str] | None = None  # the first key with the lowest hash
        self._highest: tuple[float, str] | None = None  # the first key with the highest hash

    def position(self, key: str) -> float:
        """The prompt's seeded hash as a number in [0, 1)."""
        return int(content_hash([self.seed, key])[:16], 16) / 16**16

    def add(self, key: str) -> None:
        """Count one more distinct prompt (each key once, in input order)."""
        u = self.position(key)
        self.prompts += 1
        self._natural_test += u < self.test_size
        if self._lowest is None or u < self._lowest[0]:
            self._lowest = (u, key)
        if self._highest is None or u > self._highest[0]:
            self._highest = (u, key)

    @property
    def _forced(self) -> str | None:
        """The prompt put in test because no hash fell below ``test_size``."""
        if self.prompts >= 2 and self.test_size > 0 and not self._natural_test:
            return self._lowest[1]  # type: ignore[index]
        return None

    @property
    def _kept_back(self) -> str | None:
        """The prompt kept in train because every hash fell below ``test_size``."""
        if self.prompts and self._natural_test == self.prompts:
            return self._highest[1]  # type: ignore[index]
        return None

    def of(self, key: str) -> str:
        """``"train"`` or ``"test"`` for a prompt key passed to :meth:`add`."""
        if key == self._forced:
            return "test"
        if key == self._kept_back:
            return "train"
        return "test" if self.position(key) < self.test_size else "train"

    def counts(self) -> dict[str, int]:
        """Prompts per split."""
        test = self._natural_test + (self._forced is not None) - (self._kept_back is not None)
        return {"train": self.prompts - test, "test": test}
