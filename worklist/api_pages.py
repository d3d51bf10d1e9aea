"""Server-rendered HTML of the triage, study and drift pages: plain HTML, escaped, small CSS, no scripts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any
from urllib.parse import quote

from dicom_node.results.findings import DISCLAIMER
from dicom_node.results.io import overlay_name
from worklist.drift import BINS, DriftReport
from worklist.triage import Section, TriagePage, TriageRow, as_utc

TITLES = {Section.RANKED: "Ranked by suspicion",
          Section.INCOMPLETE: "Listed apart: analysed on fewer than four views",
          Section.FAILED: "Listed apart: analysis failed",
          Section.IN_PROGRESS: "Waiting for or in analysis"}
DISPLAY_ORDER = ("RCC", "LCC", "RMLO", "LMLO")  # the reading layout: right breast on the viewer's left
CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%}th,td{padding:.3em .5em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:.6em .8em;margin:.6em 0;border-radius:4px}.warn{background:#fff3cd;border:1px solid #e0b400}
.alert{background:#f8d7da;border:1px solid #c00;font-weight:600}
.error{color:#a00}.meta,.disclaimer{color:#555;font-size:.9em}
.views{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:1em}
figure{margin:0;border:1px solid #ddd;padding:.5em}figure img{max-height:300px;max-width:48%;margin-right:1%}
"""


