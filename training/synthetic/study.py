"""One synthetic four-view screening study: patient, findings, images, masks and report, from a seed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from training.synthetic.dicom import StudyIdentity, build_dataset
from training.synthetic.findings import Finding, sample_finding
from training.synthetic.geometry import BreastShape, ViewGrid
from training.synthetic.phantom import render_view
from training.synthetic.report import write_report

VIEWS: tuple[tuple[str, str], ...] = (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))
DENSITIES = ("A", "B", "C", "D")
DENSITY_WEIGHTS = (0.1, 0.4, 0.4, 0.1)  # BI-RADS composition in screening populations
REAL_FIELD_MM = 0.065 * np.sqrt(4096 * 3328)  # a 3328x4096 detector at 65 um
BIRADS_SEVERITY = {1: 0, 2: 1, 3: 2, 0: 3, 4: 4, 5: 5}


@dataclass
class SyntheticView:
    """One rendered view with its DICOM dataset and the masks of the findings it shows."""

    laterality: str
    view: str
    dataset: Dataset
    masks: list[np.ndarray]
    findings_in_view: list[int]


@dataclass
class SyntheticStudy:
    """A whole synthetic screening study (every identifier is synthetic)."""

    study_instance_uid: str
    patient_id: str
    accession_number: str
    density: str
    birads: int
    findings: list[Finding]
    views: list[SyntheticView] = field(default_factory=list)
    report: str = ""
    breast_birads: dict[str, int] = field(default_factory=dict)

    def breast_labels(self, laterality: str) -> dict[str, int]:
        """Breast-level labels: mass, calcification, malignant (0/1) and the breast's BI-RADS."""
        own = [f for f in self.findings if f.laterality == laterality]
        return {"mass": int(any(f.kind == "mass" for f in own)),
                "calcification": int(any(f.kind == "calcification" for f in own)),
                "malignant": int(any(f.malignant for f in own)),
                "birads": self.breast_birads.get(laterality, 1)}


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["mammo-clip-node synthetic", str(seed), *map(str, parts)])


def _sample_findings(rng: np.random.Generator, finding_prevalence: float,
                     malignancy_prevalence: float) -> list[Finding]:
    if rng.random() >= finding_prevalence:
        return []
    malignant = rng.random() < malignancy_prevalence
    count = 1 + int(rng.random() < 0.3)
    return [sample_finding(rng, str(rng.choice(("mass", "calcification"))), str(rng.choice(("L", "R"))),
                           malignant and index == 0) for index in range(count)]


def _breast_birads(findings: list[Finding], rng: np.random.Generator) -> int:
    if not findings:
        return 1
    if any(f.malignant for f in findings):
        spiculated = any(f.shape in ("spiculated", "linear") for f in findings)
        return int(rng.choice((0, 4, 5), p=(0.15, 0.35, 0.5) if spiculated else (0.2, 0.6, 0.2)))
    return 3 if rng.random() < 0.15 else 2


def _shapes(rng: np.random.Generator) -> dict[str, BreastShape]:
    depth, half = rng.uniform(0.55, 0.75), rng.uniform(0.34, 0.42)
    return {"CC": BreastShape(depth, half, rng.uniform(0.46, 0.54)),
            "MLO": BreastShape(depth * rng.uniform(0.95, 1.05), half * 1.15, rng.uniform(0.54, 0.6),
                               pectoral_width=rng.uniform(0.25, 0.4), pectoral_height=rng.uniform(0.35, 0.55))}


def _encode(image: np.ndarray, bits: int, photometric: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Quantize to the stored bit depth and pick a breast window; MONOCHROME1 mirrors both."""
    top = 2**bits - 1
    stored = np.round(image * top).astype(np.uint16)
    breast = stored[(image > 0.1) & (image < 0.85)]
    low, high = (np.percentile(breast, (0.5, 99.5)) if breast.size else (0, top))
    center, width = (low + high) / 2, max(high - low, 64.0)
    if photometric == "MONOCHROME1":
        return (top - stored).astype(np.uint16), (top - center, width)
    return stored, (center, width)


def generate_study(seed: int, *, rows: int = 4096, cols: int = 3328, malignancy_prevalence: float = 0.3,
                   finding_prevalence: float = 0.5, photometric: str | None = None, density: str | None = None,
                   views: tuple[tuple[str, str], ...] = VIEWS) -> SyntheticStudy:
    """A deterministic synthetic study. Prevalences default to an *enriched* training mix; real screening
    finds cancer in about 0.5-1% of studies."""
    rng = np.random.default_rng(seed)
    density = density or str(rng.choice(DENSITIES, p=DENSITY_WEIGHTS))
    stored_photometric = "MONOCHROME1" if rng.random() < 0.2 else "MONOCHROME2"
    photometric = photometric or stored_photometric
    bits = int(rng.choice((12, 13, 14)))
    findings = _sample_findings(rng, finding_prevalence, malignancy_prevalence)
    breast_birads = {side: _breast_birads([f for f in findings if f.laterality == side], rng) for side in "LR"}
    birads = max(breast_birads.values(), key=BIRADS_SEVERITY.__getitem__)
    age = int(rng.integers(40, 75))
    date = dt.date(2026, 1, 5) + dt.timedelta(days=int(rng.integers(0, 300)))
    identity = StudyIdentity(
        patient_name=f"SYNTHETIC^PHANTOM^{seed:06d}", patient_id=f"SYN{seed:08d}",
        birth_date=f"{date.year - age}0101", age=age, study_uid=_uid(seed, "study"),
        study_date=date.strftime("%Y%m%d"), study_time=f"{8 + seed % 10:02d}{seed % 60:02d}00",
        accession=f"SA{seed:08d}")
    pixel_mm = float(REAL_FIELD_MM / np.sqrt(rows * cols))
    shapes = {side: _shapes(rng) for side in "LR"}
    study = SyntheticStudy(identity.study_uid, identity.patient_id, identity.accession, density, birads, findings,
                           report=write_report(findings, density, birads, age, rng), breast_birads=breast_birads)
    for number, (laterality, view) in enumerate(VIEWS, start=1):
        if (laterality, view) not in views:
            continue
        grid = ViewGrid(rows, cols, chest_wall_right=laterality == "R", shape=shapes[laterality][view])
        indices = [i for i, f in enumerate(findings) if f.laterality == laterality]
        positions = [grid.to_pixel(findings[i].depth_fraction,
                                   0.55 * findings[i].offsets()[0 if view == "CC" else 1]) for i in indices]
        image, masks = render_view(grid, density, [findings[i] for i in indices], positions, pixel_mm,
                                   seed=seed * 8 + number)
        stored, window = _encode(image, bits, photometric)
        dataset = build_dataset(identity, laterality, view, stored, bits=bits, photometric=photometric,
                                window=window, pixel_mm=pixel_mm, series_uid=_uid(seed, "series", number),
                                sop_uid=_uid(seed, "image", number), instance_number=number)
        study.views.append(SyntheticView(laterality, view, dataset, masks, indices))
    return study
