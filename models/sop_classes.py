"""The mammography SOP classes and screening views the models analyse (a light module: no torch)."""

MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
MG_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.2.1"
MAMMOGRAPHY_SOP_CLASSES = frozenset({MG_FOR_PRESENTATION, MG_FOR_PROCESSING})

ViewKey = tuple[str, str]
SCREENING_VIEWS: tuple[ViewKey, ...] = (("L", "CC"), ("R", "CC"), ("L", "MLO"), ("R", "MLO"))
