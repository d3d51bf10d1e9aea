"""The mammography SOP classes and screening views the models analyse (a light module: no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
MAMMOGRAPHY_SOP_CLASSES = frozenset({MG_FOR_PRESENTATION, MG_FOR_PROCESSING})
# The images the models analyse and train on: processed for display, as in every public mammography dataset
# behind them. A "For Processing" image is the detector's raw signal (another look altogether): stored, not scored.
ANALYSABLE_SOP_CLASSES = frozenset({MG_FOR_PRESENTATION})

ViewKey = tuple[str, str]
SCREENING_VIEWS: tuple[ViewKey, ...] = (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))

# The View Code Sequence codes (CID 4014, SNOMED CT and the SNOMED RT codes older units send) of the views that a
# View Position names: the MG IOD requires the sequence, View Position is optional.
_VIEW_CODES = {"399162004": "CC", "R-10242": "CC", "399368009": "MLO", "R-10226": "MLO",
               "399260004": "ML", "R-10224": "ML", "399352003": "LM", "R-10236": "LM"}


def view_preference(ds: Dataset) -> tuple[bool, str, str, int]:
    """How much an image is the one to analyse for its view, as a sortable key (greater first): a standard view
    before a modified one (a View Modifier in its View Code Sequence: spot compression, magnification, implant
    displaced...), then the latest acquired (Acquisition, else Content, date and time; then Instance Number)."""
    date = str(ds.get("AcquisitionDate") or ds.get("ContentDate") or "")
    time = str(ds.get("AcquisitionTime") or ds.get("ContentTime") or "")
    try:
        number = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return not _view_modified(ds), date, time, number


def _view_modified(ds: Dataset) -> bool:
    codes = ds.get("ViewCodeSequence") or []
    return bool(ds.get("ViewModifierCodeSequence") or any(item.get("ViewModifierCodeSequence") for item in codes))


def view_of(ds: Dataset) -> ViewKey:
    """(laterality, view) of a mammogram, e.g. ("L", "CC"): Image Laterality (else Laterality), and View Position,
    else the view its View Code Sequence codes ("" where neither says)."""
    laterality = str(ds.get("ImageLaterality") or ds.get("Laterality") or "").upper()
    view = str(ds.get("ViewPosition") or "").upper()
    if not view and (codes := ds.get("ViewCodeSequence")):
        view = _VIEW_CODES.get(str(codes[0].get("CodeValue", "")), "")
    return laterality, view
