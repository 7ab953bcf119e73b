"""report.html: one self-contained page (inline CSS, plots as inline SVG drawn by matplotlib's
Agg/SVG backends, no script, no font or file from any network); thumbnails are small JPEGs beside it
under `thumbs/`, linked relatively, so the page works on local disk and when the audit folder is
copied from S3. Sections: gates, one per check (history plot, details, worst-ranked images),
strategy clusters (mean heatmap + contact sheet per cluster)."""

from __future__ import annotations

import html
import io
import re
from typing import Dict, List

import numpy as np

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;color:#222}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 4px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{background:#dff3e0;color:#185c1f}.warn{background:#fff2cc;color:#7a5b00}.fail{background:#fbdada;color:#8a1111}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-weight:600;font-size:12px}
.meta{color:#555}.note{color:#555;font-style:italic}
.sheet{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}
.sheet figure{margin:0;width:132px;font-size:11px;color:#444;word-break:break-all}
.sheet img{display:block;max-width:128px;max-height:128px;border:1px solid #ccc}
.nothumb{width:128px;height:40px;border:1px dashed #bbb;display:flex;align-items:center;justify-content:center;color:#999}
.cluster{display:flex;gap:16px;align-items:flex-start;border:1px solid #e4e4e4;padding:8px;margin:8px 0}
.cluster.border{border-color:#d33;background:#fff6f6}
.plot svg{max-width:100%;height:auto}
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _svg(fig) -> str:
    """A matplotlib Figure as inline <svg> (no XML prolog, no DOCTYPE)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.rcParams["svg.fonttype"] = "path"  # glyphs as paths: no font needed by the viewer
    matplotlib.rcParams["svg.hashsalt"] = "bulk-explain"  # stable ids across runs
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no GUI backend

    return Figure(figsize=(w, h), dpi=72)


def history_plot(check: str, history: List[dict]) -> str:
    points = [h for h in history if h["check"] == check]
    fig = _figure(5.0, 1.9)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(points))
    values = np.array([np.nan if p["value"] is None else p["value"] for p in points], float)
    colours = {"pass": "#2e7d32", "warn": "#c79100", "fail": "#c62828"}
    ax.plot(xs, values, "-", color="#5472d3", lw=1.5)
    for x, v, p in zip(xs, values, points):
        if np.isfinite(v):
            ax.plot([x], [v], "o", color=colours.get(p["status"], "#555"), ms=5)
    thresholds = [p["threshold"] for p in points]
    if thresholds:
        ax.plot(xs, thresholds, "--", color="#999", lw=1, label="threshold")
    ax.set_ylim(0, max(1e-3, float(np.nanmax(np.r_[values, thresholds, 0.0])) * 1.15 if len(points) else 1))
    ax.set_xticks(xs)
    # "20261126T184151.489Z" -> "11-26 18:41:51"
    ax.set_xticklabels([f'{p["audit_id"][4:6]}-{p["audit_id"][6:8]} {p["audit_id"][9:11]}:{p["audit_id"][11:13]}:'
                        f'{p["audit_id"][13:15]}' for p in points], rotation=20, fontsize=7, ha="right")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"{check} over {len(points)} audit(s)", fontsize=8)
    ax.grid(alpha=0.3)
    return _svg(fig)


def heatmap_svg(mean_map: np.ndarray) -> str:
    fig = _figure(1.5, 1.5)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(mean_map, cmap="jet", vmin=0, vmax=max(float(mean_map.max()), 1e-6), interpolation="bilinear")
    ax.set_axis_off()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _caption(data, row: int, score, score_name: str) -> str:
    uri = data.uris[row].as_py() or ""
    name = re.split(r"[/\\]", uri)[-1]
    label = data.label_names[data.label_codes[row]] if data.label_codes[row] >= 0 else "-"
    pred = data.class_names[data.pred[row]] if data.pred[row] >= 0 else "-"
    text = f"{_e(name)}<br>label {_e(label)} &rarr; {_e(pred)}"
    if score is not None and np.isfinite(score):
        text += f"<br>{_e(score_name)} {float(score):.3f}"
    return text


def contact_sheet(data, rows, scores, score_name: str, thumbs: Dict[int, str], limit: int) -> str:
    items = []
    for i, row in enumerate(rows[:limit]):
        row = int(row)
        score = scores[i] if scores is not None and i < len(scores) else None
        cap = _caption(data, row, score, score_name)
        if row in thumbs:
            img = f'<a href="{_e(thumbs[row])}"><img src="{_e(thumbs[row])}" alt="rank {i + 1}"></a>'
        else:
            reason = data.errors[row].as_py() if not data.ok[row] else "no overlay"
            img = f'<div class="nothumb" title="{_e(reason)}">{_e((reason or "")[:28])}</div>'
        items.append(f"<figure>{img}<figcaption>#{i + 1} {cap}</figcaption></figure>")
    return f'<div class="sheet">{"".join(items)}</div>' if items else ""


def _table(header: List[str], rows: List[List], numeric=()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if j in numeric else ""}">{_e(c)}</td>'
                                    for j, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _check_tables(name: str, finding) -> str:
    d = finding.data
    if name == "drift" and d.get("columns"):
        return _table(["column", "kind", "test", "statistic", "drifted"],
                      [[c, r["kind"], r["test"], _fmt(r["statistic"]), "yes" if r["drifted"] else "no"]
                       for c, r in d["columns"].items()], numeric=(3,))
    if name == "class_balance" and d.get("confusion"):
        conf = d["confusion"]
        rows = [[lab] + counts for lab, counts in zip(conf["labels"], conf["counts"])]
        return ("<p>Confusion: folder label (rows) vs predicted class (columns).</p>"
                + _table(["label \\ predicted"] + conf["predicted"], rows, numeric=tuple(range(1, 99))))
    if name == "errors" and d.get("by_reason"):
        return _table(["reason", "images"], [[k, v] for k, v in d["by_reason"].items()], numeric=(1,))
    if name == "low_confidence" and d.get("by_predicted_class"):
        return _table(["predicted class", "unsure images"], [[k, v] for k, v in d["by_predicted_class"].items()],
                      numeric=(1,))
    if name == "empty_maps" and d.get("by_predicted_class"):
        return _table(["predicted class", "empty maps"], [[k, v] for k, v in d["by_predicted_class"].items()],
                      numeric=(1,))
    return ""


def clusters_section(finding, data, thumbs: Dict[int, str]) -> str:
    info = finding.extra.get("info") if finding is not None else None
    if not info:
        return f"<p>{_e(finding.details if finding else 'no clusters')}</p>"
    parts = [f"<p>{_e(finding.details)}</p>",
             "<p class=\"meta\">Per predicted class, spectral clustering of the normalized small CAMs (kNN graph, "
             "k by eigengap); empty maps are excluded. A red frame marks a cluster whose mean map peaks in the "
             "border: the model recognizes those images by something at the edge.</p>"]
    by_class: Dict[str, list] = {}
    for i in info:
        by_class.setdefault(i["class"], []).append(i)
    for cls, items in by_class.items():
        ev = ", ".join(f"{e:.3f}" for e in items[0]["eigenvalues"])
        parts.append(f"<h3>class {_e(cls)}: {len(items)} cluster(s)</h3>"
                     f"<p class=\"meta\">smallest Laplacian eigenvalues: {_e(ev)}</p>")
        for i in sorted(items, key=lambda i: -i["size"]):
            sheet = contact_sheet(data, i["_examples"], None, "", thumbs, len(i["_examples"]))
            flag = " border" if i["border"] else ""
            parts.append(
                f'<div class="cluster{flag}"><div><div class="plot">{heatmap_svg(i["_mean_map"])}</div>'
                f'<div class="meta">cluster {i["cluster"]}: {i["size"]} images<br>mean peak at '
                f'({i["peak"][0]:.2f}, {i["peak"][1]:.2f}){"<br><b>border strategy</b>" if i["border"] else ""}'
                f'</div></div>{sheet}</div>')
    return "".join(parts)


def render_report(meta: dict, checks, results, rows_out: List[dict], history: List[dict],
                  thumbs: Dict[int, str], data) -> str:
    """The whole page as a string."""
    status_of = {r["check"]: r for r in rows_out}
    gates = meta["gates"]
    failed = meta["failed_gates"]
    if gates:
        verdict = "fail" if failed else "pass"
        gate_rows = "".join(
            f'<tr><td>{_e(g)}</td><td class="{"fail" if any(f.startswith(f"gate {g} ") for f in failed) else "pass"}">'
            f'{"failed" if any(f.startswith(f"gate {g} ") for f in failed) else "passed"}</td></tr>' for g in gates)
        gates_html = (f'<p><span class="badge {verdict}">{"GATES FAILED" if failed else "ALL GATES PASSED"}</span></p>'
                      f"<table><tr><th>gate</th><th>result</th></tr>{gate_rows}</table>"
                      + "".join(f"<p class=\"fail\">{_e(f)}</p>" for f in failed))
    else:
        gates_html = "<p>No gates were given (<code>--gate CHECK&lt;=X</code>); statuses below use the default thresholds.</p>"
    summary_rows = "".join(
        f'<tr><td><a href="#check-{_e(r["check"])}">{_e(r["check"])}</a></td><td class="num">{_fmt(r["value"])}</td>'
        f'<td class="num">{_fmt(r["threshold"])}</td><td class="{r["status"]}">{r["status"]}</td>'
        f'<td>{_e(r["details"])}</td></tr>' for r in rows_out)
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Audit {_e(meta['audit_id'])}</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>Audit {_e(meta['audit_id'])}</h1>",
           f"<p class=\"meta\">{_e(meta['output'])} &middot; {meta['rows']} images ({meta['ok']} ok, {meta['errors']} "
           f"error rows) &middot; CAM method {_e(meta.get('cam_method') or '?')} &middot; baseline "
           f"{_e(meta['baseline'] or 'none')}</p>",
           f'<section id="gates"><h2>Gates</h2>{gates_html}'
           f"<table><tr><th>check</th><th>value</th><th>threshold</th><th>status</th><th>details</th></tr>"
           f"{summary_rows}</table></section>"]
    for check in checks:
        f = results[check.name]
        r = status_of[check.name]
        body = [f'<section id="check-{check.name}" class="check"><h2>{_e(check.title)} <code>{check.name}</code> '
                f'<span class="badge {r["status"]}">{r["status"]}</span></h2>',
                f"<p class=\"meta\">{_e(check.description)}</p><p>{_e(f.details)}</p>"]
        if f.note:
            body.append(f'<p class="note">{_e(f.note)}</p>')
        body.append(f'<div class="plot">{history_plot(check.name, history)}</div>')
        body.append(_check_tables(check.name, f))
        if len(f.rows) and check.name != "strategy_clusters":
            shown = min(len(f.rows), meta.get("thumbnails_per_check", 12))
            body.append(f"<h3>{'Worst-ranked' if shown < len(f.rows) else 'Flagged'} images ({shown} of {len(f.rows)})</h3>")
            body.append(contact_sheet(data, f.rows, f.scores, f.score_name, thumbs, shown))
        if check.name == "strategy_clusters":
            body.append(f'<div id="clusters">{clusters_section(f, data, thumbs)}</div>')
        body.append("</section>")
        out.append("".join(body))
    out.append("</body></html>")
    return "\n".join(out)
