"""HTML building blocks of the report: escaped text, tables, sections and the page shell.

Everything is :class:`markupsafe.Markup` (the escaping library Jinja2 itself uses): a plain
``str`` passed to any helper here is escaped, and ``Markup.format`` escapes its arguments, so
text from data (prompts, model outputs, principle text, file names) can never become markup.
Only the helpers in this module produce tags. The page has inline CSS, no scripts and no
external resources: it is one file that opens offline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from markupsafe import Markup, escape

MAX_TEXT = 1200  # characters of one model output shown in full; the rest is counted
# Control characters (a tiny model emits them) are not allowed in HTML text: show them escaped.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;
background:#f5f6f8}
header{background:#1d2a44;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c8d0e0}
nav{background:#fff;border-bottom:1px solid #dde1e8;padding:8px 28px;position:sticky;top:0}
nav a{margin-right:14px;color:#2a5bd7;text-decoration:none;font-size:13px}
nav a.missing{color:#9aa3b2}
main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;margin:18px 0;
padding:6px 20px 16px}
h2{font-size:18px;border-bottom:1px solid #eef0f4;padding-bottom:6px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #e1e4ea;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f6}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.not-run{color:#8a6d00;background:#fff8e1;border:1px solid #f3e2a6;padding:6px 10px;
border-radius:4px;display:inline-block}
.note{color:#5b6474;font-size:12px}
.warn{color:#a4262c}
img.plot{max-width:100%;border:1px solid #eef0f4;margin:6px 0}
pre.text{white-space:pre-wrap;word-break:break-word;background:#f7f8fa;border:1px solid #e6e8ee;
padding:6px 8px;margin:2px 0;font-size:12.5px;max-height:260px;overflow:auto}
.label{font-weight:600;margin-top:8px}
.role{color:#5b6474;font-size:12px;font-style:italic}
.example{border-left:3px solid #c5cde0;padding-left:10px;margin:10px 0}
details{margin:6px 0}
summary{cursor:pointer;color:#2a5bd7}
code{background:#f0f2f6;padding:0 3px;border-radius:3px}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:2px 16px;margin:8px 0}
dl.kv dt{color:#5b6474}
dl.kv dd{margin:0;word-break:break-all}
"""


def clean(text: str) -> str:
    """``text`` with control characters written as escapes (``\\x02``), which HTML forbids."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def num(x: Any, digits: int = 3) -> str:
    """A number for a table cell: integers as is, floats to ``digits`` places, None as "-"."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x.is_integer() and abs(x) < 1e15:
            return f"{int(x):,}"
        if abs(x) < 10**-digits or abs(x) >= 1e5:
            return f"{x:.{digits + 1}g}"  # 1e-05 stays visible instead of 0.000
        return f"{x:.{digits}f}"
    return str(x)


