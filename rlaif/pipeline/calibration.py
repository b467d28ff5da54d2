"""The judge's option prior for one run (``stages.judge.calibrate``), before its judge waves.

For each judge model, once: draw ``calibration_sample`` of the run's pairs that the AI judge
judges (seeded by the run's seed: :func:`rlaif.stages.calibrate.sample`), score them and
estimate the prior (:mod:`rlaif.stages.calibrate`). ``pride`` scores their real both-order
requests, which the judge waves then answer from the call cache (no extra model call);
``content_free`` scores requests built from their conversations and principles with
content-free responses. The estimate goes to ``stages/<judge stage>/calibration.json`` under a
hash of the requests it came from and the judge settings, so a killed and resumed run reuses
it and its judge records keep their ids (the prior enters them through
``JudgeConfig.to_dict``). The manifest (``info.judge_calibration``) and the dataset card record
it, with the judge's rates raw and calibrated.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from rlaif.calls.caller import ModelCaller, ScoreRequest
from rlaif.config.schema import PipelineConfig
from rlaif.constitution import Constitution, Principle
from rlaif.evaluate.audit import rate
from rlaif.evaluate.calibration_audit import LABEL_FREE, verdict_rates
from rlaif.pipeline.judges import JudgeKind
from rlaif.pipeline.rl_cai import PairToJudge, pair_key
from rlaif.progress import Progress
from rlaif.prompts import PromptBook
from rlaif.stages import calibrate as C
from rlaif.stages import judge as J
from rlaif.store import Manifest, content_hash
from rlaif.store.atomic import write_atomic

CALIBRATION_FILE = "calibration.json"


class RunParts(Protocol):
    """What the pre-pass needs of the runner's run."""

    cfg: PipelineConfig
    run_dir: Path
    constitution: Constitution
    book: PromptBook
    judge_callers: list[ModelCaller]
    stream: TextIO


@dataclass
class RunCalibration:
    """The judge settings of each judge model of a run (``configs[n]`` for judge ``n``), and
    what the manifest and card say about them.

    ``judges`` has one entry per calibrated judge stage: ``stage``, ``model``, ``revision``,
    ``prior`` (:class:`~rlaif.stages.calibrate.OptionPrior` as a dict) and, after
    :meth:`record`, ``rates`` (raw vs calibrated, :func:`verdict_rates`).
    """

    method: str
    base: J.JudgeConfig
    configs: list[J.JudgeConfig]
    sample: int = 0
    judges: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None
    # judge n -> (metric, "raw" | "calibrated") -> (k, n): the rates' counts, which add up
    # over waves, so no wave's records are kept for them
    tallies: dict[int, dict[tuple[str, str], tuple[float, int]]] = field(default_factory=dict)

    def add(self, n: int, records: Iterable[dict[str, Any]]) -> None:
        """Count the rates of judge ``n``'s judged records of one wave."""
        if self.method == "none":
            return
        verdicts = [J.Verdict.from_dict(r["verdict"]) for r in records]
        tally = self.tallies.setdefault(n, {})
        for metric, sides in verdict_rates(verdicts, self.base).items():
            for side, r in sides.items():
                k, total = tally.get((metric, side), (0, 0))
                tally[(metric, side)] = (k + r["k"], total + r["n"])

    def record(self, judged: list[dict[Any, dict[str, Any]]], manifest: Manifest) -> dict[str, Any]:
        """Put the priors and each judge stage's rates, raw and calibrated, over its judged
        records (those counted by :meth:`add`, and ``judged[n]``: record per pair of judge
        ``n``) into ``manifest.info``; return the provenance the dataset card adds (nothing
        when the run is not calibrated)."""
        if self.method == "none":
            return {}
        for n, records in enumerate(judged):
            self.add(n, records.values())
        for n, entry in enumerate(self.judges):
            if n in self.tallies:
                tally = self.tallies[n]
                entry["rates"] = {
                    metric: {side: rate(*tally[(metric, side)]) for side in ("raw", "calibrated")}
                    for metric in LABEL_FREE
                }
        info: dict[str, Any] = {
            "method": self.method,
            "sample": self.sample,
            "config": self.base.to_dict(),
            "judges": self.judges,
        }
        if self.note:
            info["note"] = self.note
        manifest.info["judge_calibration"] = info
        return {"judge_calibration": info}


