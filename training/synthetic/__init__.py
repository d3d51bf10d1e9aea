"""Synthetic screening mammography: four-view DICOM MG phantoms with lesion masks and reports.

For tests, demos and benchmarks only. A model trained on these phantoms is NOT a clinical model.
"""

from training.synthetic.findings import Finding
from training.synthetic.study import VIEWS, SyntheticStudy, SyntheticView, generate_study
from training.synthetic.writer import write_studies

__all__ = ["VIEWS", "Finding", "SyntheticStudy", "SyntheticView", "generate_study", "write_studies"]
