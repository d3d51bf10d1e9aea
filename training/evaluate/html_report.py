"""One self-contained HTML page of evaluation results (figures embedded, so the single file can be mailed)."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from training.evaluate.metrics import BinaryMetrics, Calibration, MulticlassMetrics, SubgroupTable

BANNER = ("Evaluation on synthetic or site data: for research and triage-support validation, "
          "not a clinical performance claim.")
GAP_HIGHLIGHT = 0.05
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_EMPTY: Mapping[str, Any] = MappingProxyType({})  # immutable default for the optional sections

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 2rem 2rem; color: #222; }
.banner { position: sticky; top: 0; background: #fff3cd; border-bottom: 2px solid #e0a800;
          padding: 0.6rem 1rem; margin: 0 -2rem 1rem; font-weight: 600; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f4f7; }
td.gap { background: #f8d7da; font-weight: 600; }
figure { display: inline-block; margin: 0 1rem 1rem 0; }
img { max-width: 100%; }
"""

Cell = str | tuple[str, str]  # text, or (text, CSS class)


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(tag: str, cell: Cell) -> str:
    text, css = (cell, "") if isinstance(cell, str) else cell
    attribute = f' class="{html.escape(css)}"' if css else ""
    return f"<{tag}{attribute}>{html.escape(text)}</{tag}>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """An HTML table with every cell escaped."""
    head = "".join(_cell("th", header) for header in headers)
    body = "".join("<tr>" + "".join(_cell("td", cell) for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _section(heading: str, content: str) -> str:
    return f"<h2>{html.escape(heading)}</h2>\n{content}" if content else ""


def _binary_html(binary: Mapping[str, BinaryMetrics]) -> str:
    if not binary:
        return ""
    summary = _table(("task", "cases", "positives", "AUC", "95% CI", "bootstrap resamples"), (
        (task, str(m.n), str(m.positives), _number(m.auc),
         f"{m.auc_ci[0]:.3f}–{m.auc_ci[1]:.3f}" if m.auc_ci else "—", str(m.bootstrap_resamples))
        for task, m in binary.items()))
    points = _table(("task", "target specificity", "threshold (score ≥)", "sensitivity", "specificity"), (
        (task, f"{p.target_specificity:.0%}", _number(p.threshold, 4), _number(p.sensitivity), _number(p.specificity))
        for task, m in binary.items() for p in m.operating_points))
    return summary + "<h3>Screening operating points</h3>\n" + points


def _multiclass_html(task: str, m: MulticlassMetrics) -> str:
    summary = _table(("cases", "accuracy", "balanced accuracy", "macro one-vs-rest AUC"),
                     ((str(m.n), _number(m.accuracy), _number(m.balanced_accuracy), _number(m.macro_auc_ovr)),))
    confusion = _table(("truth \\ predicted", *m.class_names, "recall", "one-vs-rest AUC"), (
        (name, *(str(count) for count in row), _number(m.recall[name]), _number(m.auc_ovr[name]))
        for name, row in zip(m.class_names, m.confusion, strict=True)))
    return f"<h3>{html.escape(task)}</h3>\n{summary}{confusion}"


def _calibration_html(calibration: Mapping[str, Calibration]) -> str:
    if not calibration:
        return ""
    parts = [_table(("task", "cases", "ECE", "bins"),
                    ((task, str(c.n), _number(c.ece), str(len(c.bins))) for task, c in calibration.items()))]
    for task, c in calibration.items():
        bins = _table(("bin", "cases", "mean predicted", "observed frequency"), (
            (f"{b.lower:.2f}–{b.upper:.2f}", str(b.count), _number(b.mean_confidence), _number(b.observed_frequency))
            for b in c.bins))
        parts.append(f"<details><summary>{html.escape(task)}: bins</summary>\n{bins}</details>\n")
    return "".join(parts)


def _gap_cell(gap: float | None) -> Cell:
    text = "—" if gap is None else f"{gap:+.3f}"
    return (text, "gap") if gap is not None and abs(gap) >= GAP_HIGHLIGHT else text


_SUBGROUP_HEADERS = ("attribute", "value", "cases", "positives", "AUC", "gap to overall", "note")


def _subgroups_html(tables: Mapping[str, SubgroupTable]) -> str:
    """Each task's subgroup table under its name (no heading for an unnamed one)."""
    parts = []
    for task, table in tables.items():
        heading = f"<h3>{html.escape(task)}</h3>\n" if task else ""
        intro = (f"<p>Overall AUC {table.overall_auc:.3f}. Subgroups with fewer than {table.min_cases} cases or "
                 f"one class have no AUC; gaps of {GAP_HIGHLIGHT:.2f} or more are highlighted.</p>\n")
        rows = [(r.attribute, r.value, str(r.n), str(r.positives), _number(r.auc), _gap_cell(r.gap), r.reason or "")
                for r in table.rows]
        parts.append(heading + intro + _table(_SUBGROUP_HEADERS, rows))
    return "".join(parts)


def _image_html(caption: str, path: Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(PNG_MAGIC):
        raise ValueError(f"{path} is not a PNG file")
    source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{source}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>\n")


def write_html_report(path: Path | str, *, title: str, model_description: str, dataset_description: str,
                      binary: Mapping[str, BinaryMetrics] = _EMPTY,
                      multiclass: Mapping[str, MulticlassMetrics] = _EMPTY,
                      calibration: Mapping[str, Calibration] = _EMPTY,
                      subgroups: SubgroupTable | Mapping[str, SubgroupTable] = _EMPTY,
                      images: Mapping[str, Path] = _EMPTY,
                      notes: Sequence[str] = ()) -> Path:
    """Write the report as one HTML file with the PNG figures (caption -> path) embedded as data URIs.

    ``subgroups``: one table, or one per task (task -> table).
    """
    tables = {"": subgroups} if isinstance(subgroups, SubgroupTable) else subgroups
    notes_html = "<ul>\n" + "".join(f"<li>{html.escape(n)}</li>\n" for n in notes) + "</ul>\n" if notes else ""
    body = "".join((
        f'<div class="banner">{html.escape(BANNER)}</div>\n<h1>{html.escape(title)}</h1>\n',
        f"<p><strong>Model:</strong> {html.escape(model_description)}</p>\n",
        f"<p><strong>Data:</strong> {html.escape(dataset_description)}</p>\n",
        _section("Binary tasks", _binary_html(binary)),
        _section("Multiclass tasks", "".join(_multiclass_html(task, m) for task, m in multiclass.items())),
        _section("Calibration", _calibration_html(calibration)),
        _section("Subgroups", _subgroups_html(tables)),
        _section("Figures", "".join(_image_html(caption, p) for caption, p in images.items())),
        _section("Notes", notes_html),
    ))
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
    Path(path).write_text(page, encoding="utf-8")
    return Path(path)
