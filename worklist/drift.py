"""Model drift watch: weekly distributions of study suspicion scores per model version, and the Population
Stability Index (PSI) of each week against the version's reference week.

- Scores: ``Result.suspicion`` of every result, under its job's ``model_version`` (a re-analysed study counts
  once per analysis), in ``BINS`` equal-width bins on [0, 1] (a score of 1 is in the last bin).
- Weeks: ISO weeks (Monday to Sunday, UTC) of ``Result.created_at``. One SQL query groups the results by
  version, UTC day and bin (the bin is a CASE over the edges; the day truncation is the one thing that differs
  per dialect); the days are folded into weeks here, so at most 7 x ``BINS`` rows per version and week return.
- Reference: a version's first *full* week with at least ``drift_min_studies`` results: a week that has ended
  and that began after the version's first result (the week it went into service is partial, and may be a
  test run). Until a version has one, none of its weeks has a PSI.
- PSI of a week with at least ``drift_min_studies`` results: the sum over bins of (a - e) * ln(a / e), a and e
  the week's and the reference's proportions, each floored at ``EPSILON`` (an empty bin would make it
  infinite). Fewer results: no PSI (too noisy). The week in progress is compared as it fills. Rule of thumb:
  below 0.1 stable, 0.1 to 0.2 a moderate shift, above 0.2 (the default ``drift_psi_threshold``) significant.
- Alerts: ``DriftWatch`` (the node's scheduler) logs each (version, week) over the threshold once; the triage
  page shows a banner while the newest week with a PSI of the version in service (that of the newest result)
  is over it.

Only versions, weeks, counts and scores are read: no study, patient or accession appears here.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Date, case, func, select, type_coerce
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.settings import Settings
from worklist.models import Job, Result

log = logging.getLogger(__name__)

BINS = 10
EDGES = tuple(n / BINS for n in range(1, BINS))  # inner bin edges: bin k holds EDGES[k-1] <= score < EDGES[k]
EPSILON = 1e-4
REPORT_MAX_AGE = 60.0  # seconds the API reuses a report (~0.25 s to compute at 100k results)
PLOTTED_VERSIONS, PLOTTED_WEEKS = 4, 8  # the PNG: the newest versions, each with its newest compared weeks


def week_label(monday: date) -> str:
    """``2026-W45``: the ISO year and week of a Monday."""
    year, week, _ = monday.isocalendar()
    return f"{year}-W{week:02d}"


def psi(actual: Sequence[int], expected: Sequence[int]) -> float:
    """Population Stability Index of ``actual`` bin counts against ``expected`` (proportions floored at EPSILON)."""
    return sum((a - e) * math.log(a / e) for a, e in zip(_proportions(actual), _proportions(expected), strict=True))


def _proportions(counts: Sequence[int]) -> list[float]:
    total = sum(counts)
    return [max(count / total, EPSILON) for count in counts]


@dataclass(frozen=True)
class WeekScores:
    """One version's scores in one ISO week (``start``: its Monday). ``psi`` is None for a week with too few
    results or a version with no reference week yet."""

    version: str
    start: date
    counts: tuple[int, ...]
    mean: float
    psi: float | None = None

    @property
    def week(self) -> str:
        return week_label(self.start)

    @property
    def n(self) -> int:
        return sum(self.counts)

    def to_json(self) -> dict[str, Any]:
        return {"week": self.week, "start": self.start.isoformat(), "n": self.n, "mean": self.mean, "psi": self.psi,
                "counts": list(self.counts)}


@dataclass(frozen=True)
class VersionDrift:
    """A model version's weeks, oldest first, and its reference week."""

    version: str
    weeks: tuple[WeekScores, ...]
    reference: WeekScores | None

    @property
    def latest(self) -> WeekScores | None:
        """The newest week with a PSI."""
        return next((week for week in reversed(self.weeks) if week.psi is not None), None)


