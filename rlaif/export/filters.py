"""Which judged pairs become preference rows, and why each other one does not.

:class:`PreferenceExportConfig` holds the export's settings (a pipeline's
``stages.export.preferences`` section); :func:`select_preferences` turns judged pair records
into rows and counts every record it drops under one of :data:`FILTER_REASONS`, first match
wins: skipped upstream, generation error, empty response, identical responses, judge error,
tie, low confidence, length ratio, duplicate row, per-prompt cap. ``kept + filtered ==
inputs`` and ``chosen != rejected`` are checked on every selection.

The records are read as a stream, twice (:class:`PreferenceStream`): what is kept between the
passes is counts and short digests, never the rows.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlaif.errors import ConfigError, DataError
from rlaif.export.split import SplitRule
from rlaif.stages.judge import TOL, Verdict
from rlaif.stages.pairs import preference_row
from rlaif.store import content_hash

FORMATS = ("disk", "parquet", "jsonl")
VARIANTS = ("conversational", "text")
SPLITS = ("train", "test")

SKIPPED = "skipped upstream"
GENERATION_ERROR = "generation error"
EMPTY = "empty response"
IDENTICAL = "identical responses"
JUDGE_ERROR = "judge error"
TIE = "tie"
LOW_CONFIDENCE = "low confidence"
LENGTH_RATIO = "length ratio"
DUPLICATE = "duplicate row"
PROMPT_CAP = "per-prompt cap"
FILTER_REASONS = {
    SKIPPED: "an earlier stage skipped the pair (e.g. the judge did not prefer a revision)",
    GENERATION_ERROR: "sampling the responses failed",
    EMPTY: "a response is empty after stripping whitespace",
    IDENTICAL: "the two responses are the same text (no preference to learn)",
    JUDGE_ERROR: "the judge's output was unusable (recorded, never guessed)",
    TIE: "the judge found no winner (including position-inconsistent verdicts)",
    LOW_CONFIDENCE: "p_chosen below min_confidence (or not above 0.5)",
    LENGTH_RATIO: "longer/shorter response length (characters) above max_length_ratio",
    DUPLICATE: "same (prompt, chosen, rejected) as an earlier row",
    PROMPT_CAP: "more than max_pairs_per_prompt pairs for one prompt text",
}
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_NUMBER_NOTE = re.compile(r"\(\s*[a-z_]+\s*[=<>]=?\s*[-+]?[\d.e+-]+\s*\)")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class PreferenceExportConfig:
    """What the preference export keeps and writes. Bad values raise :class:`ConfigError`.

    Args:
        min_confidence: drop pairs whose p_chosen (the judge's probability for the chosen
            response) is below this. 0.55 drops near coin-flips of logprob judges (margin
            < 0.2) and keeps reasoning-mode labels, which sit at 0.6 (CAI's 40-60 % band).
        max_length_ratio: drop pairs whose longer response has more than this many times the
            characters of the shorter, whichever was chosen. AI judges prefer longer answers;
            such a pair mostly teaches length, not the constitution. None disables it.
        max_pairs_per_prompt: keep at most this many pairs per prompt text (the most confident,
            then the earliest). None (default) keeps all: the judge stage's pair strategy already
            decides ("best_vs_worst" gives one pair, "all" every distinct pair, on purpose), and
            the prompt-level split keeps pairs of one prompt out of both splits at once.
        test_size: fraction of prompts in the test split, in [0, 1).
        seed: salts the prompt hash that assigns splits.
        formats: any of ``disk`` (save_to_disk), ``parquet``, ``jsonl``.
        variants: any of ``conversational`` and ``text``.
        license: the card's license id on the Hub; the data inherits the prompts' and models'
            terms, so the default is ``unknown``.
        pretty_name: the card's title.
        plot: write ``margins.png``.
        push_to_hub: a Hub dataset repo id to upload to after the local export; None: don't.
        private: create the Hub repo as private.
    """

    min_confidence: float = 0.55
    max_length_ratio: float | None = 4.0
    max_pairs_per_prompt: int | None = None
    test_size: float = 0.1
    seed: int = 0
    formats: tuple[str, ...] = FORMATS
    variants: tuple[str, ...] = VARIANTS
    license: str = "unknown"
    pretty_name: str | None = None
    plot: bool = True
    push_to_hub: str | None = None
    private: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "variants", tuple(self.variants))

        def subset(values: tuple[str, ...], allowed: tuple[str, ...]) -> bool:
            return bool(values) and len(set(values)) == len(values) and set(values) <= set(allowed)

        ratio, cap = self.max_length_ratio, self.max_pairs_per_prompt
        checks = [
            ("min_confidence", _num(self.min_confidence, 0.5, 1), "must be in [0.5, 1]"),
            ("max_length_ratio", ratio is None or _num(ratio, 1, math.inf), "must be >= 1 or null"),
            (
                "max_pairs_per_prompt",
                cap is None or (_int(cap) and cap >= 1),
                "must be >= 1 or null",
            ),
            ("test_size", _num(self.test_size, 0, 1) and self.test_size < 1, "must be in [0, 1)"),
            ("seed", _int(self.seed), "must be an integer"),
            ("formats", subset(self.formats, FORMATS), f"must be distinct values of {FORMATS}"),
            ("variants", subset(self.variants, VARIANTS), f"must be distinct values of {VARIANTS}"),
            ("license", isinstance(self.license, str) and bool(self.license), "must be a Hub id"),
            (
                "push_to_hub",
                self.push_to_hub is None or bool(_REPO_ID.match(str(self.push_to_hub))),
                "must be a repo id like 'user/name' or null",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                msg = f"preference export {name} {why}, got {getattr(self, name)!r}"
                raise ConfigError(msg, field=name)

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> PreferenceExportConfig:
        """The settings of a pipeline's ``stages.export.preferences`` mapping.

        Raises:
            ConfigError: an unknown key or a bad value, naming the field.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - names)
        if unknown:
            raise ConfigError(
                f"unknown key '{unknown[0]}' (allowed: {', '.join(sorted(names))})",
                field=unknown[0],
            )
        try:
            return cls(**section)
        except (TypeError, ValueError) as exc:  # e.g. formats: 5 (not a list)
            raise ConfigError(f"invalid value: {exc}") from None


