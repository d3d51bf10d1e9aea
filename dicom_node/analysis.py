"""One study analysis: stored instances -> scores and heatmaps -> SR, one SEG per view, overlay PNGs.

Everything written for a job lives under ``results/<study>/<job>/`` and every UID is derived from the study
and job, so a re-run of the same job (after a crash) rewrites the same objects with the same UIDs, and a
destination that already holds them sees a harmless resend of the same SOP instances.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node.heads import (
    ServedDetector,
    ServedFactor,
    ServedHead,
    ServedMultiView,
    class_scores,
    head_probabilities,
)
from dicom_node.results.findings import (
    BIRADS_LABELS,
    DENSITY_LABELS,
    FINDING_TASKS,
    Assessment,
    BreastFindings,
    ModelIdentity,
    StudyFindings,
    ViewFindings,
)
from dicom_node.results.io import overlay_file, seg_file
from dicom_node.results.overlay import (
    DisplayImage,
    display_pixels,
    factor_title,
    heatmap_overlay_png,
    malignancy_title,
)
from dicom_node.results.seg import FACTOR_PREFIX, TRANSFER_SYNTAX
from dicom_node.results.writer import (
    ResultWriter,
    SegRequest,
    SrRequest,
    without_pixels,
    write_seg,
    write_sr,
)
from dicom_node.storage import validated_uid
from models.clip import MammoClip
from models.device_memory import peak_cuda_memory
from models.errors import ImageDecodeError
from models.heatmap import finding_maps, task_directions
from models.inference import SCREENING_VIEWS, ViewKey, score_views
from models.optimize import inference_copy
from models.preprocess import (
    CropBox,
    PreprocessConfig,
    normalize,
    prepare_presentation,
    presentation_pixels,
    read_dicom,
)
from models.sop_classes import view_preference
from models.zero_shot import ZeroShotClassifier

log = logging.getLogger(__name__)

HEATMAP_TASKS = ("malignancy", "mass", "calcification")
# what ``view_preference`` reads of a header
PREFERENCE_TAGS = ["AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime", "InstanceNumber",
                   "ViewCodeSequence", "ViewModifierCodeSequence"]
# Reads and windows a study's views at once (threads start on first use; one pool for every model version).
_PREPARERS = ThreadPoolExecutor(max_workers=min(len(SCREENING_VIEWS), len(os.sched_getaffinity(0))),
                                thread_name_prefix="prepare-view")


class NoScreeningViewsError(ImageDecodeError):
    """A study whose analysable instances hold none of LCC, RCC, LMLO, RMLO."""


@dataclass(frozen=True)
class SourceInstance:
    """A stored instance of the study, as the worklist knows it."""

    path: Path
    sop_instance_uid: str
    laterality: str | None
    view: str | None


@dataclass(frozen=True)
class ResultObject:
    """A DICOM object the analysis wrote: what it is, its SOP Instance UID and its file."""

    kind: str
    sop_instance_uid: str
    path: Path


@dataclass(frozen=True)
class ViewOverlay:
    """What one view's overlay PNGs are drawn from: its findings, display image, crop box and model-size maps."""

    view: ViewFindings
    shown: DisplayImage
    box: CropBox
    heatmaps: dict[str, np.ndarray]


@dataclass
class AnalysisOutput:
    """The findings and the DICOM objects written (the SR first). The overlay PNGs are for people, not for PACS:
    ``draw_overlays()`` writes them once the results are recorded and on their way."""

    findings: StudyFindings
    objects: list[ResultObject]
    folder: Path
    overlay_views: list[ViewOverlay] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    gpu_memory_peak_bytes: int | None = None  # the job's peak CUDA memory; None off CUDA (not a timing)

    def draw_overlays(self) -> list[Path]:
        """Write each view's malignancy overlay PNG, and one per FActOR map; returns their paths."""
        start = time.perf_counter()
        written = [path for overlay in self.overlay_views for path in _overlay_pngs(self.folder, overlay)]
        log.info("study %s: %d overlay(s) drawn in %.2f s", self.findings.study_instance_uid, len(written),
                 time.perf_counter() - start)
        return written


