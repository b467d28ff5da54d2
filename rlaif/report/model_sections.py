"""Report sections about models: reward distributions, training curves, evaluation results.

Each function returns ``(body, has_data)``; a section without data says "not run" and why.
"""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from rlaif.report import figures
from rlaif.report import html as H
from rlaif.report.collect import EvalData, TrainStep

Body = tuple[Markup, bool]
N_RESPONSES = 3  # example responses shown per prompt set
_REWARD_STATS = ("n", "mean", "std", "min", "q25", "q50", "q75", "max")
# Shown up front when metrics.json has them (the ones `rlaif train` prints after a run).
_KEY_METRICS = (
    "steps", "train_loss", "eval_loss", "eval_accuracy", "eval_rewards/accuracies",
    "eval_rewards/margins", "reward_first", "reward_last", "final_reward_mean", "final_kl",
    "seconds",
)  # fmt: skip
_SAFETY = (
    ("red-team refusal rate", "red_team_refusal_rate"),
    ("red-team judged harmless rate", "red_team_judged_harmless_rate"),
    ("safe-prompt over-refusal rate", "over_refusal_rate"),
)


def _join(parts: list[Markup]) -> Markup:
    return Markup("").join(parts)


def _scalars(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flattened (key, number-or-string) pairs of a metrics dict, config left out."""
    out: list[tuple[str, Any]] = []
    for k, v in sorted(d.items()):
        if k == "config":
            continue
        if isinstance(v, dict):
            out += _scalars(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((prefix + k, v))
    return out


def rewards(ev: EvalData | None, steps: list[TrainStep], plots: dict[str, str]) -> Body:
    """Reward-model scores of the evaluated responses, per model and prompt set; ``plots``
    are :func:`rlaif.report.figures.eval_plots`."""
    parts = []
    reward_steps = [s for s in steps if s.metrics and "eval_accuracy" in s.metrics]
    if reward_steps:
        parts.append(H.h3("Reward-model accuracy on held-out pairs"))
        parts.append(
            H.table(
                ["training step", "eval_accuracy", "eval_loss"],
                [
                    [s.name, s.metrics.get("eval_accuracy"), s.metrics.get("eval_loss")]  # type: ignore[union-attr]
                    for s in reward_steps
                ],
            )
        )
    metrics = ev.report["metrics"] if ev else {}
    roles = [r for r in ("policy", "baseline") if "reward" in (metrics.get(r) or {})]
    if roles:
        rows = [
            [role, name, *[q.get(k) for k in _REWARD_STATS]]
            for role in roles
            for name, q in metrics[role]["reward"].items()
        ]
        rm = ev.report.get("reward_model") or {}  # type: ignore[union-attr]
        parts.append(H.h3("Reward-model scores of the evaluated responses"))
        parts.append(H.kv([("reward model", rm.get("model"))]))
        parts.append(H.table(["model", "prompt set", *_REWARD_STATS], rows))
        parts.append(H.img(plots.get("reward_hist.png"), "reward score histogram"))
    elif ev:
        parts.append(
            H.not_run(
                "the evaluation scored no responses with a reward model "
                "(rlaif eval --reward-model DIR)"
            )
        )
    if not parts:
        return H.not_run("no reward model was trained or used in an evaluation"), False
    return _join(parts), bool(roles or reward_steps)


def training(steps: list[TrainStep]) -> Body:
    """Per training step: its curves, first and last value of each series, final metrics."""
    if not steps:
        return H.not_run("no train/<step>/curves.jsonl or metrics.json"), False
    parts = []
    for s in steps:
        parts.append(H.h3(f"Training step '{s.name}'"))
        if s.curves:
            series: dict[str, list[tuple[int, Any]]] = {}
            for row in s.curves:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        series.setdefault(k, []).append((row.get("step"), v))
            rows = [[k, len(v), v[0][1], v[-1][1], v[-1][0]] for k, v in sorted(series.items())]
            parts.append(H.img(figures.curves(s.curves), f"training curves of {s.name}"))
            parts.append(
                H.details(
                    f"first and last value of {len(rows)} series",
                    H.table(["series", "points", "first", "last", "at step"], rows),
                )
            )
        else:
            parts.append(H.not_run("no curves.jsonl"))
        if s.metrics is not None:
            cfg = s.metrics.get("config") or {}
            parts.append(H.kv([("model", cfg.get("model")), ("dataset", cfg.get("dataset"))]))
            shown = [(k, s.metrics.get(k)) for k in _KEY_METRICS if k in s.metrics]
            if shown:
                parts.append(H.table(["metric", "value"], shown))
            parts.append(
                H.details(
                    "every value of metrics.json",
                    H.table(["metric (metrics.json)", "value"], _scalars(s.metrics)),
                )
            )
    return _join(parts), True


def _winner(verdict: Any) -> str:
    if not isinstance(verdict, dict):
        return "-"
    if verdict.get("status") != "ok":
        return f"error: {verdict.get('reason')}"
    names = {"a": "policy", "b": "baseline", "tie": "tie"}
    p = verdict.get("p_a_better")
    return f"{names.get(verdict.get('winner'), '?')} (P(policy better) = {H.num(p)})"


def evaluation(ev: EvalData | None, plots: dict[str, str]) -> Body:
    """Win rate of the policy against its starting model, safety rates, example responses;
    ``plots`` are :func:`rlaif.report.figures.eval_plots`."""
    if ev is None:
        return H.not_run("no eval/eval.json (rlaif eval --out RUN_DIR/eval)"), False
    rep, m = ev.report, ev.report["metrics"]
    models = rep.get("models") or {}
    parts = [
        H.kv(
            [
                (role, f"{(v or {}).get('model')} ({(v or {}).get('backend')})")
                for role, v in models.items()
            ]
            + [("seconds", H.num(rep.get("seconds")))]
        )
    ]
    parts.append(H.h3("Win rate, policy vs baseline (AI judge, both orders)"))
    parts.append(
        H.table(
            [
                "prompt set",
                "n",
                "wins",
                "ties",
                "losses",
                "errors",
                "win rate (ties = 0.5)",
                "win rate (decided)",
            ],
            [
                [
                    name,
                    w.get("n"),
                    w.get("wins"),
                    w.get("ties"),
                    w.get("losses"),
                    w.get("errors"),
                    H.rate(w.get("win_rate")),
                    H.rate(w.get("win_rate_decided")),
                ]
                for name, w in (m.get("win_rate") or {}).items()
            ],
        )
    )
    safety = [
        [label, H.rate((m.get("policy") or {}).get(k)), H.rate((m.get("baseline") or {}).get(k))]
        for label, k in _SAFETY
        if k in (m.get("policy") or {})
    ]
    parts.append(H.img(plots.get("win_tie_loss.png"), "wins, ties and losses"))
    parts.append(H.h3("Safety"))
    if safety:
        parts.append(H.table(["", "policy", "baseline"], safety))
        parts.append(H.img(plots.get("safety.png"), "safety rates"))
    else:
        parts.append(H.not_run("no red-team or safe prompt set"))
    if ev.rows:
        parts.append(H.h3("Example responses"))
        seen: dict[str, int] = {}
        for r in ev.rows:
            name = str(r.get("set"))
            if seen.get(name, 0) >= N_RESPONSES:
                continue
            seen[name] = seen.get(name, 0) + 1
            resp = r.get("responses") or {}
            refusal = r.get("refusal") or {}
            refused = f"{refusal.get('policy') or 'no'} / {refusal.get('baseline') or 'no'}"
            parts.append(
                Markup('<div class="example">{}{}{}{}{}{}</div>').format(
                    H.kv(
                        [
                            ("set", name),
                            ("verdict", _winner(r.get("verdict"))),
                            ("refusal (policy / baseline)", refused),
                        ]
                    ),
                    H.conversation(r.get("conversation")),
                    H.label("policy"),
                    H.text_block(resp.get("policy")),
                    H.label("baseline"),
                    H.text_block(resp.get("baseline")),
                )
            )
    return _join(parts), True
