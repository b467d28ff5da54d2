"""``rlaif run --dry-run``: the model calls and tokens a run still needs, before it runs.

The estimate replays the runner's plan without a model: it renders the real prompts of every
step and counts their tokens with the model's own tokenizer (the fake backend counts words;
a backend with no local tokenizer gets characters / 4). The first step of each prompt
(``respond``, ``sample``) is counted exactly. A later step shows a model's earlier output:
where that output is already on disk (an earlier, unfinished run of the same run dir) it is
used and the count is exact; where it is not, the step is rendered with an empty output and
each missing output counted at its ``max_new_tokens``, an upper bound (marked ``≤``).
Completion tokens are always the most a call may generate (``max_new_tokens x n``), and a
call with ``n`` completions counts its prompt ``n`` times, as the backends report it.

Requests already answered (a step record in the run dir, or an entry in its call cache) are
counted as ``done`` and cost nothing, exactly as a resumed run would skip them. Calls assume
every request succeeds and every revision differs from its response (a judged CAI-SL pair);
failures only make the real numbers smaller.

Nothing here loads model weights, takes the run lock or writes into the run dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlaif.backends.base import Conversation
from rlaif.calls.budget import Usage, spent_in_run
from rlaif.calls.caller import GenRequest, max_completion_tokens, prompt_copies, request_key
from rlaif.config.schema import BudgetConfig, ModelConfig, PipelineConfig
from rlaif.constitution import load_constitution
from rlaif.pipeline.sl_cai import step_names
from rlaif.pipeline.steps import step_id
from rlaif.prompts import PromptBook
from rlaif.sources import read_pipeline_prompts
from rlaif.stages import contrast as C
from rlaif.stages import critique as cai
from rlaif.stages import judge as J
from rlaif.stages.pairs import candidate_pairs
from rlaif.store import StageStore, record_id
from rlaif.store.jsonl import JsonlReader, decode_line, read_line_at

FAILED = "failed"  # a step whose record is an error: the prompt's chain ends there


def _rough_count(conversation: Conversation) -> int:
    return sum(len(m.get("content", "")) for m in conversation) // 4


@dataclass
class StageEstimate:
    """The remaining work of one step of the run.

    Attributes:
        name: the step (``respond``, ``critique-1``, ``sample``, ``judge``, ``judge-2``...).
        model: the model that answers it.
        calls: requests still to send.
        done: requests already answered (records or call cache): no cost.
        prompt_tokens: prompt tokens of the remaining calls.
        completion_tokens: the most completion tokens the remaining calls may generate.
        bounded: whether ``prompt_tokens`` holds upper bounds (unknown model outputs).
    """

    name: str
    model: str
    calls: int = 0
    done: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bounded: bool = False

    @property
    def usage(self) -> Usage:
        return Usage(self.calls, self.prompt_tokens, self.completion_tokens)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Estimate:
    """What a run of a pipeline still needs, per step, and what its run dir has spent."""

    pipeline: str
    run_dir: Path
    prompts: int
    started: bool  # the run dir holds an earlier run's work
    stages: list[StageEstimate] = field(default_factory=list)
    counting: dict[str, str] = field(default_factory=dict)  # model -> how tokens are counted
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    spent: Usage = field(default_factory=Usage)  # already used by this run dir (call cache)
    not_counted: list[str] = field(default_factory=list)  # stages with no estimate here

    @property
    def total(self) -> Usage:
        return sum((s.usage for s in self.stages), Usage())

    @property
    def done(self) -> int:
        return sum(s.done for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "run_dir": str(self.run_dir),
            "prompts": self.prompts,
            "started": self.started,
            "stages": [s.to_dict() for s in self.stages],
            "total": self.total.to_dict(),
            "done": self.done,
            "counting": dict(self.counting),
            "spent": self.spent.to_dict(),
            "not_counted": list(self.not_counted),
        }


@dataclass
class _Model:
    """A model as the runner identifies it (for record ids and cache keys), and a counter."""

    model: str
    revision: str | None
    count: Callable[[Conversation], int]
    how: str


def _hf_model(m: ModelConfig) -> _Model:
    """The model's identity and tokenizer without loading weights (a GGUF is not converted:
    its tokenizer is read from the converted copy if there is one, else from the file)."""
    from transformers import AutoTokenizer

    from rlaif.backends import resolve as R
    from rlaif.backends.local import prompt_ids

    model = m.id.strip()
    local = Path(model).expanduser()
    gguf: Path | None = None
    if local.is_file() and local.suffix == ".gguf":
        gguf = local.resolve()
    elif (
        model == R.DEFAULT_MODEL
        and m.revision is None
        and not local.is_dir()
        and R._hub_cached(model, None) is None  # the order of resolve_model's lookups
    ):
        gguf = R.default_gguf()
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
    if gguf is not None:
        sha = R.file_sha256(gguf)
        revision: str | None = "sha256:" + sha
        converted = R.cache_dir() / "models" / f"{gguf.stem}-{sha[:16]}"  # as convert_gguf
        if converted.is_dir():
            folder = converted
        else:  # slower (the GGUF's metadata is parsed) but loads no weights
            folder, kwargs["gguf_file"] = gguf.parent, gguf.name
    else:
        resolved = R.resolve_model(
            model, revision=m.revision, trust_remote_code=m.trust_remote_code
        )
        model, revision, folder = resolved.model_id, resolved.revision, resolved.path
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    return _Model(
        model,
        revision,
        lambda conv: len(prompt_ids(tokenizer, conv)),
        "its tokenizer, chat template included (as the backend counts)",
    )


def _identify(m: ModelConfig) -> _Model:
    if m.backend == "fake":
        from rlaif.backends.fake import FakeBackend

        # its count does not depend on its options (canned replies, failure markers)
        return _Model(m.id, None, FakeBackend().count_tokens, "whitespace words (fake backend)")
    if m.backend in ("transformers", "vllm", "auto"):
        return _hf_model(m)
    # A served model: no local tokenizer to ask, so the base backend's rough count.
    return _Model(m.id, m.revision, _rough_count, "characters / 4 (no local tokenizer; rough)")


class _RunDir:
    """Read-only view of what a run dir already holds: step records and cached answers."""

    def __init__(self, path: Path, retry_errors: bool) -> None:
        self.path = path
        self.retry_errors = retry_errors
        self._stores: dict[str, StageStore | None] = {}
        self._fd: int | None = None
        self.cache_path = path / "cache" / "calls.jsonl"
        self.cache: dict[str, int] = {}
        for offset, entry in JsonlReader(self.cache_path, tail="ignore"):
            if isinstance(entry, dict) and isinstance(entry.get("key"), str):
                self.cache.setdefault(entry["key"], offset)

    def record(self, stage: str, rid: str) -> dict[str, Any] | None:
        """The record ``rid`` of ``stage`` if a resumed run would reuse it, else None."""
        if stage not in self._stores:
            exists = (self.path / "stages" / stage).is_dir()
            self._stores[stage] = (
                StageStore(self.path, stage, readonly=True, retry_errors=self.retry_errors)
                if exists
                else None
            )
        store = self._stores[stage]
        return store.get(rid) if store is not None and store.is_done(rid) else None

    def cached(self, key: str) -> Any:
        offset = self.cache.get(key)
        if offset is None:
            return None
        if self._fd is None:
            self._fd = os.open(self.cache_path, os.O_RDONLY)
        return decode_line(read_line_at(self._fd, offset))["value"]

    def close(self) -> None:
        for store in self._stores.values():
            if store is not None:
                store.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Planner:
    """Walks the runner's plan for every prompt, on known outputs where there are some."""

    def __init__(self, cfg: PipelineConfig, view: _RunDir, models: dict[str, _Model]) -> None:
        self.cfg = cfg
        self.view = view
        self.models = models
        self.constitution = load_constitution(cfg.constitution_ref())
        self.book = PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None)

    def gen(
        self, st: StageEstimate, m: _Model, req: GenRequest, known: bool, bound: int
    ) -> list[str] | str | None:
        """One generation request: its texts when answered, FAILED, or None (still to do).

        ``known``: the request is exactly what the runner will send; else ``bound`` tokens
        stand for the model outputs missing from it.
        """
        if known:
            rec = self.view.record(st.name, step_id(st.name, req, m))  # type: ignore[arg-type]
            if rec is not None:
                st.done += 1
                if rec["status"] != "ok":
                    return FAILED
                return rec.get("texts") or [rec.get("text", "")]
            value = self.view.cached(request_key(m.model, m.revision, req))
            if isinstance(value, list) and value:
                st.done += 1
                return [c.get("text", "") for c in value]
        self.add(st, m, req, known, bound)
        return None

    def add(self, st: StageEstimate, m: _Model, req: Any, known: bool, bound: int) -> None:
        st.calls += 1
        st.prompt_tokens += (m.count(req.messages) + bound) * prompt_copies(req)
        st.completion_tokens += max_completion_tokens(req)
        st.bounded = st.bounded or not known

    def sl_cai(self, items: list, out: list[StageEstimate]) -> dict[str, Any]:
        """SL-CAI steps; returns prompt id -> FAILED or (initial, final) (None = unknown)."""
        cfg, stage = self.cfg, self.cfg.stages.critique_revise
        assert stage is not None
        m = self.models["policy"]
        steps = {n: StageEstimate(n, m.model) for n in step_names(stage.rounds)}
        out.extend(steps.values())
        ctx = cai.CritiqueContext(
            self.constitution, self.book, cfg.system, stage.few_shot, cfg.seed
        )
        seed = cfg.seed  # the per-step seed offsets below are those of sl_cai.critique_revise_wave
        traces: dict[str, Any] = {}
        for item in items:
            conv = item.messages()
            resp = self.gen(
                steps["respond"],
                m,
                cai.respond_request(ctx, conv, stage.respond.params(seed)),
                True,
                0,
            )
            if resp is FAILED:
                traces[item.id] = FAILED
                continue
            initial = cai.clean(resp[0]) if resp else None
            current, current_max = initial, stage.respond.max_new_tokens
            for r in range(1, stage.rounds + 1):
                p = cai.principle_for(ctx, item.id, r)
                params = stage.critique.params(seed + 1000 * r + 1)
                req = cai.critique_request(ctx, conv, current or "", p, params)
                missing = 0 if current is not None else current_max
                crit = self.gen(steps[f"critique-{r}"], m, req, not missing, missing)
                if crit is FAILED:
                    break
                critique = cai.clean(crit[0]) if crit else None
                missing += 0 if critique is not None else stage.critique.max_new_tokens
                params = stage.revise.params(seed + 1000 * r + 2)
                req = cai.revise_request(ctx, conv, current or "", p, critique or "", params)
                rev = self.gen(steps[f"revise-{r}"], m, req, not missing, missing)
                if rev is FAILED:
                    break
                current = cai.clean(rev[0]) if rev else None
                current_max = stage.revise.max_new_tokens
            else:
                traces[item.id] = (initial, current)
                continue
            traces[item.id] = FAILED
        return traces

    def sample(self, items: list, out: list[StageEstimate]) -> dict[str, Any]:
        """The sample step; returns prompt id -> FAILED, texts, or None (unknown)."""
        cfg, stage = self.cfg, self.cfg.stages.sample
        assert stage is not None
        m = self.models["policy"]
        st = StageEstimate("sample", m.model)
        out.append(st)
        params = stage.params(cfg.seed + 7)  # as runner._sample
        samples: dict[str, Any] = {}
        for item in items:
            r = self.book.render("respond", conversation=item.messages(), system=cfg.system)
            texts = self.gen(st, m, GenRequest(r.messages, params, r.template_hash), True, 0)
            samples[item.id] = (
                texts if texts is None or texts is FAILED else [cai.clean(t) for t in texts]
            )
        return samples

    def contrast(self, items: list, out: list[StageEstimate]) -> list[tuple]:
        """The contrast step (two requests per prompt, as pipeline.contrast); returns the pairs
        its filter judge sees (x, y None where not generated yet)."""
        cfg, stage = self.cfg, self.cfg.stages.contrast
        assert stage is not None
        m, st = self.models["policy"], StageEstimate("contrast", self.models["policy"].model)
        out.append(st)
        params, pairs = stage.generation.params(cfg.seed + 11), []
        for item in items:
            p, texts = C.contrast_principle(self.constitution, cfg.seed, item.id), []
            for side in C.SIDES:
                req = C.contrast_request(self.book, item.messages(), p, side, stage.placement,
                                         cfg.system, params)  # fmt: skip
                got = self.gen(st, m, req, True, 0)
                texts.append(C.strip_affix(cai.clean(got[0]), p) if isinstance(got, list) else None)
            missing = sum(stage.generation.max_new_tokens for t in texts if t is None)
            pairs.append((item.id, item.messages(), *texts, "contrast", 0, 1, missing))
        return pairs

    def pairs(self, items: list, traces: dict | None, samples: dict | None) -> list[tuple]:
        """(prompt id, prompt, x, y, source, i, j, missing tokens) per pair to judge."""
        cfg = self.cfg
        jstage = cfg.stages.judge
        assert jstage is not None
        out: list[tuple] = []
        for item in items:
            t = (traces or {}).get(item.id, FAILED)
            if traces is None or not jstage.cai_sl or t is FAILED:
                continue
            initial, final = t
            if initial is not None and final is not None and final.strip() == initial.strip():
                continue  # the runner judges no revision identical to its response
            cr = cfg.stages.critique_revise
            assert cr is not None
            missing = (cr.revise.max_new_tokens if final is None else 0) + (
                cr.respond.max_new_tokens if initial is None else 0
            )
            out.append((item.id, item.messages(), final, initial, "cai_sl", 0, 1, missing))
        for item in items:
            texts = (samples or {}).get(item.id, FAILED)
            if texts is FAILED:
                continue
            if texts is None:  # unknown samples: every pair of n, each text at its maximum
                assert cfg.stages.sample is not None
                n, most = cfg.stages.sample.n, cfg.stages.sample.max_new_tokens
                ij = [(i, j) for i in range(n) for j in range(i + 1, n)]
                out += [
                    (item.id, item.messages(), None, None, "samples", i, j, 2 * most) for i, j in ij
                ]
                continue
            ij, _ = candidate_pairs(texts, "all")
            out += [
                (item.id, item.messages(), texts[i], texts[j], "samples", i, j, 0) for i, j in ij
            ]
        return out

    def judge(self, pairs: list[tuple], name: str, m: _Model, out: list[StageEstimate]) -> None:
        cfg, jstage = self.cfg, self.cfg.stages.judge
        assert jstage is not None
        jcfg = J.judge_config(jstage)
        st = StageEstimate(name, m.model)
        out.append(st)
        if jstage.kind in ("python", "reward_model"):
            return  # scored by the user's function or a reward model: no judge model call
        # a judge kind's records have ids of their own: count what is done by the cache alone
        plain = jstage.kind == "auto" and not jstage.label_noise
        for pid, prompt, x, y, source, i, j, missing in pairs:
            principles = J.judge_principles(
                self.constitution, jcfg.principles_k, cfg.seed, f"{pid}:{i}:{j}:{source}",
                jstage.kind,
            )  # fmt: skip
            principles = [p for p in principles if not J.rule_judged(p, jstage.kind)]
            if not principles:
                continue  # judged by rule checks only
            reqs = [
                J.judge_requests(self.book, prompt, x or "", y or "", p, jcfg, system=cfg.system)
                for p in principles
            ]
            known = x is not None and y is not None
            if known:
                rid = record_id(  # as rl_cai.judge_wave
                    "judge",
                    {
                        "prompt": prompt,
                        "x": x,
                        "y": y,
                        "source": source,
                        "requests": [[r.messages for r in rr] for rr in reqs],
                        "judge": jcfg.to_dict(),
                        "model": m.model,
                        "revision": m.revision,
                    },
                )
            # A principle drawn twice gives identical requests, which the runner sends once.
            distinct = list({p.id: rr for p, rr in zip(principles, reqs, strict=True)}.values())
            if known and plain and self.view.record(name, rid) is not None:
                st.done += 2 * len(distinct)
                continue
            for req in (r for rr in distinct for r in rr):
                if known and request_key(m.model, m.revision, req) in self.view.cache:
                    st.done += 1
                else:
                    self.add(st, m, req, known, missing)


