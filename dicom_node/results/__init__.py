"""The DICOM objects the node sends back: TID 1500 SR, fractional SEG heatmaps, overlay PNGs.

The overlay PNGs (``dicom_node.results.overlay``) are imported from their module: they need ``models`` (and
torch), which the result writer's helper processes (``dicom_node.results.writer``) do without.
"""

from dicom_node.results.io import save_dataset
from dicom_node.results.seg import build_heatmap_seg
from dicom_node.results.sr import build_sr

__all__ = ["build_heatmap_seg", "build_sr", "save_dataset"]
