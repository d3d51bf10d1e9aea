"""The DICOM objects the node sends back: TID 1500 SR, fractional SEG heatmaps, overlay PNGs."""

from dicom_node.results.io import save_dataset
from dicom_node.results.overlay import display_image, heatmap_overlay_png
from dicom_node.results.seg import build_heatmap_seg
from dicom_node.results.sr import build_sr

__all__ = ["build_heatmap_seg", "build_sr", "display_image", "heatmap_overlay_png", "save_dataset"]