def estimate_pipeline(
    cfg: PipelineConfig, *, out: str | Path | None = None, retry_errors: bool = False
) -> Estimate:
    """The model calls and tokens still needed to finish a run of ``cfg``.

    Args:
        cfg: the validated pipeline config.
        out: the run dir (default ``cfg.output``); what it already holds is not redone.
        retry_errors: count failed requests as redone, as ``rlaif run --retry-errors`` would.

    Returns:
        Per-step calls and tokens (see the module docstring for what is exact and what is an
        upper bound), and what the run dir has spent so far.
    """
    run_dir = Path(out or cfg.output)
    items, _ = read_pipeline_prompts(cfg)
    found: dict[str, _Model] = {}

    def model(m: ModelConfig) -> _Model:
        key = repr((m.backend, m.id, m.revision, sorted(m.options.items(), key=str)))
        if key not in found:
            found[key] = _identify(m)
        return found[key]

    models = {"policy": model(cfg.model)}
    view = _RunDir(run_dir, retry_errors)
    est = Estimate(
        cfg.name,
        run_dir,
        len(items),
        (run_dir / "stages").is_dir() or bool(view.cache),
        budget=cfg.budget,
        spent=spent_in_run(view.cache_path),
    )
    try:
        plan = _Planner(cfg, view, models)
        s = cfg.stages
        traces = plan.sl_cai(items, est.stages) if s.critique_revise else None
        samples = plan.sample(items, est.stages) if s.sample else None
        contrast = plan.contrast(items, est.stages) if s.contrast else None
        if s.judge is not None:
            pairs = contrast if contrast is not None else plan.pairs(items, traces, samples)
            judges = [s.judge.model or cfg.model, *s.judge.extra_models]
            for n, jm in enumerate(judges):
                plan.judge(pairs, "judge" if n == 0 else f"judge-{n + 1}", model(jm), est.stages)
    finally:
        view.close()
    est.counting = {m.model: m.how for m in found.values()}
    # training and evaluation run after the data stages, with callers of their own
    est.not_counted = [f"stages.{n}" for n in ("train", "eval") if getattr(s, n, None)]
    return est
