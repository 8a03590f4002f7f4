"""The audit report: Markdown and HTML tables, a stacked bar chart like Magesh et al.'s Figure 1, and
example failures of each type.

The chart draws one horizontal bar per system split into accurate / incomplete / hallucinated
(shares of all queries), with the paper's four systems underneath for reference.

Every bar, table row and example names what produced the system's answers (``metrics["systems"][s]
["generator"]``, recorded by the runner), by its short name: ``simulated closed-book`` and
``extractive`` for the deterministic stand-ins, so their numbers never read as a language model's.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

# Magesh et al. 2024, Figure 1 / Table 2: share of all queries (accurate, incomplete, hallucinated).
PAPER = {
    "Lexis+ AI": (0.65, 0.18, 0.17),
    "Westlaw AI-Assisted Research": (0.42, 0.25, 0.33),
    "Ask Practical Law AI": (0.20, 0.63, 0.17),
    "GPT-4 (closed-book)": (0.49, 0.08, 0.43),
}
COLORS = {"accurate": "#4c9a2a", "incomplete": "#b8b8b8", "hallucinated": "#c0392b"}
FAILURES = {
    "incorrect": lambda r: r["correctness"] == "incorrect",
    "misgrounded": lambda r: r["groundedness"] == "misgrounded",
    "refusal / abstention": lambda r: r["correctness"] == "refusal" or r.get("status") == "abstained",
    "ungrounded": lambda r: r["groundedness"] == "ungrounded",
    "nonexistent citation": lambda r: any(c["existence"] == "nonexistent" for c in r.get("citations", [])),
}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _cell(d: dict) -> str:
    return f"{_pct(d['rate'])} [{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}]"


def generator_short(entry: dict) -> str:
    """Short name of the generator behind a system's metrics entry: ``"simulated closed-book (MemoryGenerator: ...)"``
    -> ``"simulated closed-book"``; ``"-"`` when the metrics do not record one."""
    return (entry.get("generator") or "").split(" (")[0].strip() or "-"


def chart_labels(metrics: dict, include_paper: bool = True) -> list[str]:
    """The chart's bar labels, top to bottom: ours with their generator, then the paper's systems."""
    names = []
    for s, e in metrics["systems"].items():
        g = generator_short(e)
        names.append(f"{s} (ours, {g})" if g != "-" else f"{s} (ours)")
    if include_paper:
        names += [f"{s} (paper)" for s in PAPER]
    return names


def plot(metrics: dict, path: str | Path, include_paper: bool = True) -> Path:
    """Stacked horizontal bars (accurate / incomplete / hallucinated) per system; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = chart_labels(metrics, include_paper)
    vals = [tuple(e["overall"][k]["rate"] or 0.0 for k in ("accurate", "incomplete", "hallucinated"))  # None: no answers
            for e in metrics["systems"].values()]
    if include_paper:
        vals += list(PAPER.values())
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(names) + 1.4))
    y = list(range(len(names)))[::-1]
    left = [0.0] * len(names)
    for i, lab in enumerate(("accurate", "incomplete", "hallucinated")):
        w = [v[i] for v in vals]
        ax.barh(y, w, left=left, color=COLORS[lab], label=lab.capitalize(), edgecolor="white", height=0.7)
        for yy, l0, ww in zip(y, left, w):
            if ww >= 0.06:
                ax.text(l0 + ww / 2, yy, f"{100 * ww:.0f}%", ha="center", va="center", fontsize=8, color="white")
        left = [a + b for a, b in zip(left, w)]
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of all queries")
    ax.set_title("Accurate / incomplete / hallucinated responses (after Magesh et al. 2024, Fig. 1)", fontsize=10)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.45 if len(names) < 6 else -0.3), ncol=3, frameon=False, fontsize=9)
    if include_paper and metrics["systems"]:
        ax.axhline(len(PAPER) - 0.5, color="black", lw=0.6, ls="--")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def examples(rows: list[dict], per_type: int = 1) -> dict:
    """First ``per_type`` rows of each failure type per system (file order, so stable)."""
    out: dict = {}
    for name, pred in FAILURES.items():
        got = []
        for s in sorted({r["system"] for r in rows}):
            got += [r for r in rows if r["system"] == s and r.get("status") != "error" and pred(r)][:per_type]
        out[name] = got
    return out


