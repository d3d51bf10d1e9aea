"""What an archive index holds, in a few lines for people."""

from __future__ import annotations

from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from training.archive.store import SYNTHESIZED_REPORT, ArchiveImage, ArchiveSkip, ArchiveStudy


def describe_index(sessions: sessionmaker[Session]) -> list[str]:
    read_by_people = ArchiveStudy.report_text.is_not(None) & ~func.coalesce(
        ArchiveStudy.report_source, "").startswith(SYNTHESIZED_REPORT)
    with sessions() as session:
        studies = session.execute(select(ArchiveStudy.split, read_by_people, ArchiveStudy.label_source)).all()
        images = session.execute(select(ArchiveImage.view, ArchiveImage.cache_key.is_not(None),
                                        ArchiveImage.convert_error.is_not(None))).all()
        skips = session.execute(select(ArchiveSkip.reason, func.count()).group_by(ArchiveSkip.reason)
                                .order_by(func.count().desc())).all()
        patients = session.scalar(select(func.count(func.distinct(ArchiveStudy.patient_key))))
    splits = Counter(split for split, _, _ in studies)
    lines = [f"{len(studies)} studies of {patients} patients, {len(images)} images",
             "studies per split: " + ", ".join(f"{name} {count}" for name, count in sorted(splits.items())),
             f"with a reader's report: {sum(1 for _, has, _ in studies if has)}; labels from: "
             + (", ".join(f"{source} {n}" for source, n in Counter(s for _, _, s in studies if s).items()) or "none"),
             "views: " + ", ".join(f"{view} {n}" for view, n in sorted(Counter(v for v, _, _ in images).items())),
             f"converted: {sum(1 for _, done, _ in images if done)}, failed: {sum(1 for *_, bad in images if bad)}"]
    if skips:
        lines.append(f"skipped files ({sum(n for _, n in skips)}):")
        lines += [f"  {count:6d}  {reason}" for reason, count in skips]
    return lines


def failed_conversions(sessions: sessionmaker[Session]) -> list[tuple[str, str]]:
    with sessions() as session:
        return list(session.execute(select(ArchiveImage.sop_instance_uid, ArchiveImage.convert_error)
                                    .where(ArchiveImage.convert_error.is_not(None))).tuples())
