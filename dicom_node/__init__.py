"""The DICOM node: Storage SCP, study analysis, results back to PACS, and the ``mammo-node`` command line.

pydicom's checks of values as they are read only warn, and their warnings quote the value: a malformed Patient's
Birth Date or name from a sender went into the node's log that way. The node reads without them (its own checks in
``dicom_node.validation`` decide what is refused); writing keeps pydicom's warnings for values the node sets.
"""

from pydicom import config as _pydicom_config

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
