"""The combined report of ``rizz reproduce``, built only from each study's ``results.json``.

Writes into the run folder:

- ``report.html``: self-contained (plots embedded as base64 PNG), one section per paper with the
  claims table (the claim, the paper's number, ours, whether it holds), the plots, the command to
  rerun the study alone, its wall time; then the parity tests and the environment.
- ``report.md``: the same content in Markdown (plots linked by relative path).
- ``results.json``: the combined results (same schema as a study's, ``"study": "all"``), listing
  every study's claims with ``study`` and ``tier`` added and ids prefixed ``<study>/`` (quick tier)
  or ``<study>/real/`` (real tier).

Tiers: a run folder holds quick-tier studies in ``<study>/`` and real-tier ones in
``real/<study>/``; the report shows both tiers of a paper side by side (a summary table with one
column group per tier, then each paper's claims per tier, with the model each was measured on).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path

from rizzearch.errors import DataError
from rizzearch.reproduce.common import claims_table, fmt_value, read_results, write_results


TIER_MODELS = {"quick": "models trained from scratch in the run", "real": "SmolLM2-135M-Instruct (pretrained)"}


def rerun_command(study: str, full: bool = False, device: str = "cpu", tier: str = "quick") -> str:
    """The command that reruns one study alone (shown in the report under its section)."""
    cmd = f"rizz reproduce {study} --out runs/{study}" if tier == "quick" else f"rizz reproduce {study} --tier real --out runs/{study}-real"
    if full:
        cmd += " --full true"
    if device != "cpu":
        cmd += f" --device {device}"
    return cmd


def _scalar_metrics(metrics: dict, prefix: str = "", limit: int = 24) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for k, v in metrics.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += _scalar_metrics(v, key + ".", limit)
        elif isinstance(v, (int, float, str, bool)) and not (isinstance(v, str) and len(v) > 80):
            rows.append((key, fmt_value(v)))
        if len(rows) >= limit:
            break
    return rows[:limit]


def load_study(run: Path, status: dict, full: bool = False, device: str = "cpu", papers: Mapping[str, str] | None = None) -> dict:
    """Gather what the report needs about one study (results, plots, status, the command to rerun it).

    ``papers`` maps a study name to the paper's title (the orchestrator's table); the name stands in
    for a study it does not list.
    """
    name, tier = status["study"], status.get("tier", "quick")
    folder = run / name if tier == "quick" else run / "real" / name
    entry = {"name": name, "tier": tier, "paper": (papers or {}).get(name, name), "status": status.get("status", "unknown"),
             "seconds": status.get("seconds"), "error": status.get("error"), "folder": folder,
             "command": rerun_command(name, full, device, tier), "results": None, "plots": []}
    if entry["status"] == "ok":
        try:
            entry["results"] = read_results(folder / "results.json")
        except DataError as e:
            entry["status"], entry["error"] = "failed", str(e)
    entry["plots"] = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return entry


def build_report(run: Path, statuses: list[dict], parity: dict | None, wall_seconds: float, full: bool = False, device: str = "cpu",
                 papers: Mapping[str, str] | None = None) -> dict:
    """Write report.md, report.html and the combined results.json from each study's results.json; returns the combined results."""
    run = Path(run)
    studies = [load_study(run, s, full, device, papers) for s in statuses]
    claims = []  # every study's claims, with the study and tier fields added
    for st in studies:
        if st["results"]:
            for c in st["results"]["claims"]:
                claims.append({**c, "id": f"{_key(st)}/{c['id']}", "study": st["name"], "tier": st["tier"]})
    metrics = {
        "mode": "full" if full else "quick",
        "device": device,
        "wall_seconds": wall_seconds,
        "studies": {_key(st): {"tier": st["tier"], "status": st["status"], "seconds": st["seconds"],
                               "claims": len(st["results"]["claims"]) if st["results"] else 0,
                               "claims_holding": sum(c["holds"] for c in st["results"]["claims"]) if st["results"] else 0,
                               **({"error": st["error"]} if st["error"] else {})} for st in studies},
        "tier_seconds": {t: sum(st["seconds"] or 0 for st in studies if st["tier"] == t) for t in sorted({st["tier"] for st in studies})},
    }
    if parity is not None:
        metrics["parity"] = {k: v for k, v in parity.items() if k != "tests"}
    data = read_results(write_results(run, "all", claims, metrics))
    env = data["environment"]
    (run / "report.md").write_text(render_markdown(run, studies, parity, env, metrics))
    (run / "report.html").write_text(render_html(run, studies, parity, env, metrics))
    return data


