"""Writing synthetic studies to disk: DICOM files, mask PNGs, reports and a manifest of labels."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import cv2
from tqdm import tqdm

from training.synthetic.study import SyntheticStudy, generate_study

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("accession_number", "patient_id", "study_instance_uid", "sop_instance_uid", "laterality",
                    "view", "path", "photometric", "density", "birads", "mass", "calcification", "malignant",
                    "n_findings", "mask_paths", "report_path")


def write_study(study: SyntheticStudy, outdir: Path) -> list[dict[str, object]]:
    """Write one study under ``outdir/<accession>/`` and return its manifest rows."""
    folder = outdir / study.accession_number
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    report_path = folder / "report.txt"
    report_path.write_text(study.report)
    rows = []
    for view in study.views:
        name = f"{view.laterality}_{view.view}"
        view.dataset.save_as(folder / f"{name}.dcm", enforce_file_format=True)
        mask_paths = []
        for index, mask in zip(view.findings_in_view, view.masks, strict=True):
            mask_path = folder / "masks" / f"{name}_f{index}_{study.findings[index].kind}.png"
            cv2.imwrite(str(mask_path), mask.astype("uint8") * 255)
            mask_paths.append(mask_path.relative_to(outdir).as_posix())
        labels = study.breast_labels(view.laterality)
        rows.append({
            "accession_number": study.accession_number, "patient_id": study.patient_id,
            "study_instance_uid": study.study_instance_uid, "sop_instance_uid": view.dataset.SOPInstanceUID,
            "laterality": view.laterality, "view": view.view, "path": f"{study.accession_number}/{name}.dcm",
            "photometric": view.dataset.PhotometricInterpretation, "density": study.density, **labels,
            "n_findings": len(view.findings_in_view), "mask_paths": ";".join(mask_paths),
            "report_path": report_path.relative_to(outdir).as_posix(),
        })
    return rows


def write_studies(outdir: Path, n_studies: int, *, seed: int = 0, rows: int = 4096, cols: int = 3328,
                  malignancy_prevalence: float = 0.3, finding_prevalence: float = 0.5,
                  progress: bool = True) -> Path:
    """Write ``n_studies`` studies (seeds ``seed``, ``seed+1``...) and ``manifest.csv``; returns its path."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    manifest_rows: list[dict[str, object]] = []
    for index in tqdm(range(n_studies), desc="synthetic studies", unit="study", disable=not progress):
        study = generate_study(seed + index, rows=rows, cols=cols, malignancy_prevalence=malignancy_prevalence,
                               finding_prevalence=finding_prevalence)
        manifest_rows += write_study(study, outdir)
        log.debug("wrote synthetic study %s", study.study_instance_uid)
    manifest = outdir / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(manifest_rows)
    return manifest
