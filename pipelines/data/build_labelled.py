"""Build the labelled prompt sets (labelled-*, style-*, tests/fixtures/labelled-mini.jsonl).

Reads the public datasets in ../shared/data (see shared/data/SOURCES.md) and writes

  pipelines/data/labelled-train.jsonl  96 rows, 32 each of harmful / safe / ordinary
  pipelines/data/labelled-eval.jsonl   60 rows, 20 each
  pipelines/data/style-train.jsonl     64 ordinary prompts that invite markdown-heavy answers
  pipelines/data/style-eval.jsonl      40 more
  tests/fixtures/labelled-mini.jsonl   the first 9 lines of labelled-train.jsonl

Rows are {"id", "prompt", "label", "source"}. Labels go round-robin harmful, safe, ordinary,
so every prefix of 3k rows is balanced. Every pool is shuffled with its own fixed seed, and a
prompt is taken only if it is neither an exact (lowercased, whitespace-collapsed) nor a near
duplicate (word Jaccard >= 0.6 or difflib ratio >= 0.85) of a prompt already taken or of one in
the existing pipelines/data files, so all files are disjoint. Re-running gives the same bytes.

    python pipelines/data/build_labelled.py            # write the files, print the checks
    python pipelines/data/build_labelled.py --check    # only compare with the files on disk
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import json
import random
import re
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "pipelines" / "data"
SHARED = REPO.parent / "shared" / "data"
SEED = 1729
LABELS = ("harmful", "safe", "ordinary")
# Existing pipeline prompt files: nothing built here may repeat (or nearly repeat) them.
EXISTING = (
    "redteam-heldout-50.jsonl",
    "xstest-safe-50.jsonl",
    "red-team-20.jsonl",
    "red-team-train-60.jsonl",
)
# Harmful rows per source: (train, eval). 32 + 20, the three sources 18 / 17 / 17.
HARMFUL_SPLIT = {"advbench": (11, 7), "harmbench": (11, 6), "strongreject": (10, 7)}
N_TRAIN, N_EVAL = 32, 20  # per label
N_STYLE_TRAIN, N_STYLE_EVAL = 64, 40

# Ordinary and style prompts must not contain words that make a request look risky, so that
# `ordinary` never holds a borderline request and stays apart from XSTest's trigger-word prompts.
TRIGGER = re.compile(
    r"\b(kill|weapon|drug|hack|steal|bomb|gun|murder|sex|porn|suicid|poison|illegal|racis|insult"
    r"|violen|terror|explosive|cheat|lie to|crime|criminal|attack|weed|marijuana|alcohol|drunk"
    r"|fight|die|dead|death)\w*",
    re.I,
)
# Style: questions and instructions whose natural answer is a list, steps or a comparison.
STYLE = re.compile(
    r"^(how (do|can|should|to|does|would|is|are)|what are|what is the best way|what can i"
    r"|what should|explain|compare|contrast|list|name|give (me )?(some|a list|tips|ideas|advice"
    r"|examples|a few|an overview|several|\d+|three|five)|what('s| is) the difference|describe"
    r"|suggest|tips|can you (give|list|suggest|recommend|explain|tell me (some|how|what|about)"
    r"|help me|provide|outline)|recommend|what (steps|factors|kinds|types|things)|provide|outline"
    r"|brainstorm|create a (list|plan|checklist|guide|schedule|itinerary|outline|step)"
    r"|make a (list|plan|checklist)|write a (list|guide|step|checklist|plan)|plan a"
    r"|why (do|does|is|are|should)|which|i want to|i'm (looking|trying|planning)"
    r"|i am (looking|trying|planning)|help me|please (explain|list|give|suggest|describe|provide))",
    re.I,
)
# Style: the prompt itself asks for a format (the answer's markdown would be requested).
FORMAT_ASKED = re.compile(r"\b(bullet|table|markdown|column)s?\b", re.I)
# Alpaca-Eval rows used for neither `ordinary` nor style, as a model may rightly decline or
# hedge them (index: why).
ALPACA_DENY = {
    96: "sexual",
    258: "faking attention",
    378: "piracy ethics",
    409: "song lyrics",
    433: "role play with Hitler",
    518: "quotes song lyrics",
    705: "judging an insult",
}
# Style: Alpaca-Eval rows the patterns let in that do not fit (index: why).
STYLE_DENY = {
    28: "profanity",
    46: "religion debate",
    84: "aiming a slingshot",
    109: "chat, not a question",
    155: "one-line answer",
    173: "children's-book joke",
    174: "one fact",
    238: "debugging one site",
    272: "arithmetic",
    300: "code",
    309: "joke",
    312: "tracking a drone",
    340: "about the assistant",
    361: "code",
    365: "formula",
    371: "about the assistant",
    392: "hearing damage",
    415: "about the assistant",
    453: "one-sided opinion",
    456: "odd request",
    457: "word puzzle",
    471: "nonsense riddle",
    511: "code",
    617: "formula",
    679: "one sentence",
    745: "role play",
    795: "letter",
    796: "letter",
}


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9']+", norm(text)))


def near(a: str, b: str) -> bool:
    wa, wb = words(a), words(b)
    if wa and wb and len(wa & wb) / len(wa | wb) >= 0.6:
        return True
    sm = difflib.SequenceMatcher(None, norm(a), norm(b))
    return sm.real_quick_ratio() >= 0.85 and sm.quick_ratio() >= 0.85 and sm.ratio() >= 0.85


def row(rid: str, prompt: str, label: str, source: str) -> dict:
    return {"id": rid, "prompt": prompt.strip(), "label": label, "source": source}


def load_pools(shared: Path) -> dict[str, list[dict]]:
    """Candidate rows per pool, in source order."""
    adv = pd.read_csv(shared / "advbench" / "harmful_behaviors.csv")
    hb = pd.read_csv(shared / "harmbench" / "harmbench_behaviors_text_all.csv")
    sr = pd.read_csv(shared / "strongreject" / "strongreject.csv")
    xs = pd.read_csv(shared / "xstest" / "xstest_prompts.csv")
    ae_path = shared / "alpaca-eval" / "gpt4_1106_preview" / "model_outputs.json"
    ae = json.loads(ae_path.read_text(encoding="utf-8"))
    pools = {
        # AdvBench: every behaviour (`goal`); id = 0-based data row.
        "advbench": [
            row(f"advbench-{i:04d}", g, "harmful", "advbench") for i, g in enumerate(adv["goal"])
        ],
        # HarmBench: standard behaviours only (contextual ones need their ContextString,
        # copyright ones ask for protected text); id = 0-based row of text_all.csv.
        "harmbench": [
            row(f"harmbench-{i:04d}", r.Behavior, "harmful", "harmbench")
            for i, r in enumerate(hb.itertuples())
            if r.FunctionalCategory == "standard"
        ],
        # StrongREJECT: the authors' own prompts (`source == custom`; the rest are borrowed
        # from AdvBench, MaliciousInstruct, DAN, ...), at most 300 characters.
        "strongreject": [
            row(f"strongreject-{i:04d}", r.forbidden_prompt, "harmful", "strongreject")
            for i, r in enumerate(sr.itertuples())
            if r.source == "custom" and len(r.forbidden_prompt.strip()) <= 300
        ],
        # XSTest: safe prompts only (the contrast prompts are labelled unsafe); XSTest's own id.
        "xstest": [
            row(f"xstest-safe-{int(r.id):04d}", r.prompt, "safe", "xstest")
            for r in xs.itertuples()
            if r.label == "safe"
        ],
        # Alpaca-Eval: instructions under 300 characters, without trigger words, not in
        # ALPACA_DENY; id = index in model_outputs.json.
        "alpaca-eval": [
            row(f"alpaca-eval-{i:04d}", x["instruction"], "ordinary", "alpaca-eval")
            for i, x in enumerate(ae)
            if len(x["instruction"].strip()) < 300
            and not TRIGGER.search(x["instruction"])
            and i not in ALPACA_DENY
        ],
    }
    return pools


def is_style(r: dict) -> bool:
    p = r["prompt"]
    return (
        len(p) < 250
        and bool(STYLE.search(p))
        and not FORMAT_ASKED.search(p)
        and int(r["id"].rsplit("-", 1)[1]) not in STYLE_DENY
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def build(shared: Path) -> tuple[dict[str, list[dict]], dict[str, int]]:
    pools = load_pools(shared)
    stats = dict.fromkeys(
        (
            "exact duplicate across sources",
            "held-out prompt",
            "near a held-out prompt",
            "taken already",
            "near a taken prompt",
        ),
        0,
    )

    # Exact duplicates across all sources: keep the first copy (pool order above), unless the
    # copies disagree on the label, then drop them all.
    seen: dict[str, set[str]] = {}
    for rows in pools.values():
        for r in rows:
            seen.setdefault(norm(r["prompt"]), set()).add(r["label"])
    first: set[str] = set()
    for name, rows in pools.items():
        kept = []
        for r in rows:
            key = norm(r["prompt"])
            if len(seen[key]) > 1 or key in first:
                stats["exact duplicate across sources"] += 1
                continue
            first.add(key)
            kept.append(r)
        pools[name] = kept
    # Style prompts come from the same Alpaca-Eval pool; rows taken as `ordinary` are skipped.
    pools["style"] = [r for r in pools["alpaca-eval"] if is_style(r)]

    held = [r["prompt"] for f in EXISTING for r in read_jsonl(DATA / f)]
    held_keys = {norm(p) for p in held}
    taken: list[str] = []

    def take(name: str, n: int) -> list[dict]:
        """The first n rows of the shuffled pool that repeat nothing held out or taken."""
        rows = list(pools[name])
        random.Random(f"{SEED}/{name}").shuffle(rows)
        out = []
        for r in rows:
            if len(out) == n:
                break
            p = r["prompt"]
            if norm(p) in held_keys:
                stats["held-out prompt"] += 1
            elif any(near(p, h) for h in held):
                stats["near a held-out prompt"] += 1
            elif norm(p) in {norm(t) for t in taken}:
                stats["taken already"] += 1
            elif any(near(p, t) for t in taken):
                stats["near a taken prompt"] += 1
            else:
                out.append(r)
                taken.append(p)
        if len(out) < n:
            sys.exit(f"pool {name}: only {len(out)} usable rows, {n} needed")
        return out

    train: dict[str, list[dict]] = {}
    evals: dict[str, list[dict]] = {}
    harm_train, harm_eval = [], []
    for name, (nt, ne) in HARMFUL_SPLIT.items():
        got = take(name, nt + ne)
        harm_train.append(got[:nt])
        harm_eval.append(got[nt:])
    train["harmful"], evals["harmful"] = roundrobin(harm_train), roundrobin(harm_eval)
    for label, name in (("safe", "xstest"), ("ordinary", "alpaca-eval")):
        got = take(name, N_TRAIN + N_EVAL)
        train[label], evals[label] = got[:N_TRAIN], got[N_TRAIN:]
    style = take("style", N_STYLE_TRAIN + N_STYLE_EVAL)

    files = {
        "pipelines/data/labelled-train.jsonl": roundrobin([train[x] for x in LABELS]),
        "pipelines/data/labelled-eval.jsonl": roundrobin([evals[x] for x in LABELS]),
        "pipelines/data/style-train.jsonl": style[:N_STYLE_TRAIN],
        "pipelines/data/style-eval.jsonl": style[N_STYLE_TRAIN:],
    }
    files["tests/fixtures/labelled-mini.jsonl"] = files["pipelines/data/labelled-train.jsonl"][:9]
    return files, stats


def roundrobin(groups: list[list[dict]]) -> list[dict]:
    out = []
    for tup in itertools.zip_longest(*groups):
        out.extend(r for r in tup if r is not None)
    return out


def encode(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def report(files: dict[str, list[dict]]) -> bool:
    ok = True

    def check(cond: bool, what: str) -> None:
        nonlocal ok
        ok = ok and cond
        print(f"  [{'ok' if cond else 'FAIL'}] {what}")

    want = {
        "labelled-train": 96,
        "labelled-eval": 60,
        "style-train": 64,
        "style-eval": 40,
        "labelled-mini": 9,
    }
    for path, rows in files.items():
        name = Path(path).stem
        print(path)
        check(len(rows) == want[name], f"{len(rows)} rows (want {want[name]})")
        labels = sorted({r["label"] for r in rows})
        per = {lab: sum(r["label"] == lab for r in rows) for lab in labels}
        src = {s: sum(r["source"] == s for r in rows) for s in sorted({r["source"] for r in rows})}
        print(f"    labels {per}  sources {src}")
        check(len({r["id"] for r in rows}) == len(rows), "ids unique")
        if name.startswith("labelled"):
            balanced = all(
                len({sum(r["label"] == lab for r in rows[:n]) for lab in LABELS}) == 1
                for n in range(3, len(rows) + 1, 3)
            )
            check(balanced, "every prefix of 3k rows has k of each label")
        else:
            check(labels == ["ordinary"], "all ordinary")
            check(max(len(r["prompt"]) for r in rows) < 250, "prompts under 250 characters")

    main = {p: r for p, r in files.items() if not p.startswith("tests/")}
    existing = {f: read_jsonl(DATA / f) for f in EXISTING}
    named = list(main.items()) + [(f"pipelines/data/{f}", r) for f, r in existing.items()]
    print("disjointness (exact, normalized prompt text; near = Jaccard >= 0.6 or ratio >= 0.85)")
    for (pa, ra), (pb, rb) in itertools.combinations(named, 2):
        if pa.split("/")[-1] in EXISTING and pb.split("/")[-1] in EXISTING:
            continue
        exact = {norm(r["prompt"]) for r in ra} & {norm(r["prompt"]) for r in rb}
        close = sum(near(a["prompt"], b["prompt"]) for a in ra for b in rb)
        check(
            not exact and not close,
            f"{Path(pa).name} vs {Path(pb).name}: {len(exact)} exact, {close} near",
        )
    for path, rows in main.items():
        close = sum(near(a["prompt"], b["prompt"]) for a, b in itertools.combinations(rows, 2))
        check(not close, f"{Path(path).name}: {close} near pairs within the file")
    allrows = [r for rows in main.values() for r in rows]
    check(len({norm(r["prompt"]) for r in allrows}) == len(allrows), "no prompt twice overall")
    check(
        files["tests/fixtures/labelled-mini.jsonl"]
        == files["pipelines/data/labelled-train.jsonl"][:9],
        "labelled-mini = first 9 train rows",
    )
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help="shared/data folder")
    ap.add_argument("--check", action="store_true", help="compare with the files on disk")
    args = ap.parse_args()
    files, stats = build(args.shared)
    print("skipped while drawing:", stats)
    stale = [
        p
        for p, rows in files.items()
        if not (REPO / p).exists() or (REPO / p).read_text(encoding="utf-8") != encode(rows)
    ]
    if args.check:
        for p in stale:
            print(f"  [FAIL] {p} differs from a fresh build")
    else:
        for p, rows in files.items():
            with open(REPO / p, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(encode(rows))
        print("wrote", ", ".join(files))
    ok = report(files)
    return 0 if ok and not (args.check and stale) else 1


if __name__ == "__main__":
    sys.exit(main())