def _key(st: dict) -> str:
    """``orpo`` (quick tier) or ``orpo/real`` (real tier): a study's key in the combined results."""
    return st["name"] if st["tier"] == "quick" else f"{st['name']}/real"


def _by_paper(studies: list[dict]) -> list[tuple[str, dict[str, dict]]]:
    """``[(study name, {tier: entry})]`` in first-seen order: each paper's tiers together."""
    out: dict[str, dict[str, dict]] = {}
    for st in studies:
        out.setdefault(st["name"], {})[st["tier"]] = st
    return list(out.items())


def _cell(st: dict | None) -> tuple[str, str, str]:
    if st is None:
        return "—", "—", "—"
    cl = st["results"]["claims"] if st["results"] else []
    return st["status"], f"{sum(c['holds'] for c in cl)}/{len(cl)}", f"{st['seconds']:.0f} s" if st["seconds"] else "—"


def _models(st: dict) -> str:
    """The model(s) a study's claims were measured on (the claims' ``model`` field, else the tier's)."""
    named = sorted({c["model"] for c in (st["results"] or {}).get("claims", []) if c.get("model")})
    return ", ".join(named) or TIER_MODELS.get(st["tier"], st["tier"])


# -- Markdown -----------------------------------------------------------------------------------


def summary_table_md(studies: list[dict]) -> str:
    """One row per paper, the quick and the real tier side by side (status, claims holding, wall time)."""
    tiers = [t for t in ("quick", "real") if any(st["tier"] == t for st in studies)]
    head = "| paper | study | " + " | ".join(f"{t} tier: status | claims holding | wall time" for t in tiers) + " |"
    rows = [head, "|---|---|" + "---|---:|---:|" * len(tiers)]
    for name, by_tier in _by_paper(studies):
        paper = next(iter(by_tier.values()))["paper"]
        rows.append(f"| {paper} | `{name}` | " + " | ".join(" | ".join(_cell(by_tier.get(t))) for t in tiers) + " |")
    return "\n".join(rows)


def _tier_totals(metrics: dict) -> str:
    return "; ".join(f"{t} tier: studies took {secs / 60:.1f} min" for t, secs in metrics.get("tier_seconds", {}).items())


def render_markdown(run: Path, studies: list[dict], parity: dict | None, env: dict, metrics: dict) -> str:
    out = ["# rizzearch: reproduction report", "",
           f"Mode: **{metrics['mode']}** on **{env['device']}** ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads); "
           f"this invocation took {metrics['wall_seconds'] / 60:.1f} min; {_tier_totals(metrics)}.", "", summary_table_md(studies), ""]
    for name, by_tier in _by_paper(studies):
        out += [f"## {next(iter(by_tier.values()))['paper']}", ""]
        for tier, st in by_tier.items():
            out += [f"### {tier.capitalize()} tier: {_models(st)}", "", f"Rerun alone: `{st['command']}`", ""]
            out += _study_md(run, st)
    out += parity_md(parity) + ["## Environment", "", "| key | value |", "|---|---|"]
    out += [f"| {k} | {fmt_value(v)} |" for k, v in env.items()]
    return "\n".join(out) + "\n"


def _study_md(run: Path, st: dict) -> list[str]:
    if st["status"] != "ok":
        return ["**Study failed**:", "", "```", str(st["error"])[-3000:], "```", ""]
    out = [claims_table(st["results"]["claims"]), ""]
    for p in st["plots"]:
        out.append(f"![{p.stem}]({p.relative_to(run)})")
    sm = _scalar_metrics(st["results"]["metrics"])
    if sm:
        out += ["", "<details><summary>metrics</summary>", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in sm]
        out += ["", "</details>"]
    return out + [""]


def parity_md(parity: dict | None) -> list[str]:
    if parity is None:
        return []
    out = ["## Parity with the reference implementations", ""]
    if parity.get("status") == "skipped":
        return out + [f"Skipped: {parity['reason']}", ""]
    out += [f"{parity['passed']}/{parity['total']} parity tests passed (pytest -m anchors).", "", "| test | outcome |", "|---|---|"]
    out += [f"| `{t['test']}` | {t['outcome']} |" for t in parity.get("tests", [])]
    return out + [""]


