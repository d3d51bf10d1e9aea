"""Coded concepts of the result objects.

Standard codes come from pydicom's code dictionary (and so from the DICOM context groups named below). The
two that are not in it were written by hand: SNOMED CT 254837009 (its Verhoeff check digit verified) and the
IHE AI Results "Processing Algorithm" purpose of reference.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

MALIGNANT_NEOPLASM_OF_BREAST = CodedConcept("254837009", "SCT", "Malignant neoplasm of breast")

# What each SR measurement group is about (CID 6054 Breast Imaging Finding where it has one).
FINDING_TYPES = {
    "malignancy": MALIGNANT_NEOPLASM_OF_BREAST,
    "mass": codes.SCT.MammographicBreastMass,
    "calcification": codes.SCT.CalcificationOfBreast,
}
# What each number is the probability of (CID 6048 has Probability of cancer; DCM 122157 is plain Probability).
PROBABILITY_NAMES = {
    "malignancy": codes.DCM.ProbabilityOfCancer,
    "mass": codes.DCM.Probability,
    "calcification": codes.DCM.Probability,
}
UNITLESS = codes.UCUM.NoUnits  # UCUM "1": a probability is a plain number in [0, 1]
LATERALITY = {"L": codes.SCT.Left, "R": codes.SCT.Right}

# Density: a group whose finding is "Mammographic breast density" (SCT 129793001) holds the qualitative
# evaluation "Breast composition" (SCT 129715009, the concept of CID 6014/6054) with a CID 6000 value: the
# four BI-RADS composition categories a to d.
DENSITY_FINDING = codes.SCT.MammographicBreastDensity
BREAST_COMPOSITION = codes.SCT.BreastComposition
DENSITY_VALUES = {
    "A": codes.SCT.AlmostEntirelyFat,
    "B": codes.SCT.ScatteredFibroglandularDensities,
    "C": codes.SCT.HeterogeneouslyDense,
    "D": codes.SCT.ExtremelyDense,
}
# BI-RADS-style category of a breast: "Assessment Category" with the SNOMED CT mammography assessments 1-5
# (codes from the dictionary; their full meanings exceed the 64 characters of a Code Meaning, so shortened).
ASSESSMENT_CATEGORY = codes.DCM.AssessmentCategory
BIRADS_VALUES = {
    label: CodedConcept(code.value, code.scheme_designator, meaning)
    for label, code, meaning in (
        ("1", codes.SCT.MammographyAssessmentCategory1Negative, "BI-RADS Category 1 - Negative"),
        ("2", codes.SCT.MammographyAssessmentCategory2BenignFinding, "BI-RADS Category 2 - Benign finding"),
        ("3", codes.SCT.MammographyAssessmentCategory3ProbablyBenignFindingShortIntervalFollowUp,
         "BI-RADS Category 3 - Probably benign finding"),
        ("4", codes.SCT.MammographyAssessmentCategory4SuspiciousAbnormalityBiopsyShouldBeConsidered,
         "BI-RADS Category 4 - Suspicious abnormality"),
        ("5", codes.SCT.MammographyAssessmentCategory5HighlySuggestiveOfMalignancy,
         "BI-RADS Category 5 - Highly suggestive of malignancy"),
    )
}
PROCEDURE_REPORTED = codes.LN.BreastBilateralMammogram  # LN 36626-0, CID 6050 Breast Procedure Reported

# SEG: morphologic abnormalities as segmented property types (Mass is in CID 7194).
SEGMENT_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure
SEGMENT_TYPES = {
    "malignancy": codes.SCT.MalignantNeoplasmPrimary,
    "mass": codes.SCT.Mass,
    "calcification": codes.SCT.PathologicCalcification,
}

# IHE AI Results: Contributing Equipment purpose of reference of the item that names the algorithm.
PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")
