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

from pathlib import Path
from typing import Any

from rlaif.calls.budget import spent_in_run
from rlaif.calls.caller import GenRequest, request_key
from rlaif.config.schema import PipelineConfig
from rlaif.constitution import load_constitution
from rlaif.pipeline.estimate_base import (
    FAILED,
    CountingModel,
    Estimate,
    Models,
    RowsBound,
    RunDirView,
    StageEstimate,
    add_call,
)
from rlaif.pipeline.sl_cai import step_names
from rlaif.pipeline.steps import step_id
from rlaif.prompts import PromptBook
from rlaif.sources import read_pipeline_prompts
from rlaif.stages import contrast as C
from rlaif.stages import critique as cai
from rlaif.stages import judge as J
from rlaif.stages.pairs import candidate_pairs
from rlaif.store import record_id

SAMPLE = 1000  # rows whose lengths bound an export's mean row length


class _Planner:
    """Walks the runner's plan for every prompt, on known outputs where there are some."""

    def __init__(
        self, cfg: PipelineConfig, view: RunDirView, models: dict[str, CountingModel]
    ) -> None:
        self.cfg = cfg
        self.view = view
        self.models = models
        self.constitution = load_constitution(cfg.constitution_ref())
        self.book = PromptBook(cfg.resolve_path(cfg.templates) if cfg.templates else None)

    def gen(
        self, st: StageEstimate, m: CountingModel, req: GenRequest, known: bool, bound: int
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

    def add(self, st: StageEstimate, m: CountingModel, req: Any, known: bool, bound: int) -> None:
        add_call(st, m.count, req, known, bound)

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

    def bounds(self, items: list, traces: dict | None, pairs: list | None) -> dict[str, RowsBound]:
        """The most rows of each export, and their mean tokens (:class:`RowsBound`)."""
        count, out = self.models["policy"].count, {}

        def measure(rows: list[tuple], basis: str) -> RowsBound:
            seqs = [(count(p), [count([*p, {"role": "assistant", "content": t or ""}]) for t in ts],
                     extra) for p, ts, extra in rows[:SAMPLE]]  # fmt: skip
            n = max(1, len(seqs))
            return RowsBound(len(rows), sum(sum(t) + e for _, t, e in seqs) / n,
                             sum(p for p, _, _ in seqs) / n, basis)  # fmt: skip

        cr = self.cfg.stages.critique_revise
        if traces is not None and cr is not None:
            ok = [(it.messages(), traces[it.id]) for it in items if traces.get(it.id) is not FAILED]
            rev, resp = cr.revise.max_new_tokens, cr.respond.max_new_tokens
            basis = "≤ one row per prompt whose critique-revise chain succeeds"
            out["sft"] = measure([(p, [f], rev * (f is None)) for p, (_, f) in ok], basis)
            out["pairs"] = measure(
                [(p, [f, i], rev * (f is None) + resp * (i is None)) for p, (i, f) in ok], basis
            )
        if pairs is not None:
            basis = f"≤ the data step's {len(pairs)} pairs to judge (filters and test split drop)"
            out["preferences"] = measure([(p[1], [p[2], p[3]], p[7]) for p in pairs], basis)
        return out

    def judge(
        self, pairs: list[tuple], name: str, m: CountingModel, out: list[StageEstimate]
    ) -> None:
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
    model = Models()
    models = {"policy": model(cfg.model)}
    view = RunDirView(run_dir, retry_errors)
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
        pairs = None
        if s.judge is not None or contrast is not None:
            pairs = contrast if contrast is not None else plan.pairs(items, traces, samples)
        if s.judge is not None:
            judges = [s.judge.model or cfg.model, *s.judge.extra_models]
            for n, jm in enumerate(judges):
                plan.judge(pairs, "judge" if n == 0 else f"judge-{n + 1}", model(jm), est.stages)
        est.exports = plan.bounds(items, traces, pairs)
    finally:
        view.close()
    if s.train or s.eval is not None:
        from rlaif.pipeline.estimate_post import estimate_post

        estimate_post(cfg, est, items, model)
    est.counting = model.counting()
    return est
