"""The combined report of ``rizz reproduce``, built only from each study's ``results.json``.

Writes into the run folder:

- ``report.html``: self-contained (plots embedded as base64 PNG), one section per paper with the
  claims table (the claim, the paper's number, ours, whether it holds), the plots, the command to
  rerun the study alone, its wall time; then the parity tests and the environment.
- ``report.md``: the same content in Markdown (plots linked by relative path).
- ``results.json``: the combined results (same schema as a study's, ``"study": "all"``), listing
  every study's claims with ``study`` added and ids prefixed ``<study>/``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from pathlib import Path

from rizzearch.errors import DataError
from rizzearch.reproduce.common import claims_table, fmt_value, read_results, write_results


def rerun_command(study: str, full: bool = False, device: str = "cpu") -> str:
    """The command that reruns one study alone (shown in the report under its section)."""
    cmd = f"rizz reproduce {study} --out runs/{study}"
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
    name = status["study"]
    folder = run / name
    entry = {"name": name, "paper": (papers or {}).get(name, name), "status": status.get("status", "unknown"),
             "seconds": status.get("seconds"), "error": status.get("error"), "folder": folder,
             "command": rerun_command(name, full, device), "results": None, "plots": []}
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
    claims = []  # every study's claims, with the study field added
    for st in studies:
        if st["results"]:
            for c in st["results"]["claims"]:
                claims.append({**c, "id": f"{st['name']}/{c['id']}", "study": st["name"]})
    metrics = {
        "mode": "full" if full else "quick",
        "device": device,
        "wall_seconds": wall_seconds,
        "studies": {st["name"]: {"status": st["status"], "seconds": st["seconds"], "claims": len(st["results"]["claims"]) if st["results"] else 0,
                                 "claims_holding": sum(c["holds"] for c in st["results"]["claims"]) if st["results"] else 0,
                                 **({"error": st["error"]} if st["error"] else {})} for st in studies},
    }
    if parity is not None:
        metrics["parity"] = {k: v for k, v in parity.items() if k != "tests"}
    data = read_results(write_results(run, "all", claims, metrics))
    env = data["environment"]
    (run / "report.md").write_text(render_markdown(run, studies, parity, env, metrics))
    (run / "report.html").write_text(render_html(run, studies, parity, env, metrics))
    return data


# -- Markdown -----------------------------------------------------------------------------------


def summary_table_md(studies: list[dict]) -> str:
    rows = ["| paper | study | status | claims holding | wall time |", "|---|---|---|---:|---:|"]
    for st in studies:
        cl = st["results"]["claims"] if st["results"] else []
        secs = f"{st['seconds']:.0f} s" if st["seconds"] else "—"
        rows.append(f"| {st['paper']} | `{st['name']}` | {st['status']} | {sum(c['holds'] for c in cl)}/{len(cl)} | {secs} |")
    return "\n".join(rows)


def render_markdown(run: Path, studies: list[dict], parity: dict | None, env: dict, metrics: dict) -> str:
    out = ["# rizzearch: reproduction report", "",
           f"Mode: **{metrics['mode']}** on **{env['device']}** ({env['cpu_count']} CPUs, {env['torch_threads']} torch threads); "
           f"total wall time {metrics['wall_seconds'] / 60:.1f} min.", "", summary_table_md(studies), ""]
    for st in studies:
        out += [f"## {st['paper']}", "", f"Rerun alone: `{st['command']}`", ""]
        if st["status"] != "ok":
            out += ["**Study failed**:", "", "```", str(st["error"])[-3000:], "```", ""]
            continue
        out += [claims_table(st["results"]["claims"]), ""]
        for p in st["plots"]:
            out.append(f"![{p.stem}]({p.relative_to(run)})")
        sm = _scalar_metrics(st["results"]["metrics"])
        if sm:
            out += ["", "<details><summary>metrics</summary>", "", "| metric | value |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in sm]
            out += ["", "</details>"]
        out.append("")
    out += parity_md(parity) + ["## Environment", "", "| key | value |", "|---|---|"]
    out += [f"| {k} | {fmt_value(v)} |" for k, v in env.items()]
    return "\n".join(out) + "\n"


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
         f"total wall time {metrics['wall_seconds'] / 60:.1f} min.</p>",
         "<table><tr><th>paper</th><th>study</th><th>status</th><th>claims holding</th><th>wall time</th></tr>"]
    for st in studies:
        cl = st["results"]["claims"] if st["results"] else []
        secs = f"{st['seconds']:.0f} s" if st["seconds"] else "—"
        cls = "" if st["status"] == "ok" else " class='failed'"
        h.append(f"<tr><td>{_e(st['paper'])}</td><td><a href='#{st['name']}'>{_e(st['name'])}</a></td><td{cls}>{_e(st['status'])}</td>"
                 f"<td>{sum(c['holds'] for c in cl)}/{len(cl)}</td><td>{secs}</td></tr>")
    h.append("</table>")
    for st in studies:
        h.append(f"<h2 id='{st['name']}'>{_e(st['paper'])}</h2><p>Rerun alone: <code>{_e(st['command'])}</code></p>")
        if st["status"] != "ok":
            h.append(f"<p class='failed'><b>Study failed:</b></p><pre>{html.escape(str(st['error'])[-3000:])}</pre>")
            continue
        h.append("<table><tr><th>claim</th><th>paper</th><th>ours</th><th>holds</th></tr>")
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
    if parity is not None:
        h.append("<h2>Parity with the reference implementations</h2>")
        if parity.get("status") == "skipped":
            h.append(f"<p>Skipped: {html.escape(parity['reason'])}</p>")
        else:
            h.append(f"<p>{parity['passed']}/{parity['total']} parity tests passed (<code>pytest -m anchors</code>).</p><table><tr><th>test</th><th>outcome</th></tr>")
            h += [f"<tr><td><code>{html.escape(t['test'])}</code></td><td class='{'yes' if t['outcome'] == 'passed' else 'no'}'>{t['outcome']}</td></tr>" for t in parity.get("tests", [])]
            h.append("</table>")
    h.append("<h2>Environment</h2><table>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{_e(v)}</td></tr>" for k, v in env.items()) + "</table>")
    h.append("</body></html>")
    return "\n".join(h)
