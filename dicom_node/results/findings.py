"""What one analysis found, in plain data: the input of the SR and SEG builders and the Result row's JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

FINDING_TASKS = ("malignancy", "mass", "calcification")
DENSITY_LABELS = ("A", "B", "C", "D")
BIRADS_LABELS = ("1", "2", "3", "4", "5")
DISCLAIMER = "For research and triage support only; not for diagnosis. Not a medical device."
VERSION_LENGTH = 58  # a model version fits an LO (64) after the Software Versions' "model " prefix


def version_label(name: str, digest: str) -> str:
    """A model version, ``name@digest``, of at most ``VERSION_LENGTH`` characters: a long name is shortened,
    never the digest (what tells two versions' weights apart in the SR, the SEG and the database)."""
    return f"{name[:max(0, VERSION_LENGTH - len(digest) - 1)]}@{digest}"


@dataclass(frozen=True)
class ModelIdentity:
    """Which algorithm and which weights produced a result (IHE AIR algorithm identification)."""

    name: str
    software_version: str
    model_version: str
    clinical: bool = False


def _argmax(probabilities: dict[str, float]) -> str:
    return max(probabilities, key=probabilities.__getitem__)


@dataclass
class Assessment:
    """Probabilities of one image or one breast: finding tasks, density classes and BI-RADS categories."""

    scores: dict[str, float]
    density: dict[str, float]
    birads: dict[str, float]

    @property
    def density_category(self) -> str:
        return _argmax(self.density)

    @property
    def birads_category(self) -> str:
        return _argmax(self.birads)


@dataclass
class ViewFindings(Assessment):
    """One source image: its identity and its probabilities."""

    sop_instance_uid: str = ""
    laterality: str = ""
    view: str = ""

    @property
    def name(self) -> str:
        """``LCC``, ``RMLO``, ..."""
        return f"{self.laterality}{self.view}"


@dataclass
class BreastFindings(Assessment):
    """One breast: the mean of its views' probabilities."""

    laterality: str = ""


@dataclass(frozen=True)
class Detection:
    """A lesion a detector found on one source image; ``box`` is (x0, y0, x1, y1) in that image's pixels
    (column, row; 0,0 the top-left corner of the top-left pixel)."""

    sop_instance_uid: str
    laterality: str
    view: str
    finding: str  # one of the finding tasks: "mass" or "calcification"
    score: float
    box: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ValueError(f"detection box {self.box} is not (x0, y0, x1, y1) with x0 < x1 and y0 < y1")
        if self.finding not in FINDING_TASKS or not 0.0 <= self.score <= 1.0:
            raise ValueError(f"detection of {self.finding!r} with score {self.score} is not a finding in [0, 1]")


@dataclass
class StudyFindings:
    """Everything the node reports for one study analysis."""

    study_instance_uid: str
    model: ModelIdentity
    views: list[ViewFindings]
    breasts: list[BreastFindings]
    missing_views: list[str] = field(default_factory=list)
    unreadable_views: dict[str, str] = field(default_factory=dict)  # of the missing: received, why unreadable
    # target -> the trained head that gave its scores; targets not listed are the zero-shot ``model``'s
    sources: dict[str, ModelIdentity] = field(default_factory=dict)
    detections: list[Detection] = field(default_factory=list)  # their model is ``source("detector")``
    case_score: float | None = None  # P(malignant) of the study from a four-view model, ``source("case")``

    def source(self, target: str) -> ModelIdentity:
        """Which model gave the scores of ``target`` (a finding task, ``density`` or ``birads``)."""
        return self.sources.get(target, self.model)

    @property
    def suspicion(self) -> float:
        """Study-level suspicion (the triage sort key): the four-view model's case score where one was served,
        else the highest breast malignancy probability."""
        if self.case_score is not None:
            return self.case_score
        return max((breast.scores["malignancy"] for breast in self.breasts), default=0.0)

    @property
    def clinical(self) -> bool:
        """Whether every model that gave a score (the base model, each head, the four-view model, the detector)
        is marked for clinical use."""
        return self.model.clinical and all(identity.clinical for identity in self.sources.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "suspicion": self.suspicion, "clinical": self.clinical}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyFindings:
        return cls(study_instance_uid=data["study_instance_uid"], model=ModelIdentity(**data["model"]),
                   views=[ViewFindings(**view) for view in data["views"]],
                   breasts=[BreastFindings(**breast) for breast in data["breasts"]],
                   missing_views=list(data.get("missing_views", [])),
                   unreadable_views=dict(data.get("unreadable_views", {})),
                   sources={target: ModelIdentity(**identity)
                            for target, identity in data.get("sources", {}).items()},
                   detections=[Detection(**{**item, "box": tuple(item["box"])})
                               for item in data.get("detections", [])],
                   case_score=data.get("case_score"))