def _overlay_pngs(folder: Path, overlay: ViewOverlay) -> list[Path]:
    """One overlay PNG per FActOR map, then the view's malignancy overlay (each map pasted at the displayed size):
    once the last view's ``overlay_<view>.png`` exists, every overlay of the study does."""
    view, shown, box = overlay.view, overlay.shown, overlay.box
    written = []
    for name in (name for name in overlay.heatmaps if name.startswith(FACTOR_PREFIX)):
        attribute = name.removeprefix(FACTOR_PREFIX)
        path = overlay_file(folder, view.name, attribute)
        heatmap_overlay_png(shown, box.paste(overlay.heatmaps[name], shown.gray.shape), path,
                            factor_title(view.name, attribute))
        written.append(path)
    path = overlay_file(folder, view.name)
    heatmap_overlay_png(shown, box.paste(overlay.heatmaps["malignancy"], shown.gray.shape), path,
                        malignancy_title(view.name, view.scores["malignancy"]))
    return [*written, path]


def result_uid(study_uid: str, job_id: int, *parts: str) -> str:
    """A UID that is the same every time for the same study, job and object name."""
    return generate_uid(entropy_srcs=[study_uid, str(job_id), *parts])


def sr_uids(study_uid: str, job_id: int) -> tuple[str, str]:
    """The Series and SOP Instance UIDs of a job's SR."""
    return result_uid(study_uid, job_id, "SR series"), result_uid(study_uid, job_id, "SR")


def select_views(instances: list[SourceInstance]) -> dict[ViewKey, list[SourceInstance]]:
    """The instances of each screening view, best first: the first is analysed, the next where it cannot be
    read. Of several, a standard view comes before a spot, magnified or implant-displaced one, then the latest
    acquired (``models.sop_classes.view_preference``, from their headers), then the last listed (callers list
    them by arrival, which a resend changes: acquisition decides first)."""
    candidates: dict[ViewKey, list[SourceInstance]] = {}
    for instance in instances:
        key = ((instance.laterality or "").upper(), (instance.view or "").upper())
        if key in SCREENING_VIEWS:
            candidates.setdefault(key, []).insert(0, instance)
    for listed in candidates.values():
        if len(listed) > 1:
            listed.sort(key=_preference, reverse=True)  # stable: ties keep the newest arrival first
    return candidates


def _preference(instance: SourceInstance) -> tuple[bool, str, str, int]:
    """``view_preference`` of the instance's header; an unreadable header ranks last."""
    try:
        header = pydicom.dcmread(instance.path, stop_before_pixels=True, specific_tags=PREFERENCE_TAGS)
    except Exception:  # any damage: the image itself is tried (and refused) only if nothing better exists
        return False, "", "", -1
    return view_preference(header)