def _time(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    return as_utc(datetime.fromisoformat(value) if isinstance(value, str) else value).strftime("%Y-%m-%d %H:%M UTC")


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cells(values: Iterable[object]) -> str:
    return "".join(f"<td>{value}</td>" for value in values)


def _study_link(row: TriageRow) -> str:
    label = escape(row.accession or row.study_instance_uid)
    return f'<a href="/studies/{quote(row.study_instance_uid)}">{label}</a>'


def _patient(row: TriageRow) -> list[str]:
    return [escape(row.patient.get("name") or "-"), escape(row.patient.get("id") or "-")] if row.patient else []


def _exports(counts: dict[str, int]) -> str:
    return escape(", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "-")


def _breast(row: TriageRow, side: str, key: str) -> str:
    value = row.breasts.get(side, {}).get(key)
    return _score(value) if isinstance(value, float) else escape(str(value or "-"))


COLUMNS: dict[Section, tuple[str, ...]] = {
    Section.RANKED: ("#", "suspicion", "R malignancy", "L malignancy", "density R/L", "study", "received", "done",
                     "model", "exports"),
    Section.FAILED: ("#", "study", "received", "error"),
    Section.IN_PROGRESS: ("#", "study", "state", "job", "views", "received"),
}
COLUMNS[Section.INCOMPLETE] = (*COLUMNS[Section.RANKED], "missing views")


def _row_cells(section: Section, row: TriageRow) -> list[object]:
    if section in (Section.RANKED, Section.INCOMPLETE):
        cells: list[object] = [
            row.rank, _score(row.suspicion), _breast(row, "R", "malignancy"), _breast(row, "L", "malignancy"),
            f"{_breast(row, 'R', 'density')}/{_breast(row, 'L', 'density')}", _study_link(row),
            _time(row.first_received_at), _time(row.done_at), escape(row.model_version or "-"), _exports(row.exports)]
        return cells + ([escape(", ".join(row.missing_views))] if section == Section.INCOMPLETE else [])
    if section == Section.FAILED:
        return [row.rank, _study_link(row), _time(row.first_received_at),
                f'<span class="error">{escape((row.error or "-")[:300])}</span>']
    return [row.rank, _study_link(row), escape(row.state), escape(row.job_state or "-"),
            escape(", ".join(row.views) or "-"), _time(row.last_received_at)]


def _page(title: str, body: str, refresh: int, notes: Sequence[str], drift_alert: str | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{int(refresh)}">' if refresh else ""
    banners = "".join(f'<div class="banner warn" role="alert">{escape(note)}</div>' for note in notes)
    if drift_alert:
        banners += (f'<div class="banner alert" id="drift-alert" role="alert">{escape(drift_alert)} '
                    '<a href="/drift">Score drift</a></div>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}<title>{escape(title)}</title>'
            f'<style>{CSS}</style></head><body>{banners}{body}'
            f'<p class="disclaimer">{escape(DISCLAIMER)}</p></body></html>')


def list_page(page: TriagePage, notes: Sequence[str], refresh: int, order: Sequence[str], show_patient: bool,
              limit: int, drift_alert: str | None = None) -> str:
    """The triage list: one table per section, each with a link to its next page when more follow; the drift
    banner."""
    parts = [f'<h1>Triage worklist</h1><p class="meta">Generated {_time(datetime.now(UTC))}'
             f'{f" · refreshes every {refresh} s" if refresh else ""} · order: {escape(", ".join(order))}'
             ' · <a href="/drift">score drift</a></p>']
    for section in Section:
        rows = page.sections[section]
        head = list(COLUMNS[section])
        if show_patient:
            head[2:2] = ["patient name", "patient ID"]
        body = "".join(
            f'<tr class="study-row" data-uid="{escape(row.study_instance_uid)}">'
            + _cells([*(_row_cells(section, row)[:2]), *_patient(row), *_row_cells(section, row)[2:]]) + "</tr>"
            for row in rows) or f'<tr><td colspan="{len(head)}">none</td></tr>'
        start = page.offset_of(section)
        shown = f"{start + 1}-{start + len(rows)}" if start and rows else str(len(rows))
        more = (f'<p><a href="/?section={section.value}&amp;offset={start + limit}&amp;limit={limit}#{section.value}">'
                f"next {limit} →</a></p>" if page.more[section] else "")
        parts.append(f'<section id="{section.value}"><h2>{escape(TITLES[section])} ({shown}'
                     f'{"+" if more else ""})</h2><table><thead><tr>{"".join(f"<th>{escape(h)}</th>" for h in head)}'
                     f"</tr></thead><tbody>{body}</tbody></table>{more}</section>")
    return _page("Triage worklist", "".join(parts), refresh, notes, drift_alert)


def drift_page(report: DriftReport, notes: Sequence[str], refresh: int) -> str:
    """Per model version (newest first) and week (newest first): results, mean score, PSI; and the plot."""
    rows = "".join(
        ('<tr class="error">' if report.over(week) else "<tr>") + _cells([
            escape(version.version), escape(week.week) + (" (reference)" if week == version.reference else ""),
            week.n, _score(week.mean), _score(week.psi)]) + "</tr>"
        for version in reversed(report.versions) for week in reversed(version.weeks)
    ) or '<tr><td colspan="5">no results yet</td></tr>'
    body = (f'<p><a href="/">← worklist</a></p><h1>Score drift</h1><p class="meta">Per model version, the '
            f"distribution of study suspicion scores ({BINS} bins on [0, 1]) of each ISO week (UTC) against the "
            f"version's reference week, its first full week with at least {report.min_studies} results, by the "
            f"Population Stability Index (PSI). Above {report.threshold:g}: a significant shift. Weeks with fewer "
            f"than {report.min_studies} results are not compared. Model in service: "
            f'{escape(report.in_service or "-")}.</p><img src="/drift.png" alt="weekly score distributions per '
            'model version"><table><thead><tr><th>model version</th><th>week</th><th>results</th>'
            f"<th>mean score</th><th>PSI</th></tr></thead><tbody>{rows}</tbody></table>")
    return _page("Score drift", body, refresh, notes, report.alert())


def study_page(row: TriageRow, detail: dict[str, Any], exports: list[dict[str, Any]],
               overlays: Mapping[str, Sequence[str]], notes: Sequence[str], refresh: int) -> str:
    """One study: scores per breast, the four views (thumbnail and malignancy overlay, with links to the FActOR
    overlays), exports and jobs. ``overlays``: the views with a malignancy overlay, each with its FActOR
    attributes."""
    uid = quote(row.study_instance_uid)
    patient = f"<p>Patient: {' · ID '.join(_patient(row))}</p>" if row.patient else ""
    head = (f'<p><a href="/">← worklist</a></p><h1>Study {escape(row.accession or "")}</h1>{patient}'
            f'<p class="meta">Study Instance UID {escape(row.study_instance_uid)} · state {escape(row.state)} · '
            f'{escape(TITLES[Section(row.section)])}{f" · rank {row.rank}" if row.rank else ""} · received '
            f'{_time(row.first_received_at)} · done {_time(row.done_at)} · model {escape(row.model_version or "-")}</p>'
            f'<p>Study suspicion: {_score(row.suspicion)}</p>')
    if row.error:
        head += f'<p class="error">Last analysis error: {escape(row.error[:1000])}</p>'
    breasts = "".join(f"<tr><th>{escape(key)}</th><td>{_breast(row, 'R', key)}</td><td>{_breast(row, 'L', key)}</td>"
                      "</tr>" for key in ("malignancy", "mass", "calcification", "density", "birads"))
    figures = []
    for view in DISPLAY_ORDER:
        scores = detail["views"].get(view)
        images = (f'<img src="/studies/{uid}/thumbnail_{view}.png" alt="{view} image">'
                  if view in row.views else "<p>not received</p>")
        if view in overlays:
            images += f'<img src="/studies/{uid}/{overlay_name(view)}" alt="{view} heatmap overlay">'
        caption = escape(view) + (" · " + ", ".join(f"{escape(k)} {_score(scores.get(k))}" for k in
                                                     ("malignancy", "mass", "calcification")) if scores else "")
        if view in detail["unreadable_views"]:
            caption += ('<br><span class="error">left out of the analysis, its image could not be read: '
                        f'{escape(detail["unreadable_views"][view])}</span>')
        if overlays.get(view):
            caption += "<br>Mammo-FActOR maps: " + " · ".join(
                f'<a href="/studies/{uid}/{quote(overlay_name(view, attribute))}">{escape(attribute)}</a>'
                for attribute in overlays[view])
        figures.append(f'<figure id="view-{view}">{images}<figcaption>{caption}</figcaption></figure>')
    export_rows = "".join(
        f"<tr><td>{escape(d['destination'])}</td><td>{escape(d['state'])}</td><td>{escape(o['object'])}</td>"
        f"<td>{escape(o['state'])}</td><td class=num>{o['attempts']}</td><td>{_time(o['delivered_at'])}</td>"
        f"<td class=error>{escape((o['error'] or '')[:300])}</td></tr>"
        for d in exports for o in d["objects"]) or '<tr><td colspan="7">no exports</td></tr>'
    jobs = "".join("<tr>" + _cells([job["id"], escape(job["state"]), job["attempts"],
                                    escape(job["model_version"] or "-"), _time(job["created_at"]),
                                    _time(job["finished_at"]), escape((job["error"] or "")[:300])]) + "</tr>"
                   for job in detail["jobs"])
    timings = escape(", ".join(f"{stage} {seconds:.2f} s" for stage, seconds in detail["timings"].items()) or "-")
    if detail["gpu_memory_peak_bytes"] is not None:
        timings += f"; GPU memory peak {detail['gpu_memory_peak_bytes'] / 2**30:.2f} GiB"
    body = (f"{head}<h2>Scores per breast</h2><table><thead><tr><th></th><th>right</th><th>left</th></tr></thead>"
            f'<tbody>{breasts}</tbody></table><h2>Views</h2><div class="views">{"".join(figures)}</div>'
            "<h2>Exports</h2><table><thead><tr><th>destination</th><th>status</th><th>object</th><th>state</th>"
            f"<th>attempts</th><th>delivered</th><th>error</th></tr></thead><tbody>{export_rows}</tbody></table>"
            "<h2>Analysis jobs</h2><table><thead><tr><th>job</th><th>state</th><th>attempts</th><th>model</th>"
            f"<th>created</th><th>finished</th><th>error</th></tr></thead><tbody>{jobs}</tbody></table>"
            f'<p class="meta">Stage timings of the shown result: {timings}</p>')
    return _page(f"Study {row.accession or row.study_instance_uid}", body, refresh, notes)