def rate(r: dict[str, Any] | None, ci: bool = True) -> str:
    """An audit-style rate ``{"rate", "k", "n", "ci95"}`` as ``0.50 [0.20, 0.80] (4/8)``."""
    if not r or r.get("rate") is None:
        return "-"
    text = f"{r['rate']:.2f}"
    if ci and r.get("ci95"):
        lo, hi = r["ci95"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    k = r.get("k")
    k = int(k) if isinstance(k, float) and k.is_integer() else k
    return text + f" ({num(k)}/{num(r.get('n'))})"


def cell(value: Any) -> Markup:
    """One ``<td>``: numbers right-aligned, Markup kept, anything else escaped."""
    if isinstance(value, Markup):
        return Markup("<td>{}</td>").format(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Markup('<td class="num">{}</td>').format(num(value))
    return Markup("<td>{}</td>").format("-" if value is None else clean(str(value)))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Markup:
    """A table; every cell goes through :func:`cell`."""
    head = Markup("").join(Markup("<th>{}</th>").format(h) for h in headers)
    body = Markup("").join(
        Markup("<tr>{}</tr>").format(Markup("").join(cell(v) for v in row)) for row in rows
    )
    return Markup("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>").format(head, body)


def kv(pairs: Iterable[tuple[str, Any]]) -> Markup:
    """A definition list of (label, value) pairs; values escaped unless Markup."""
    items = Markup("").join(
        Markup("<dt>{}</dt><dd>{}</dd>").format(
            clean(str(k)), "-" if v is None else v if isinstance(v, Markup) else clean(str(v))
        )
        for k, v in pairs
    )
    return Markup('<dl class="kv">{}</dl>').format(items)


def details(summary: str, body: Markup) -> Markup:
    """A collapsed block (plain HTML ``<details>``, no script) for long tables."""
    return Markup("<details><summary>{}</summary>{}</details>").format(summary, body)


def p(text: Any, cls: str | None = None) -> Markup:
    if cls:
        return Markup('<p class="{}">{}</p>').format(cls, text)
    return Markup("<p>{}</p>").format(text)


def label(text: Any) -> Markup:
    """A small bold heading on its own line, above a text block."""
    return Markup('<div class="label">{}</div>').format(text)


def h3(text: Any) -> Markup:
    return Markup("<h3>{}</h3>").format(text)


def not_run(what: str) -> Markup:
    """The marker of a section or part whose data does not exist."""
    return Markup('<p class="not-run">not run: {}</p>').format(what)


def code(text: Any) -> Markup:
    return Markup("<code>{}</code>").format(text)


def text_block(text: Any, limit: int = MAX_TEXT) -> Markup:
    """Model or prompt text, escaped, whitespace kept, long text cut with a count."""
    s = "" if text is None else str(text)
    if len(s) > limit:
        s = f"{s[:limit]}\n… ({len(s) - limit:,} more characters)"
    s = clean(s)
    return Markup('<pre class="text">{}</pre>').format(s)


def conversation(messages: Any) -> Markup:
    """Chat messages (or a plain string) as labelled text blocks."""
    if isinstance(messages, str):
        return text_block(messages)
    if not isinstance(messages, list):
        return text_block(repr(messages))
    parts = []
    for m in messages:
        if isinstance(m, dict):
            parts.append(Markup('<div class="role">{}</div>').format(m.get("role", "?")))
            parts.append(text_block(m.get("content", "")))
    return Markup("").join(parts)


def img(uri: str | None, alt: str) -> Markup:
    """An embedded plot; ``uri`` must be a ``data:image/png;base64,`` URI made here."""
    if not uri:
        return Markup("")
    if not uri.startswith("data:image/png;base64,"):
        raise ValueError("only embedded PNG data URIs may be shown")  # never a remote URL
    return Markup('<img class="plot" alt="{}" src="{}">').format(alt, uri)


def section(sid: str, title: str, body: Markup) -> Markup:
    return Markup('<section id="{}"><h2>{}</h2>{}</section>').format(sid, title, body)


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, Markup, bool]]) -> str:
    """The whole document: header, a table of contents, then the sections.

    Args:
        title, subtitle: header lines (escaped).
        sections: (id, title, body, has data); sections without data are greyed in the
            table of contents.
    """
    nav = Markup("").join(
        Markup('<a href="#{}"{}>{}</a>').format(
            sid, Markup("") if present else Markup(' class="missing"'), name
        )
        for sid, name, _, present in sections
    )
    body = Markup("").join(section(sid, name, b) for sid, name, b, _ in sections)
    doc = Markup(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Defence in depth: even a bug in escaping could load nothing and run nothing.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        "<title>{}</title><style>{}</style></head><body>"
        "<header><h1>{}</h1><p>{}</p></header><nav>{}</nav><main>{}</main></body></html>\n"
    ).format(title, Markup(CSS), title, subtitle, nav, body)
    return str(doc)


def escape_text(text: Any) -> Markup:
    """Escaped text (re-exported for callers that build their own fragments)."""
    return escape(text)