class Stopwatch:
    """Wall time per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _probabilities(row: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    scores = {task: float(row[task][1]) for task in FINDING_TASKS}
    density = dict(zip(DENSITY_LABELS, (float(p) for p in row["density"]), strict=True))
    birads = dict(zip(BIRADS_LABELS, (float(p) for p in row["birads"]), strict=True))
    return scores, density, birads


@dataclass(frozen=True)
class PreparedView:
    """One view read and windowed once: its dataset, the model input and where it came from, its display image."""

    dataset: Dataset
    image: torch.Tensor
    box: CropBox
    shown: DisplayImage


def _prepare_readable(candidates: list[SourceInstance],
                      config: PreprocessConfig) -> tuple[SourceInstance, PreparedView] | ImageDecodeError:
    """The first of a view's instances (newest first) that can be read, prepared; else the newest one's error."""
    first_error: ImageDecodeError | None = None
    for instance in candidates:
        try:
            return instance, _prepare_view(instance.path, config)
        except ImageDecodeError as error:
            log.warning("instance %s (%s%s) cannot be analysed: %s", instance.sop_instance_uid, instance.laterality,
                        instance.view, type(error).__name__)
            first_error = first_error or error
    assert first_error is not None
    return first_error


def _prepare_view(path: Path, config: PreprocessConfig) -> PreparedView:
    ds = read_dicom(path)
    pixels = presentation_pixels(ds)  # windowed for the overlays, and for a model that starts from them
    image, box = prepare_presentation(ds, pixels, config)
    return PreparedView(ds, normalize(image, config), box, display_pixels(pixels))


class Analyzer:
    """A loaded model with its prompt embeddings, ready to analyse studies (one per worker process)."""

    def __init__(self, model: MammoClip, identity: ModelIdentity, results_root: Path,
                 heads: list[ServedHead] | None = None, multiview: ServedMultiView | None = None,
                 detector: ServedDetector | None = None, factor: ServedFactor | None = None,
                 writer: ResultWriter | None = None, seg_transfer_syntax: str = TRANSFER_SYNTAX) -> None:
        """``writer`` builds the SR and SEGs (default: in this process), the SEGs in ``seg_transfer_syntax``."""
        self.model = model
        self.serving = inference_copy(model)
        self.identity = identity
        self.heads = heads or []
        self.multiview = multiview
        self.detector = detector
        self.factor = factor
        self.results_root = Path(results_root)
        self.writer = writer or ResultWriter(0)
        self.seg_transfer_syntax = seg_transfer_syntax
        self.classifier = ZeroShotClassifier(self.serving)
        self.directions = {name: direction for name, direction in task_directions(self.classifier).items()
                           if name in HEATMAP_TASKS}

    def job_folder(self, study_uid: str, job_id: int) -> Path:
        return self.results_root / validated_uid(study_uid, "StudyInstanceUID") / str(int(job_id))

    def analyse(self, study_uid: str, job_id: int, instances: list[SourceInstance],
                heartbeat: Callable[[], object] = lambda: None, supersedes: Sequence[int] = ()) -> AnalysisOutput:
        """Score the study, build its SR and SEGs and write them under the job folder (the overlay PNGs when the
        caller calls ``draw_overlays()`` on the output); on a CUDA model, also measure the job's peak GPU memory.
        ``heartbeat`` is called between stages and before the first write: it may raise to stop the analysis.
        ``supersedes``: the earlier jobs of the study whose SRs this one's names as its predecessors."""
        with peak_cuda_memory(self.serving.device) as peak:
            output = self._analyse(study_uid, job_id, instances, heartbeat, supersedes)
        output.gpu_memory_peak_bytes = peak.bytes
        return output

    def _analyse(self, study_uid: str, job_id: int, instances: list[SourceInstance],
                 heartbeat: Callable[[], object], supersedes: Sequence[int]) -> AnalysisOutput:
        watch = Stopwatch()
        candidates = select_views(instances)
        if not candidates:
            raise NoScreeningViewsError(
                f"study {study_uid} has no screening view (LCC, RCC, LMLO, RMLO) among its "
                f"{len(instances)} analysable instance(s)")
        config = self.serving.config.preprocess()
        with watch.stage("preprocess"):  # the views at once: NumPy and OpenCV release the GIL on large arrays
            outcomes = dict(zip(candidates, _PREPARERS.map(lambda views: _prepare_readable(views, config),
                                                            candidates.values()), strict=True))
        readable = {key: outcome for key, outcome in outcomes.items() if not isinstance(outcome, ImageDecodeError)}
        if not readable:  # every view is unreadable: the study's failure, with the first view's reason
            raise next(outcome for outcome in outcomes.values() if isinstance(outcome, ImageDecodeError))
        # A view none of whose instances can be read is left out, as a view not received: the study is analysed
        # on the others and listed as incomplete; the log names the instances.
        chosen = {key: instance for key, (instance, _) in readable.items()}
        prepared = {key: view for key, (_, view) in readable.items()}
        datasets = {key: view.dataset for key, view in prepared.items()}
        images = {key: view.image for key, view in prepared.items()}
        heartbeat()
        with watch.stage("model"):
            scores = score_views(self.classifier, images, keep_feature_maps=True)
            trained = {served.target: head_probabilities(served, self.model, images, scores.feature_maps)
                       for served in self.heads}
        heartbeat()
        findings = self._findings(study_uid, chosen, scores,
                                  {key: error for key, error in outcomes.items() if key not in readable})
        self._apply_heads(findings, trained)
        if self.multiview is not None:
            with watch.stage("multiview"):
                findings.case_score = self.multiview.score(datasets)
                findings.sources["case"] = self.multiview.identity
            heartbeat()
        if self.detector is not None:
            with watch.stage("detector"):
                findings.detections = self.detector.detect(datasets)
                findings.sources["detector"] = self.detector.identity
        heartbeat()  # the last word of the caller before anything is written (``dicom_node.tasks._Heartbeat``)
        folder = self.job_folder(study_uid, job_id)
        seg_series = result_uid(study_uid, job_id, "SEG series")
        overlays: list[ViewOverlay] = []
        with watch.stage("encode"):  # the SR first (the findings are final): longest task first balances the helpers
            series, uid = sr_uids(study_uid, job_id)
            request = SrRequest(findings, [without_pixels(datasets[key]) for key in chosen], series, uid,
                                folder / "SR.dcm", tuple(sr_uids(study_uid, earlier) for earlier in supersedes))
            pending = [(ResultObject("SR", uid, request.path), self.writer.submit(write_sr, request))]
        for number, view in enumerate(findings.views, start=1):
            key = (view.laterality, view.view)
            with watch.stage("heatmaps"):  # over the model input; the SEG's helper and the overlay paste them back
                maps = finding_maps(self.serving, scores.feature_maps[key], self.directions, view.scores)
                heatmaps = {name: m.numpy() for name, m in maps.items()}
                if self.factor is not None:
                    heatmaps |= self.factor.maps(scores.feature_maps[key])
                overlays.append(ViewOverlay(view, prepared[key].shown, prepared[key].box, heatmaps))
            with watch.stage("encode"):
                uid = result_uid(study_uid, job_id, "SEG", view.name)
                request = SegRequest(without_pixels(datasets[key]), heatmaps, prepared[key].box, self.identity,
                                     self._segment_models(heatmaps), seg_series, uid, number,
                                     seg_file(folder, view.name), self.seg_transfer_syntax)
                pending.append((ResultObject("SEG", uid, request.path), self.writer.submit(write_seg, request)))
        heartbeat()
        with watch.stage("encode"):  # the writer's processes have all the cores: the overlays come after
            self.writer.wait([future for _, future in pending])
        log.info("study %s job %d analysed: %s", study_uid, job_id,
                 ", ".join(f"{k} {v:.2f}s" for k, v in watch.seconds.items()),
                 extra={"study_uid": study_uid, "job_id": job_id})
        return AnalysisOutput(findings, [obj for obj, _ in pending], folder, overlays, watch.seconds)

    def _findings(self, study_uid: str, chosen: dict[ViewKey, SourceInstance], scores,  # noqa: ANN001
                  unreadable: dict[ViewKey, ImageDecodeError]) -> StudyFindings:
        """The study's findings; ``unreadable``: the views left out because none of their instances could be
        read, with the newest one's error (kept as the reason the study page shows)."""
        views = []
        for key in SCREENING_VIEWS:
            if key in scores.views:
                probs = _probabilities(scores.views[key])
                views.append(ViewFindings(*probs, sop_instance_uid=chosen[key].sop_instance_uid,
                                          laterality=key[0], view=key[1]))
        breasts = [BreastFindings(*_probabilities(scores.breasts[side]), laterality=side)
                   for side in ("L", "R") if side in scores.breasts]
        missing = [f"{lat}{view}" for lat, view in scores.missing_views]
        reasons = {f"{lat}{view}": str(error)[:300] for (lat, view), error in unreadable.items()}
        return StudyFindings(study_uid, self.identity, views, breasts, missing, reasons)

    def _segment_models(self, heatmaps: dict[str, object]) -> dict[str, ModelIdentity]:
        """The FActOR segments' own algorithm identity (the zero-shot heatmaps are the base model's)."""
        if self.factor is None:
            return {}
        return {name: self.factor.identity for name in heatmaps if name.startswith(FACTOR_PREFIX)}

    def _apply_heads(self, findings: StudyFindings, trained: dict[str, dict[ViewKey, torch.Tensor]]) -> None:
        """Replace the zero-shot scores of each head's target with the head's, per view and per breast (max
        over the views for a binary head, mean for a multi-class one), and name the head as their source."""
        for served in self.heads:
            per_view = trained[served.target]
            for view in findings.views:
                _set_score(view, served, per_view[(view.laterality, view.view)])
            for breast in findings.breasts:
                values = torch.stack([p for (side, _), p in per_view.items() if side == breast.laterality])
                _set_score(breast, served, values.max(0).values if served.binary else values.mean(0))
            findings.sources[served.target] = served.identity


def _set_score(assessment: Assessment, served: ServedHead, probabilities: torch.Tensor) -> None:
    if served.binary:
        assessment.scores[served.target] = float(probabilities)
    elif served.target == "density":
        assessment.density = class_scores(served, probabilities)
    else:
        assessment.birads = class_scores(served, probabilities)

