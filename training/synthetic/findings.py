"""Lesions: sampling masses and calcification clusters, and drawing them with their ground-truth masks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

BENIGN_MASS_SHAPES = ("round", "oval")
MALIGNANT_MASS_SHAPES = ("irregular", "spiculated")
BENIGN_CALC_SHAPES = ("punctate", "amorphous")
MALIGNANT_CALC_SHAPES = ("pleomorphic", "linear")
DEPTH_RANGES = {"anterior": (0.68, 0.82), "middle": (0.45, 0.62), "posterior": (0.22, 0.40)}


@dataclass(frozen=True)
class Finding:
    """One lesion of a study, described as a radiologist would report it."""

    kind: str            # "mass" | "calcification"
    laterality: str      # "L" | "R"
    shape: str           # mass: round/oval/irregular/spiculated; calcification: punctate/amorphous/pleomorphic/linear
    malignant: bool
    size_mm: float
    clock: int           # 1..12, clock face seen from the front of the patient
    depth: str           # anterior | middle | posterior
    depth_fraction: float  # 0 chest wall .. 1 nipple
    seed: int            # drawing seed (the same lesion looks the same in CC and MLO)

    def offsets(self) -> tuple[float, float]:
        """(lateral, superior) components of the clock position, each in -1..1."""
        angle = 2 * math.pi * self.clock / 12
        patient_left = math.sin(angle)
        lateral = patient_left if self.laterality == "L" else -patient_left
        return lateral, math.cos(angle)

    @property
    def quadrant(self) -> str:
        lateral, superior = self.offsets()
        if abs(lateral) < 0.3 and abs(superior) < 0.3:
            return "retroareolar region"
        vertical = "upper" if superior > 0.3 else "lower" if superior < -0.3 else "central"
        horizontal = "outer" if lateral > 0.3 else "inner" if lateral < -0.3 else ""
        return " ".join(p for p in (vertical, horizontal) if p) + " quadrant"


def sample_finding(rng: np.random.Generator, kind: str, laterality: str, malignant: bool) -> Finding:
    """A random lesion with realistic morphology for its malignancy."""
    if kind == "mass":
        shape = rng.choice(MALIGNANT_MASS_SHAPES if malignant else BENIGN_MASS_SHAPES)
        size = float(rng.uniform(8, 28) if malignant else rng.uniform(6, 20))
    else:
        shape = rng.choice(MALIGNANT_CALC_SHAPES if malignant else BENIGN_CALC_SHAPES)
        size = float(rng.uniform(6, 16))
    depth = str(rng.choice(list(DEPTH_RANGES)))
    return Finding(kind=kind, laterality=laterality, shape=str(shape), malignant=malignant,
                   size_mm=round(size, 1), clock=int(rng.integers(1, 13)), depth=depth,
                   depth_fraction=float(rng.uniform(*DEPTH_RANGES[depth])), seed=int(rng.integers(2**31)))


def _mass_outline(finding: Finding, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Polygon of the mass boundary around (0, 0), in pixels."""
    angles = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    if finding.shape == "round":
        r = np.full_like(angles, radius)
    elif finding.shape == "oval":
        tilt, ratio = rng.uniform(0, math.pi), rng.uniform(0.55, 0.75)
        r = radius * ratio / np.sqrt((ratio * np.cos(angles - tilt)) ** 2 + np.sin(angles - tilt) ** 2)
    else:
        harmonics = sum(rng.uniform(0.05, 0.18) * np.cos(k * angles + rng.uniform(0, 2 * math.pi))
                        for k in range(2, 7))
        r = radius * (1 + harmonics)
    return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)


def draw_mass(finding: Finding, center: tuple[float, float], pixel_mm: float,
              shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Density added by a mass (float32, 0..1) and its ground-truth mask."""
    rng = np.random.default_rng(finding.seed)
    radius = max(finding.size_mm / 2 / pixel_mm, 2.0)
    outline = _mass_outline(finding, radius, rng) + np.array([center[1], center[0]])
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(outline).astype(np.int32)], 1)
    density = mask.astype(np.float32)
    if finding.shape == "spiculated":
        spicules = np.zeros(shape, np.float32)
        for angle in rng.uniform(0, 2 * math.pi, int(rng.integers(8, 16))):
            length = radius * rng.uniform(1.6, 2.6)
            end = (center[1] + length * math.cos(angle), center[0] + length * math.sin(angle))
            cv2.line(spicules, (round(center[1]), round(center[0])), (round(end[0]), round(end[1])), 0.7,
                     max(1, round(radius * 0.08)))
        density = np.maximum(density, spicules)
    blur = 0.6 if finding.shape in ("round", "oval") else 1.5
    density = cv2.GaussianBlur(density, (0, 0), max(radius * 0.08 * blur, 0.5))
    return density, mask.astype(bool)


def draw_calcifications(finding: Finding, center: tuple[float, float], pixel_mm: float,
                        shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Density of a cluster of calcifications (small bright specks) and the cluster's mask."""
    rng = np.random.default_rng(finding.seed)
    spread = max(finding.size_mm / 2 / pixel_mm, 3.0)
    count = int(rng.integers(6, 20))
    if finding.shape == "linear":
        angle = rng.uniform(0, math.pi)
        t = rng.uniform(-1, 1, count)
        points = np.stack([t * spread * math.sin(angle), t * spread * math.cos(angle)], 1)
        points += rng.normal(0, spread * 0.08, points.shape)
    else:
        points = rng.normal(0, spread * 0.45, (count, 2))
    points += np.array(center)
    density = np.zeros(shape, np.float32)
    speck = {"punctate": 0.9, "amorphous": 0.45, "pleomorphic": 1.0, "linear": 1.0}[finding.shape]
    for (row, col), scale in zip(points, rng.uniform(0.6, 1.4, count), strict=True):
        radius = max(1, round(scale * (0.25 / pixel_mm)))
        cv2.circle(density, (round(col), round(row)), radius, speck, -1)
    mask = np.zeros(shape, np.uint8)
    inside = points[(points[:, 0] >= 0) & (points[:, 0] < shape[0]) & (points[:, 1] >= 0) & (points[:, 1] < shape[1])]
    if len(inside):
        hull = cv2.convexHull(np.round(inside[:, ::-1]).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 1)
        margin = max(2, round(1.0 / pixel_mm))
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)))
    return density, mask.astype(bool)