@dataclass(frozen=True)
class DriftReport:
    """Every version's weekly scores; ``in_service``: the version of the newest result."""

    threshold: float
    min_studies: int
    in_service: str | None
    versions: tuple[VersionDrift, ...]  # by first week

    def over(self, week: WeekScores) -> bool:
        return week.psi is not None and week.psi > self.threshold

    def shifted(self) -> list[WeekScores]:
        """Every week (of every version) whose PSI is over the threshold."""
        return [week for version in self.versions for week in version.weeks if self.over(week)]

    def alert(self) -> str | None:
        """The banner text when the newest compared week of the version in service is over the threshold."""
        version = next((v for v in self.versions if v.version == self.in_service), None)
        latest = version.latest if version else None
        if version is None or version.reference is None or latest is None or not self.over(latest):
            return None
        return (f"Score drift: model {version.version}, week {latest.week}: PSI {latest.psi:.3f} above "
                f"{self.threshold:g} (n {latest.n}) against its reference week {version.reference.week}. "
                "Its suspicion scores are distributed differently: check the inputs and the model.")

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "min_studies": self.min_studies, "bins": BINS,
                "in_service": self.in_service, "alert": self.alert(),
                "versions": [{"version": v.version, "reference_week": v.reference.week if v.reference else None,
                              "latest_week": v.latest.week if v.latest else None,
                              "weeks": [week.to_json() for week in v.weeks]} for v in self.versions]}


def _daily_histograms(session: Session) -> list[Any]:
    """(version, UTC day, bin, count, sum of scores) of every result, grouped in SQL."""
    created = Result.created_at  # SQLite stores the UTC time; PostgreSQL's timestamptz is shifted to UTC
    day = type_coerce(func.date(created if session.get_bind().dialect.name == "sqlite"
                                else func.timezone("UTC", created)), Date)
    bin_ = case(*((Result.suspicion < edge, n) for n, edge in enumerate(EDGES)), else_=BINS - 1)
    return list(session.execute(select(Job.model_version, day, bin_, func.count(), func.sum(Result.suspicion))
                                .join(Job, Job.id == Result.job_id).where(Job.model_version.is_not(None))
                                .group_by(Job.model_version, day, bin_)))


def drift_report(sessions: sessionmaker[Session], settings: Settings, today: date | None = None) -> DriftReport:
    """Every version's weekly histograms and PSIs (``today``: the UTC date that decides which weeks ended)."""
    with sessions() as session:
        rows = _daily_histograms(session)
        in_service = session.scalar(select(Job.model_version).join(Result, Result.job_id == Job.id)
                                    .order_by(Result.id.desc()).limit(1))
    counts: dict[tuple[str, date], list[int]] = {}
    totals: dict[tuple[str, date], float] = defaultdict(float)
    for version, day, bin_, count, total in rows:
        key = (version, day - timedelta(days=day.weekday()))  # the week's Monday
        counts.setdefault(key, [0] * BINS)[bin_] += count
        totals[key] += total
    weeks: dict[str, list[WeekScores]] = {}  # versions by first week, each one's weeks oldest first
    for (version, start), bins in sorted(counts.items(), key=lambda item: (item[0][1], item[0][0])):
        mean = totals[version, start] / sum(bins)
        weeks.setdefault(version, []).append(WeekScores(version, start, tuple(bins), mean))
    today = today or datetime.now(UTC).date()
    return DriftReport(settings.drift_psi_threshold, settings.drift_min_studies, in_service,
                       tuple(_compare(version, by_week, settings.drift_min_studies, today)
                             for version, by_week in weeks.items()))


def _compare(version: str, weeks: list[WeekScores], min_studies: int, today: date) -> VersionDrift:
    """The reference week (first full week with enough results) and each week's PSI against it."""
    first = weeks[0].start
    reference = next((week for week in weeks if first < week.start and week.start + timedelta(days=7) <= today
                      and week.n >= min_studies), None)
    if reference is None:
        return VersionDrift(version, tuple(weeks), None)
    return VersionDrift(version, tuple(replace(week, psi=psi(week.counts, reference.counts))
                                       if week.n >= min_studies else week for week in weeks),
                        replace(reference, psi=0.0))