def _num(v: Any, lo: float, hi: float) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class VerdictTally:
    """What the card says about the judge, summed over every parsed verdict (no list kept)."""

    verdicts: int = 0
    errors: int = 0
    ok: int = 0
    ties: int = 0
    consistent: int = 0  # verdicts whose two orders agree
    consistency_known: int = 0  # verdicts for which that is known
    orders: int = 0  # presentation orders judged
    first_position: int = 0  # orders won by the option shown first

    def add(self, v: Verdict) -> None:
        self.verdicts += 1
        if v.status != "ok":
            self.errors += 1
            return
        self.ok += 1
        self.ties += v.winner == "tie"
        if v.position_consistent is not None:
            self.consistency_known += 1
            self.consistent += bool(v.position_consistent)
        self.orders += v.n_orders
        self.first_position += v.first_position_preferred


@dataclass
class Selection:
    """The outcome of filtering: every filtered record's reason, the judge's tallies and, from
    :func:`select_preferences` only, the kept rows (input order)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    filtered: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first 3 ids
    judge: VerdictTally = field(default_factory=VerdictTally)
    inputs: int = 0
    kept: int = 0

    def drop(self, reason: str, record_id: str) -> None:
        self.filtered[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(record_id)


def _messages(rec: Mapping[str, Any], rid: str) -> list[dict[str, str]]:
    prompt = rec.get("prompt")
    try:  # only role and content: every row of a dataset needs the same schema
        msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]  # type: ignore
    except (TypeError, KeyError):
        msgs = []
    if not msgs or not all(isinstance(v, str) for m in msgs for v in m.values()):
        raise DataError(f"record {rid}: prompt must be a list of messages", field="prompt")
    return msgs


def _verdict(rec: Mapping[str, Any], rid: str) -> Verdict | None:
    raw = rec.get("verdict")
    if raw is None:
        return None
    try:
        return Verdict.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"record {rid}: unreadable verdict ({exc})", field="verdict") from None


def upstream_reason(reason: str) -> str:
    """The filter category of a pair an earlier stage skipped, from its reason text.

    Failures, ties and identical texts join their own categories; anything else (a CAI-SL
    revision the judge did not prefer, ...) becomes ``"skipped upstream: <reason>"`` with
    numbers masked, so the categories stay few.
    """
    r = " ".join(reason.split()).lower()
    if r.startswith(("generation failed", "sampling failed")):
        return GENERATION_ERROR
    if r.startswith("judge error") or r.startswith("judge call failed"):
        return JUDGE_ERROR
    if r.startswith("tie"):
        return TIE
    if "identical" in r or r.startswith(("same texts", "no pair of distinct")):
        return IDENTICAL
    # Numbers go, so the categories stay few: "(p = 0.4312)" and the like are dropped with
    # the brackets they sit in, any other number is masked.
    r = " ".join(_NUMBER_NOTE.sub("", r).split())
    return f"{SKIPPED}: {_NUMBER.sub('#', r)[:80] or 'no reason given'}"


def _classify(rec: Mapping[str, Any], cfg: PreferenceExportConfig, sel: Selection) -> dict | None:
    """A kept row for one record, or None after counting its reason in ``sel``."""
    rid = str(rec.get("id", "?"))
    verdict = _verdict(rec, rid)
    if verdict is not None:
        sel.judge.add(verdict)
    if rec.get("status") == "skipped":
        return sel.drop(upstream_reason(str(rec.get("reason") or "")), rid)
    if rec.get("status") != "ok":
        judged = verdict is not None and verdict.status == "error"
        judged = judged or str(rec.get("reason") or "").lower().startswith("judge")
        return sel.drop(JUDGE_ERROR if judged else GENERATION_ERROR, rid)
    x, y = rec.get("x"), rec.get("y")
    if not isinstance(x, str) or not isinstance(y, str):
        raise DataError(f"record {rid}: responses x and y must be text", field="x")
    x, y = x.strip(), y.strip()
    if not x or not y:
        return sel.drop(EMPTY, rid)
    if x == y:
        return sel.drop(IDENTICAL, rid)
    if verdict is None:
        raise DataError(f"record {rid}: status ok but no verdict", field="verdict")
    messages = _messages(rec, rid)
    row, why = preference_row(messages, x, y, verdict)
    if row is None:
        return sel.drop(TIE if str(why).startswith("tie") else JUDGE_ERROR, rid)
    p = verdict.p_a_better if verdict.winner == "a" else 1 - verdict.p_a_better  # type: ignore[operator]
    # Never a row whose label the probability does not back (p <= 0.5 has margin <= 0).
    if p < cfg.min_confidence - TOL or p <= 0.5 + TOL:
        return sel.drop(LOW_CONFIDENCE, rid)
    longer, shorter = max(len(x), len(y)), min(len(x), len(y))
    if cfg.max_length_ratio is not None and longer > cfg.max_length_ratio * shorter + TOL:
        return sel.drop(LENGTH_RATIO, rid)
    prompt_key = content_hash(messages)
    chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
    return {
        **row,
        "id": rid,
        "prompt_id": str(rec.get("prompt_id", "")),
        "source": str(rec.get("source", "")),
        "p_chosen": p,
        "_prompt_key": prompt_key,
        "_row_key": content_hash([messages, chosen, rejected]),
    }


def _digest(hex_key: str) -> int:
    """128 bits of a SHA-256 hex key: what the duplicate filter and the prompt table keep."""
    return int(hex_key[:32], 16)


class PreferenceStream:
    """The kept rows of a re-iterable record source, found in two passes with small state.

    Construction is the first pass: every record is classified and each drop counted (the
    reasons of :func:`select_preferences`, same counts and examples), and the per-prompt cap
    and the split rule are settled. :meth:`rows` is the second pass (repeatable): it reads the
    source again and yields ``(split, row)`` for the kept rows, in input order.

    What stays in memory per record: nothing. Per row that passes the filters: a 128-bit
    digest in the duplicate filter's set (about 100 bytes in CPython, during a pass). Per
    distinct prompt, during the first pass: a 128-bit digest in a set (about 100 bytes) and,
    with ``max_pairs_per_prompt = k``, a count and the k + 3 best (p_chosen, index) pairs of
    the prompt (about 250 + 80 k bytes), of which one pair stays for the second pass.

    Args:
        records: judged pair records in prompt-source order; iterating it again must give the
            same records (a list, or an object whose ``__iter__`` starts over).
        cfg: the filters and the split.

    Raises:
        TypeError: ``records`` is a one-shot iterator (it cannot be read twice).
        DataError: a malformed record (see :func:`select_preferences`).
    """

    def __init__(self, records: Iterable[Mapping[str, Any]], cfg: PreferenceExportConfig) -> None:
        if isinstance(records, Iterator):
            raise TypeError(
                "the preference export reads its records twice: pass a list or a re-iterable "
                "source, not a one-shot iterator or generator"
            )
        self.records, self.cfg = records, cfg
        self.sel = Selection()
        self.split = SplitRule(cfg.test_size, cfg.seed)
        cap = cfg.max_pairs_per_prompt
        seen: set[int] = set()  # row digests
        prompts: set[int] = set()  # prompt digests
        best: dict[int, list] = {}  # with a cap: prompt -> [rows, heap of the best (p, -index)]
        self.unique = 0  # rows left after the duplicate filter
        for rec in records:
            self.sel.inputs += 1
            row = _classify(rec, cfg, self.sel)
            if row is None:
                continue
            key = _digest(row["_row_key"])
            if key in seen:
                self.sel.drop(DUPLICATE, row["id"])
                continue
            seen.add(key)
            pk = _digest(row["_prompt_key"])
            if pk not in prompts:
                prompts.add(pk)
                self.split.add(row["_prompt_key"])
            if cap is not None:  # the cap's k best, plus 3 for the dropped examples
                entry = best.get(pk)
                if entry is None:
                    entry = best[pk] = [0, []]
                entry[0] += 1
                push = heapq.heappush if len(entry[1]) < cap + 3 else heapq.heappushpop
                push(entry[1], (row["p_chosen"], -self.unique))
            self.unique += 1
        del seen, prompts
        # Per capped prompt: the worst (p, -index) kept. The cap's examples are its first
        # three drops in the order of the in-memory rule: by prompt (first seen), then rank.
        self._limit: dict[int, tuple[float, int]] = {}
        self._wanted: dict[int, int] = {}  # row index -> place among the examples
        for pk, (n, heap) in best.items():
            if n <= cap:  # type: ignore[operator]
                continue
            ranked = sorted(heap, reverse=True)
            self._limit[pk] = ranked[cap - 1]  # type: ignore[operator]
            self.sel.filtered[PROMPT_CAP] += n - cap  # type: ignore[operator]
            for _, neg in ranked[cap:]:
                if len(self._wanted) < 3:
                    self._wanted[-neg] = len(self._wanted)
        self.sel.kept = self.unique - self.sel.filtered[PROMPT_CAP]
        accounted = self.sel.kept + sum(self.sel.filtered.values())
        if accounted != self.sel.inputs:  # explicit raises: must hold under python -O too
            raise AssertionError(f"{self.sel.inputs} records in, {accounted} accounted for")

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(split, row)`` for each kept row, in input order (a second pass over the source).

        Raises:
            DataError: the source gave other records than in the first pass.
        """
        scratch = Selection()  # the first pass counted the drops already
        seen: set[int] = set()
        inputs = unique = kept = 0
        capped: list[tuple[int, str]] = []
        for rec in self.records:
            inputs += 1
            row = _classify(rec, self.cfg, scratch)
            if row is None or (key := _digest(row["_row_key"])) in seen:
                continue
            seen.add(key)
            index, unique = unique, unique + 1
            limit = self._limit.get(_digest(row["_prompt_key"]))
            if limit is not None and (row["p_chosen"], -index) < limit:
                if index in self._wanted:
                    capped.append((self._wanted[index], row["id"]))
                continue
            if row["chosen"][0]["content"].strip() == row["rejected"][0]["content"].strip():
                raise AssertionError(f"row {row['id']} has chosen == rejected")
            kept += 1
            yield self.split.of(row["_prompt_key"]), row
        if (inputs, unique, kept) != (self.sel.inputs, self.unique, self.sel.kept):
            raise DataError(
                f"the records changed between the export's two passes: {self.sel.inputs} "
                f"records and {self.sel.kept} rows, then {inputs} records and {kept} rows"
            )
        if capped:
            self.sel.examples[PROMPT_CAP] = [rid for _, rid in sorted(capped)]


def select_preferences(
    records: Iterable[Mapping[str, Any]], cfg: PreferenceExportConfig
) -> Selection:
    """Filter judged pair records into preference rows, accounting for every record.

    The rows are kept in ``Selection.rows``: for small inputs and tests. The export streams
    them instead (:class:`PreferenceStream`).

    Raises:
        DataError: a record lacks what a preference row needs (prompt messages, text
            responses, a readable verdict when its status is ok).
        TypeError: ``records`` is a one-shot iterator.
    """
    stream = PreferenceStream(records, cfg)
    stream.sel.rows = [row for _, row in stream.rows()]
    return stream.sel
