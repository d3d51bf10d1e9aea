"""The DICOM node: Storage SCP, study analysis, results back to PACS, and the ``mammo-node`` command line.

Patient data must never reach a log line, and two libraries quoted it in warnings:
- pydicom's checks of values (WARN mode) quote the value, e.g. a malformed Patient's Birth Date from a sender. They
  are off in every node process, for values read and values set alike (pydicom checks a new element by its
  reading mode); the node's own checks (``dicom_node.validation``, the C-FIND SCP's) decide what is refused.
- highdicom warns, quoting it, about a Patient's Name without a ``^``; that warning is ignored.
"""

import warnings

from pydicom import config as _pydicom_config

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
warnings.filterwarnings("ignore", message=r"The string .* is unlikely to represent the intended person name",
                        category=UserWarning, module=r"highdicom\.")