def _example_md(r: dict, gen: str = "-") -> str:
    cites = "; ".join(f"`{c['normalized']}` ({c['existence']}" + ("" if c.get("supported") is None else
                      f", support {c['support_score']}") + ")" for c in r.get("citations", [])) or "none"
    gen = "" if gen == "-" else f" ({gen})"
    return (f"- **{r['system']}**{gen} · `{r['query_id']}` ({r['category']}): {r['question']}\n"
            f"  - gold: {r['gold_answer'][:200]}\n  - answer: {r['answer'][:400]}\n"
            f"  - labels: {r['correctness']} / {r['groundedness']} -> **{r['label']}**; citations: {cites}\n")


def _retrieval_md(metrics: dict, cats: list[str]) -> list[str]:
    """The retrieval-quality table: recall@k, hit@k and MRR of the retrieved passages against the gold passages,
    overall (with 95% intervals) and MRR per category; systems that retrieve nothing are left out."""
    rs = {s: e for s, e in metrics["systems"].items() if e.get("retrieval")}
    if not rs:
        return []
    lines = ["", "## Retrieval quality (against the queries' gold passages)", "",
             "| system | k | recall@k | hit@k | MRR | " + " | ".join(f"MRR {c}" for c in cats) + " | queries |",
             "|---" * (len(cats) + 6) + "|"]
    for s, e in rs.items():
        r = e["retrieval"]
        per = [e["by_category"].get(c, {}).get("retrieval") for c in cats]
        lines.append(f"| {s} | {r['k']} | {_cell(r['recall_at_k'])} | {_cell(r['hit_at_k'])} | {r['mrr']['rate']:.3f} "
                     f"[{r['mrr']['ci95'][0]:.3f}, {r['mrr']['ci95'][1]:.3f}] | "
                     + " | ".join(f"{x['mrr']['rate']:.3f}" if x else "-" for x in per) + f" | {r['n']} |")
    return lines