class CachedReport:
    """``drift_report()`` computed at most every ``max_age`` seconds: the API's pages, banner and metrics share
    it (the weekly picture does not change by the second, and the query reads every result)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, max_age: float = REPORT_MAX_AGE) -> None:
        self.sessions = sessions
        self.settings = settings
        self.max_age = max_age
        self.lock = threading.Lock()
        self.cached: tuple[float, DriftReport] | None = None

    def __call__(self) -> DriftReport:
        with self.lock:
            now = time.monotonic()
            if self.cached is None or now - self.cached[0] >= self.max_age:
                self.cached = (now, drift_report(self.sessions, self.settings))
            return self.cached[1]


class DriftWatch:
    """The scheduler's drift check: at most every ``drift_check_seconds``, logs one WARNING per (version, week)
    over the threshold.

    The (version, week) pairs already logged are kept in memory, not in the database: the log is the only
    thing they gate (the page, ``/api/drift`` and the ``mammo_suspicion_psi`` gauge show the state itself),
    one scheduler runs per node, and a restarted node logging the weeks still over the threshold once more is
    a reminder rather than noise. A table would need a migration for no other use.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.logged: set[tuple[str, str]] = set()
        self.checked_at: float | None = None

    def due(self, now: float) -> bool:
        """Whether a check is due at monotonic time ``now`` (the first one is due at once)."""
        return self.checked_at is None or now - self.checked_at >= self.settings.drift_check_seconds

    def check(self, sessions: sessionmaker[Session], now: float) -> list[WeekScores]:
        """Read the report and log the weeks over the threshold not logged before; returns those."""
        self.checked_at = now
        report = drift_report(sessions, self.settings)
        new = [week for week in report.shifted() if (week.version, week.week) not in self.logged]
        for week in new:
            self.logged.add((week.version, week.week))
            log.warning("score drift: model %s week %s: PSI %.3f above %g (n %d)", week.version, week.week,
                        week.psi, report.threshold, week.n)
        return new


def plot_png(report: DriftReport) -> bytes:
    """A small PNG (matplotlib, Agg): per version (the newest ``PLOTTED_VERSIONS`` with a reference), the score
    distribution of its newest compared weeks (over the threshold: red) and of its reference week (dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    versions = [(v, v.reference) for v in report.versions if v.reference is not None][-PLOTTED_VERSIONS:]
    figure = Figure(figsize=(6.4, 0.6 + 2.2 * max(len(versions), 1)), dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    if not versions:
        figure.text(0.5, 0.5, f"no reference week yet (a full week with at least {report.min_studies} results)",
                    ha="center", va="center")
    for n, (version, reference) in enumerate(versions):
        _plot_version(figure.add_subplot(len(versions), 1, n + 1), version, reference, report)
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def _plot_version(axes: Any, version: VersionDrift, reference: WeekScores, report: DriftReport) -> None:
    """The reference week dashed, then the newest compared weeks, older ones lighter."""
    from matplotlib import colormaps

    centres = [(n + 0.5) / BINS for n in range(BINS)]
    recent = [week for week in version.weeks if week.psi is not None and week != reference][-PLOTTED_WEEKS:]
    axes.plot(centres, _proportions(reference.counts), "k--", marker=".", label=f"{reference.week} (reference)")
    for n, week in enumerate(recent, start=1):
        color = "tab:red" if report.over(week) else colormaps["Blues"](0.35 + 0.65 * n / len(recent))
        axes.plot(centres, _proportions(week.counts), "-", marker=".", color=color,
                  label=f"{week.week} PSI {week.psi:.2f}")
    axes.set(title=version.version, xlim=(0, 1), ylim=(0, None), xlabel="study suspicion score",
             ylabel="share of results")
    axes.legend(fontsize="x-small", ncols=2)
