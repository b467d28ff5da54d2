"""Constitution data model: principles, few-shot examples, and their canonical form."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from functools import cached_property
from itertools import accumulate
from typing import Any

from rlaif.constitution.checks import Check
from rlaif.errors import ConfigError

PRINCIPLE_FIELDS = (
    "id", "title", "tags", "weight", "critique", "revision", "judge", "check", "contrast",
)  # fmt: skip
EXAMPLE_FIELDS = (
    "conversation",
    "response",
    "critique_request",
    "critique",
    "revision_request",
    "revision",
)


@dataclass(frozen=True)
class Contrast:
    """RLCD's pair of opposite instructions (:mod:`rlaif.stages.contrast`): ``positive`` asks for
    the response the principle wants, ``negative`` for its opposite, e.g. ``(harmless, helpful
    response)`` / ``(harmful, unhelpful response)``."""

    positive: str
    negative: str

    def to_dict(self) -> dict[str, str]:
        return {"positive": self.positive, "negative": self.negative}


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution.

    A principle with ``critique`` and ``revision`` drives the critique-and-revise loop; one with
    ``judge`` (a pairwise comparison question) drives the AI judge; one with ``check`` (rules of
    :mod:`rlaif.constitution.checks`) is judged by code. It may have any combination: with both
    ``judge`` and ``check``, a rule judge (where a pipeline has one) uses the check and the AI
    judge the question. One with ``contrast`` can make RLCD contrast pairs.
    """

    id: str
    title: str
    tags: tuple[str, ...] = ()
    weight: float = 1.0
    critique: str | None = None
    revision: str | None = None
    judge: str | None = None
    check: Check | None = None
    contrast: Contrast | None = None

    @property
    def can_critique(self) -> bool:
        return self.critique is not None and self.revision is not None

    @property
    def can_judge(self) -> bool:
        """Judged by the AI judge (a ``judge`` question) or by code (a ``check``)."""
        return self.judge is not None or self.check is not None

    @property
    def has_check(self) -> bool:
        return self.check is not None

    @property
    def is_rule(self) -> bool:
        """Judged only by code: a ``check`` and no ``judge`` question."""
        return self.check is not None and self.judge is None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with every field (the canonical form of a principle).

        ``check`` and ``contrast`` appear only when set, so that adding the fields left the hash
        of every constitution without them unchanged.
        """
        out: dict[str, Any] = {
            "id": self.id,
            "title": self.title,
            "tags": list(self.tags),
            "weight": float(self.weight),
            "critique": self.critique,
            "revision": self.revision,
            "judge": self.judge,
        }
        if self.check is not None:
            out["check"] = self.check.to_dict()
        if self.contrast is not None:
            out["contrast"] = self.contrast.to_dict()
        return out


@dataclass(frozen=True)
class Example:
    """A few-shot example: a conversation, a response, its critique and its revision."""

    conversation: tuple[tuple[str, str], ...]  # (role, content) pairs, ending with a user turn
    response: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "conversation": [{"role": r, "content": c} for r, c in self.conversation],
            "response": self.response,
            "critique_request": self.critique_request,
            "critique": self.critique,
            "revision_request": self.revision_request,
            "revision": self.revision,
        }


@dataclass(frozen=True)
class Constitution:
    """A validated constitution with ``extends`` already resolved.

    Attributes:
        name: short name, e.g. ``"helpful-harmless"``.
        version: semantic version string.
        description: what the constitution is for.
        principles: in file order (parents' principles first, then the child's additions).
        examples: few-shot examples for critique and revision.
        source: where the text comes from (a citation), if given.
        path: the file it was loaded from, if any.
        parents: names of the constitutions it extends, nearest first.
    """

    name: str
    version: str
    description: str = ""
    principles: tuple[Principle, ...] = ()
    examples: tuple[Example, ...] = ()
    source: str | None = None
    path: str | None = None
    parents: tuple[str, ...] = field(default=(), compare=False)

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise KeyError(pid)

    @property
    def critique_principles(self) -> tuple[Principle, ...]:
        return tuple(p for p in self.principles if p.can_critique)

    @property
    def judge_principles(self) -> tuple[Principle, ...]:
        """Principles that can judge a pair: with a ``judge`` question, a ``check``, or both
        (:attr:`rule_principles` are the ones with a check)."""
        return tuple(p for p in self.principles if p.can_judge)

    @property
    def contrast_principles(self) -> tuple[Principle, ...]:
        """Principles with a ``contrast`` pair, for RLCD."""
        return tuple(p for p in self.principles if p.contrast is not None)

    @property
    def rule_principles(self) -> tuple[Principle, ...]:
        """Principles with a ``check``, judged by code."""
        return tuple(p for p in self.principles if p.has_check)

    def canonical(self) -> dict[str, Any]:
        """The meaning of the constitution as plain data.

        Key order, YAML formatting, comments, quoting and how ``extends`` was spelled do not
        appear here; ``version`` does not either, so that a version bump alone keeps the hash
        and a content change under an unchanged version can be detected.
        """
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "principles": [p.to_dict() for p in self.principles],
            "examples": [e.to_dict() for e in self.examples],
        }

    @property
    def content_hash(self) -> str:
        """sha256 hex of the canonical form."""
        blob = json.dumps(
            self.canonical(), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def provenance(self) -> dict[str, Any]:
        """What a record needs to say which constitution made it."""
        return {"name": self.name, "version": self.version, "hash": self.content_hash}

    def to_dict(self) -> dict[str, Any]:
        """The resolved constitution as a YAML-ready mapping (no ``extends``)."""
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.description:
            out["description"] = self.description
        if self.source:
            out["source"] = self.source
        out["principles"] = [
            {k: v for k, v in p.to_dict().items() if v is not None and v != []}
            for p in self.principles
        ]
        if self.examples:
            out["examples"] = [e.to_dict() for e in self.examples]
        return out

    def sample_principles(
        self, k: int, rng: random.Random, *, kind: str = "critique"
    ) -> list[Principle]:
        """``k`` principles of a kind (critique, or judge: see :attr:`judge_principles`), drawn
        by weight with replacement."""
        pool, cum_weights = self._draw_pools["critique" if kind == "critique" else "judge"]
        if not pool:
            raise ConfigError(
                f"constitution '{self.name}' has no {kind} principles", file=self.path
            )
        # the draw ``choices(pool, weights=...)`` makes, with the running sums it would take
        # of the weights taken once (a judge draws for every pair)
        return rng.choices(pool, cum_weights=cum_weights, k=k)

    @cached_property
    def _draw_pools(self) -> dict[str, tuple[list[Principle], list[float]]]:
        pools = {"critique": self.critique_principles, "judge": self.judge_principles}
        return {k: (list(p), list(accumulate(x.weight for x in p))) for k, p in pools.items()}