def calibrate_judges(
    run: RunParts, pairs: Iterable[PairToJudge], jcfg: J.JudgeConfig, kind: JudgeKind
) -> RunCalibration:
    """The prior of each judge model, estimated (or read back) before the judge waves.

    Nothing happens (and ``configs`` are ``jcfg`` unchanged) unless ``calibrate`` is set and
    the AI judge judges some of ``pairs`` in logprob mode.
    """
    jstage = run.cfg.stages.judge
    assert jstage is not None
    plain = RunCalibration("none", jcfg, [jcfg] * len(run.judge_callers))
    ai_judged = kind.scorer is None and kind.kind in ("auto", "ai")
    if jstage.calibrate == "none" or jcfg.mode != "logprob" or not ai_judged:
        return plain
    method, seed, system = jstage.calibrate, run.cfg.seed, run.cfg.system
    # The pairs of C.sample's draw over every AI-judged pair (the smallest hashes of (seed,
    # pair key), in run order), kept in a bounded heap while the pairs stream by.
    heap: list[tuple[int, int, PairToJudge, list[Principle]]] = []
    n_ai = 0
    for pair in pairs:  # the principles judge_wave draws for the pair, AI-judged ones only
        drawn = J.judge_principles(run.constitution, jcfg.principles_k, seed, pair_key(pair),
                                   kind.kind)  # fmt: skip
        if ps := [p for p in drawn if not J.rule_judged(p, kind.kind)]:
            rank = int(content_hash(["calibrate", seed, pair_key(pair)]), 16)
            entry = (-rank, -n_ai, pair, ps)
            n_ai += 1
            if len(heap) < jstage.calibration_sample:
                heapq.heappush(heap, entry)
            elif heap and entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
    picked = [(p, ps) for _, _, p, ps in sorted(heap, key=lambda e: -e[1])]
    if not picked:
        plain.method, plain.note = method, "no pair is judged by the AI judge: nothing to calibrate"
        return plain
    groups: list[int] = []  # requests per picked pair (pride: 2 per principle)
    if method == "pride":
        reqs: list[ScoreRequest] = []
        for p, ps in picked:
            for pr in ps:
                reqs += J.judge_requests(run.book, p.prompt, p.x, p.y, pr, jcfg, system=system)  # type: ignore[arg-type]
            groups.append(2 * len(ps))
    else:  # one item per prompt and principle: a repeat would only repeat a request
        items = {(p.prompt_id, ps[0].id): (p.prompt, ps[0]) for p, ps in picked}
        reqs = C.content_free_requests(run.book, list(items.values()), jcfg,
                                       jstage.calibration_sample, system=system)  # fmt: skip
    out = RunCalibration(method, jcfg, [], jstage.calibration_sample)
    for n, caller in enumerate(run.judge_callers):
        stage = "judge" if n == 0 else f"judge-{n + 1}"
        prior = _prior(run, stage, caller, method, reqs, groups, jcfg)
        print(f"{stage}: option prior {prior.describe()}", file=run.stream)
        out.configs.append(C.calibrated_config(jcfg, prior))
        out.judges.append({"stage": stage, "model": caller.model, "revision": caller.revision,
                           "prior": prior.to_dict()})  # fmt: skip
    return out


def _prior(
    run: RunParts,
    stage: str,
    caller: ModelCaller,
    method: str,
    reqs: list[ScoreRequest],
    groups: list[int],
    jcfg: J.JudgeConfig,
) -> C.OptionPrior:
    """The prior from ``calibration.json`` when its inputs are unchanged, else scored now."""
    path = run.run_dir / "stages" / stage / CALIBRATION_FILE
    # the call cache's keys name model, revision, messages, choices and template hash
    key = content_hash([method, jcfg.to_dict(), [caller.key(r) for r in reqs]])
    stored = _read(path)
    if isinstance(stored.get(key), dict) and "prior" in stored[key]:
        return C.OptionPrior.from_dict(stored[key]["prior"])
    cached = sum(caller.key(r) in caller.cache for r in reqs)
    desc = f"{stage} calibration ({method})"
    with Progress(len(reqs), desc, "calls", run.stream, initial=cached) as bar:
        results = caller.score(reqs, lambda idx, _res: bar.update(len(idx)))
    lo = [C.order_log_odds(r.scores, jcfg.options) if r.ok else None for r in results]
    if method == "pride":
        per_pair, start = [], 0
        for size in groups:
            chunk = lo[start : start + size]
            per_pair.append(C.pair_log_odds(list(zip(chunk[::2], chunk[1::2], strict=True))))
            start += size
        prior = C.pride(per_pair)
    else:
        prior = C.content_free(lo)
    stored[key] = {
        "method": method,
        "model": caller.model,
        "revision": caller.revision,
        "requests": len(reqs),
        "prior": prior.to_dict(),
    }
    write_atomic(path, json.dumps(stored, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return prior


def _read(path: Path) -> dict[str, Any]:
    """The estimates kept at ``path`` (hash of inputs -> entry); none when the file is missing
    or unreadable (it is then written again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