def write_report(out_dir: str | Path, metrics: dict, rows: list[dict], title: str = "Legal RAG hallucination audit",
                 extra_md: str = "", intro_md: str = "") -> dict:
    """Write ``report.md``, ``report.html`` and ``audit_chart.png`` into ``out_dir``; returns their paths.

    ``intro_md`` goes right under the Markdown title (a study's claims table), ``extra_md`` at the end."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chart = plot(metrics, out / "audit_chart.png")
    lines = [f"# {title}", ""] + ([intro_md, ""] if intro_md else [])
    lines += [f"{metrics.get('n_queries', '?')} queries; rates in % of all queries with bootstrap 95% "
             f"intervals ({metrics.get('n_boot')} resamples, seed {metrics.get('seed')}).", "",
             "![stacked bar chart](audit_chart.png)", "", "## Overall", "",
             "| system | generator | accurate | incomplete | hallucinated | hallucinated among answered | answered | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for s, e in metrics["systems"].items():
        o = e["overall"]
        lines.append(f"| {s} | {generator_short(e)} | {_cell(o['accurate'])} | {_cell(o['incomplete'])} | {_cell(o['hallucinated'])} | "
                     f"{_cell(o['hallucinated_among_answered'])} | {o['answered']}/{o['n']} | {e['errors']} |")
    lines += ["", "Paper (Magesh et al. 2024, share of all queries): " + "; ".join(
        f"{k} {100 * a:.0f}/{100 * b:.0f}/{100 * c:.0f}" for k, (a, b, c) in PAPER.items()), "", "## By category (hallucinated %)", ""]
    cats = sorted({c for e in metrics["systems"].values() for c in e["by_category"]})
    lines += ["| system | generator | " + " | ".join(cats) + " |", "|---" * (len(cats) + 2) + "|"]
    for s, e in metrics["systems"].items():
        lines.append(f"| {s} | {generator_short(e)} | " + " | ".join(_cell(e["by_category"][c]["hallucinated"]) if c in e["by_category"] else "-" for c in cats) + " |")
    lines += _retrieval_md(metrics, cats)
    lines += ["", "## Primary labels and citations", "",
              "| system | generator | correct | incorrect | refusal | grounded | misgrounded | ungrounded | citations | nonexistent | unsupported |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, e in metrics["systems"].items():
        o = e["overall"]
        c = o["citations"]
        lines.append(f"| {s} | {generator_short(e)} | {_pct(o['correct'])} | {_pct(o['incorrect'])} | {_pct(o['refusal'])} | {_pct(o['grounded'])} | "
                     f"{_pct(o['misgrounded'])} | {_pct(o['ungrounded'])} | {c['total']} | {c['nonexistent']} | {c['unsupported']} |")
    if metrics.get("paired"):
        lines += ["", "## Paired differences in hallucination rate (same queries)", "", "| comparison | difference | 95% CI |", "|---|---|---|"]
        for k, d in metrics["paired"].items():
            lines.append(f"| {k} | {_pct(d['diff'])} | [{_pct(d['ci95'][0])}, {_pct(d['ci95'][1])}] |")
    lines += ["", "## Example failures", ""]
    for name, rs in examples(rows).items():
        lines.append(f"### {name}")
        lines.append("")
        lines += [_example_md(r, generator_short(metrics["systems"].get(r["system"], {}))) for r in rs] or ["(none)"]
        lines.append("")
    if extra_md:
        lines += ["", extra_md]
    md = "\n".join(lines) + "\n"
    (out / "report.md").write_text(md, encoding="utf-8")
    (out / "report.html").write_text(_html(title, metrics, rows), encoding="utf-8")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "chart": str(chart)}


def _html(title: str, metrics: dict, rows: list[dict]) -> str:
    e = html.escape
    head = ("<!doctype html><html><head><meta charset='utf-8'><title>" + e(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
            "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}"
            "th{background:#f3f3f3}.ex{border-left:4px solid #c0392b;padding:4px 10px;margin:8px 0;background:#fafafa}"
            "code{background:#eee;padding:1px 3px}</style></head><body>")
    parts = [head, f"<h1>{e(title)}</h1>", f"<p>{metrics.get('n_queries', '?')} queries; % of all queries, bootstrap 95% CI.</p>",
             "<img src='audit_chart.png' alt='stacked bar chart' style='max-width:100%'>",
             "<h2>Overall</h2><table><tr><th>system</th><th>generator</th><th>accurate</th><th>incomplete</th><th>hallucinated</th>"
             "<th>hallucinated among answered</th><th>answered</th></tr>"]
    for s, m in metrics["systems"].items():
        o = m["overall"]
        parts.append(f"<tr><td>{e(s)}</td><td>{e(generator_short(m))}</td><td>{_cell(o['accurate'])}</td><td>{_cell(o['incomplete'])}</td>"
                     f"<td>{_cell(o['hallucinated'])}</td><td>{_cell(o['hallucinated_among_answered'])}</td><td>{o['answered']}/{o['n']}</td></tr>")
    parts.append("</table><h2>By category (hallucinated %)</h2><table><tr><th>system</th><th>generator</th>")
    cats = sorted({c for m in metrics["systems"].values() for c in m["by_category"]})
    parts += [f"<th>{e(c)}</th>" for c in cats] + ["</tr>"]
    for s, m in metrics["systems"].items():
        parts.append(f"<tr><td>{e(s)}</td><td>{e(generator_short(m))}</td>" + "".join(
            f"<td>{_cell(m['by_category'][c]['hallucinated']) if c in m['by_category'] else '-'}</td>" for c in cats) + "</tr>")
    parts.append("</table><h2>Example failures</h2>")
    for name, rs in examples(rows).items():
        parts.append(f"<h3>{e(name)}</h3>")
        for r in rs:
            cites = "; ".join(f"{c['normalized']} ({c['existence']})" for c in r.get("citations", [])) or "none"
            gen = generator_short(metrics["systems"].get(r["system"], {}))
            parts.append(f"<div class='ex'><b>{e(r['system'])}</b> ({e(gen)}) <code>{e(r['query_id'])}</code>: {e(r['question'])}<br>"
                         f"<i>gold</i>: {e(r['gold_answer'][:200])}<br><i>answer</i>: {e(r['answer'][:400])}<br>"
                         f"<i>labels</i>: {e(str(r['correctness']))} / {e(str(r['groundedness']))} &rarr; <b>{e(r['label'])}</b>; "
                         f"citations: {e(cites)}</div>")
        if not rs:
            parts.append("<p>(none)</p>")
    parts.append("<details><summary>metrics.json</summary><pre>" + e(json.dumps(metrics, indent=1)[:20000]) + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)
