"""Free-text screening reports in the style of real ones, with varied phrasing per study."""

from __future__ import annotations

import numpy as np

from training.synthetic.findings import Finding

SIDE = {"L": "left", "R": "right"}
COMPOSITION = {
    "A": ("The breasts are almost entirely fatty.", "Breast composition: almost entirely fatty (ACR A)."),
    "B": ("There are scattered areas of fibroglandular density.",
          "Breast composition: scattered areas of fibroglandular density (ACR B)."),
    "C": ("The breasts are heterogeneously dense, which may obscure small masses.",
          "Breast composition: heterogeneously dense (ACR C). This may lower the sensitivity of mammography."),
    "D": ("The breasts are extremely dense, which lowers the sensitivity of mammography.",
          "Breast composition: extremely dense (ACR D)."),
}
ASSESSMENT = {
    0: "BI-RADS 0: Incomplete. Need additional imaging evaluation.",
    1: "BI-RADS 1: Negative.",
    2: "BI-RADS 2: Benign.",
    3: "BI-RADS 3: Probably benign.",
    4: "BI-RADS 4: Suspicious.",
    5: "BI-RADS 5: Highly suggestive of malignancy.",
}
RECOMMENDATION = {
    0: ("Recall for diagnostic mammography and ultrasound.", "Additional imaging is recommended."),
    1: ("Routine screening mammography in 1 year.", "Continue annual screening."),
    2: ("Routine screening mammography in 1 year.", "Annual screening mammography is recommended."),
    3: ("Short-interval follow-up mammography in 6 months.", "Follow-up diagnostic mammogram in 6 months."),
    4: ("Tissue sampling is recommended.", "Ultrasound-guided or stereotactic biopsy is recommended."),
    5: ("Biopsy is recommended.", "Tissue diagnosis is strongly recommended."),
}
MASS_MARGINS = {"round": "circumscribed", "oval": "circumscribed", "irregular": "indistinct",
                "spiculated": "spiculated"}
NEGATIVE = (
    "No suspicious masses, calcifications or architectural distortion.",
    "There is no dominant mass, suspicious calcification or architectural distortion.",
    "No mammographic evidence of malignancy.",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(finding: Finding, rng: np.random.Generator) -> str:
    """One finding sentence: side, location, depth, size, morphology."""
    side = SIDE[finding.laterality]
    where = rng.choice((f"in the {side} breast at {finding.clock} o'clock, {finding.depth} depth",
                        f"in the {finding.quadrant} of the {side} breast, {finding.depth} depth"))
    if finding.kind == "mass":
        margin = MASS_MARGINS[finding.shape]
        return str(rng.choice((
            f"There is a {finding.size_mm:.0f} mm {finding.shape} mass with {margin} margins {where}.",
            f"{_article(finding.shape).capitalize()} {finding.shape} {margin} mass measuring "
            f"{finding.size_mm:.0f} mm is seen {where}.",
        )))
    return str(rng.choice((
        f"There is a cluster of {finding.shape} calcifications spanning {finding.size_mm:.0f} mm {where}.",
        f"Grouped {finding.shape} microcalcifications over {finding.size_mm:.0f} mm are noted {where}.",
    )))


def write_report(findings: list[Finding], density: str, birads: int, age: int, rng: np.random.Generator) -> str:
    """A full report: examination, indication, comparison, technique, findings, impression."""
    sentences = [describe(f, rng) for f in findings]
    for side in ("L", "R"):
        if not any(f.laterality == side for f in findings) and findings:
            sentences.append(f"No suspicious findings in the {SIDE[side]} breast.")
    if not findings:
        sentences.append(str(rng.choice(NEGATIVE)))
    lines = [
        str(rng.choice(("EXAMINATION: Bilateral screening digital mammography.",
                        "EXAM: Screening mammogram, bilateral, 2D."))),
        f"INDICATION: Screening. {age}-year-old woman, asymptomatic.",
        str(rng.choice(("COMPARISON: None available.", "COMPARISON: Prior mammograms from 2 years ago.",
                        "COMPARISON: Previous screening examination, no interval change in background."))),
        "TECHNIQUE: Standard craniocaudal and mediolateral oblique views of both breasts.",
        "FINDINGS: " + str(rng.choice(COMPOSITION[density])) + " " + " ".join(sentences),
        "IMPRESSION: " + ASSESSMENT[birads] + " " + str(rng.choice(RECOMMENDATION[birads])),
        "This report describes a SYNTHETIC phantom generated for software testing; it is not a patient.",
    ]
    return "\n".join(lines) + "\n"