# -- HTML ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.yes{color:#17703a;font-weight:600}.no{color:#b3261e;font-weight:600}
code,pre{background:#f6f6f6;padding:.1em .3em;border-radius:3px}pre{padding:.7em;overflow:auto}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}.failed{color:#b3261e}
"""


def _e(x) -> str:
    return html.escape(fmt_value(x))


def render_html(run: Path, studies: list[dict], parity: dict | None, env: dict, metrics: dict) -> str:
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>rizzearch reproduction report</title><style>{CSS}</style></head><body>",
         "<h1>rizzearch: reproduction report</h1>",
         f"<p>Mode: <b>{_e(metrics['mode'])}</b> on <b>{_e(env['device'])}</b> ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads); "
         f"this invocation took {metrics['wall_seconds'] / 60:.1f} min; {html.escape(_tier_totals(metrics))}.</p>", _summary_html(studies)]
    for name, by_tier in _by_paper(studies):
        h.append(f"<h2 id='{name}'>{_e(next(iter(by_tier.values()))['paper'])}</h2>")
        for tier, st in by_tier.items():
            h.append(f"<h3 id='{_key(st)}'>{_e(tier.capitalize())} tier: {_e(_models(st))}</h3><p>Rerun alone: <code>{_e(st['command'])}</code></p>")
            h += _study_html(st)
    h += _parity_html(parity)
    h.append("<h2>Environment</h2><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{_e(v)}</td></tr>" for k, v in env.items()) + "</table>")
    h.append("</body></html>")
    return "\n".join(h)


def _summary_html(studies: list[dict]) -> str:
    tiers = [t for t in ("quick", "real") if any(st["tier"] == t for st in studies)]
    h = ["<table><tr><th rowspan='2'>paper</th><th rowspan='2'>study</th>" + "".join(f"<th colspan='3'>{t} tier</th>" for t in tiers) + "</tr><tr>"
         + "<th>status</th><th>claims holding</th><th>wall time</th>" * len(tiers) + "</tr>"]
    for name, by_tier in _by_paper(studies):
        h.append(f"<tr><td>{_e(next(iter(by_tier.values()))['paper'])}</td><td><a href='#{name}'>{_e(name)}</a></td>")
        for t in tiers:
            status, held, secs = _cell(by_tier.get(t))
            cls = "" if status in ("ok", "—") else " class='failed'"
            h.append(f"<td{cls}>{_e(status)}</td><td>{held}</td><td>{secs}</td>")
        h.append("</tr>")
    return "".join(h) + "</table>"


def _study_html(st: dict) -> list[str]:
    if st["status"] != "ok":
        return [f"<p class='failed'><b>Study failed:</b></p><pre>{html.escape(str(st['error'])[-3000:])}</pre>"]
    h = ["<table><tr><th>claim</th><th>paper</th><th>ours</th><th>holds</th></tr>"]
    for c in st["results"]["claims"]:
        yn = "<span class='yes'>yes</span>" if c["holds"] else "<span class='no'>no</span>"
        h.append(f"<tr><td>{_e(c['statement'])}</td><td>{_e(c['paper_value'])}</td><td>{_e(c['our_value'])}</td><td>{yn}</td></tr>")
    h.append("</table>")
    for p in st["plots"]:
        b64 = base64.b64encode(p.read_bytes()).decode()
        h.append(f"<figure><img alt='{html.escape(p.stem)}' src='data:image/png;base64,{b64}'><figcaption>{html.escape(p.name)}</figcaption></figure>")
    sm = _scalar_metrics(st["results"]["metrics"])
    if sm:
        h.append("<details><summary>metrics</summary><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in sm) + "</table></details>")
    return h


def _parity_html(parity: dict | None) -> list[str]:
    if parity is None:
        return []
    h = ["<h2>Parity with the reference implementations</h2>"]
    if parity.get("status") == "skipped":
        return h + [f"<p>Skipped: {html.escape(parity['reason'])}</p>"]
    h.append(f"<p>{parity['passed']}/{parity['total']} parity tests passed (<code>pytest -m anchors</code>).</p><table><tr><th>test</th><th>outcome</th></tr>")
    h += [f"<tr><td><code>{html.escape(t['test'])}</code></td><td class='{'yes' if t['outcome'] == 'passed' else 'no'}'>{t['outcome']}</td></tr>" for t in parity.get("tests", [])]
    return h + ["</table>"]
