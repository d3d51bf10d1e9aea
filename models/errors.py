"""The project's exception hierarchy: every error the node raises on purpose derives from ``NodeError``."""


class NodeError(Exception):
    """Base class of every deliberate error in the Mammo-CLIP node."""


class CheckpointError(NodeError):
    """A checkpoint or model-version folder is missing, malformed, or does not match the architecture."""


class ImageDecodeError(NodeError):
    """An input file is not a usable mammogram (not an image, wrong modality, undecodable pixels)."""


class NotMammographyError(ImageDecodeError):
    """The DICOM object is valid but is not a mammography (MG) image."""


class ConfigurationError(NodeError):
    """A setting has a value that is not allowed."""
