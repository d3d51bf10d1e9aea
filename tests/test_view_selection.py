"""Which image of a view the node analyses when a study holds several (``dicom_node.analysis.select_views``)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_node.analysis import SourceInstance, select_views
from models.sop_classes import view_preference


def _stored(source: Path, folder: Path, name: str, acquired: str, modifier: str | None = None) -> SourceInstance:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{len(name)}{acquired}"
    ds.AcquisitionDate, ds.AcquisitionTime = "20261130", acquired
    if modifier is not None:  # e.g. spot compression (SCT 399055006) in the View Code Sequence
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = modifier, "SCT", "Spot compression"
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence([code])
    ds.save_as(folder / name, enforce_file_format=True)
    return SourceInstance(folder / name, str(ds.SOPInstanceUID), str(ds.ImageLaterality), str(ds.ViewPosition))


def test_a_standard_view_latest_acquired_is_analysed_whatever_the_arrival_order(synthetic_root: Path,
                                                                                   tmp_path: Path) -> None:
    """A PACS re-push of an older exposure arrives last; a spot compression is acquired last: neither is the
    view's screening image. Arrival decides only between images the headers cannot tell apart."""
    source = next(synthetic_root.glob("*/L_CC.dcm"))
    assert pydicom.dcmread(source, stop_before_pixels=True).get("ViewCodeSequence")
    current = _stored(source, tmp_path, "current.dcm", "101500")
    spot = _stored(source, tmp_path, "spot.dcm", "103000", modifier="399055006")
    older = _stored(source, tmp_path, "older.dcm", "093000")
    broken = SourceInstance(tmp_path / "missing.dcm", "1.2.3", "L", "CC")
    arrival = [current, spot, older, broken]
    assert select_views(arrival)[("L", "CC")] == [current, older, spot, broken]
    twin = _stored(source, tmp_path, "twin.dcm", "101500")  # same acquisition: the newest arrival first
    assert select_views([current, twin])[("L", "CC")] == [twin, current]


def test_view_preference_orders_standard_before_modified_then_by_acquisition() -> None:
    plain, modified = Dataset(), Dataset()
    plain.ContentDate, plain.ContentTime, plain.InstanceNumber = "20261130", "0900", "3"
    modified.AcquisitionDate, modified.AcquisitionTime = "20261201", "1200"
    modified.ViewModifierCodeSequence = Sequence([Dataset()])
    assert view_preference(plain) == (True, "20261130", "0900", 3)
    assert view_preference(plain) > view_preference(modified)
