"""Building and writing a job's DICOM results (one SEG per view, the SR) in helper processes.

Encoding is most of a study's post-model time, and it is pure-Python work (highdicom, pydicom) or a JPEG-LS /
JPEG 2000 encoder (the latter not thread-safe), so threads cannot overlap it. A small pool of processes builds
the SEGs and the SR at once: a server with more cores encodes the four views at once. ``processes=0`` builds
them in the calling process.

What crosses to a helper is small: the source images without their pixel data, and each heatmap at the model's
resolution with the crop box it came from; the helper pastes it back at the source's size (a 4096 x 3328 view's
three zero-shot maps are 41 MB there and a few kB here; FActOR maps, at the model input size, ~5.5 MB each).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicom_node.memory import retain_freed_memory
from dicom_node.results.findings import ModelIdentity, StudyFindings
from dicom_node.results.io import save_dataset
from dicom_node.results.readable import drop_unusable_geometry, empty_unreadable_values
from dicom_node.results.seg import MAX_FRACTIONAL_VALUE, TRANSFER_SYNTAX, build_heatmap_seg
from dicom_node.results.sr import build_sr
from models.crop import CropBox

log = logging.getLogger(__name__)

PIXEL_DATA = 0x7FE00010


def without_pixels(dataset: Dataset) -> Dataset:
    """``dataset``'s attributes and file meta, less the pixel data (what an SR or SEG needs of a source)."""
    header = Dataset({tag: element for tag, element in dataset.items() if tag != PIXEL_DATA})
    header.file_meta = dataset.file_meta
    return header


@dataclass(frozen=True)
class SegRequest:
    """One view's SEG: its source image (header), heatmaps over the model input and the crop box they paste back
    into (``models.crop.CropBox``), identities, and where it goes."""

    source: Dataset
    heatmaps: Mapping[str, np.ndarray]
    box: CropBox
    model: ModelIdentity
    segment_models: Mapping[str, ModelIdentity]
    series_instance_uid: str
    sop_instance_uid: str
    instance_number: int
    path: Path
    transfer_syntax_uid: str = TRANSFER_SYNTAX


@dataclass(frozen=True)
class SrRequest:
    """The study's SR: its findings, the analysed images (headers), its UIDs, where it goes, and the (Series,
    SOP Instance UID) of the earlier SRs it supersedes."""

    findings: StudyFindings
    sources: list[Dataset]
    series_instance_uid: str
    sop_instance_uid: str
    path: Path
    predecessors: tuple[tuple[str, str], ...] = ()


SEG_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9000


def write_seg(request: SegRequest) -> Path:
    empty_unreadable_values(request.source)  # the job's own copy of the image's header
    drop_unusable_geometry(request.source)
    heatmaps = {name: request.box.paste_levels(values, MAX_FRACTIONAL_VALUE)
                for name, values in request.heatmaps.items()}
    seg = build_heatmap_seg(request.source, heatmaps, request.model, series_instance_uid=request.series_instance_uid,
                            sop_instance_uid=request.sop_instance_uid, series_number=SEG_SERIES_NUMBER,
                            instance_number=request.instance_number, segment_models=request.segment_models,
                            transfer_syntax_uid=request.transfer_syntax_uid)
    return save_dataset(seg, request.path)


def write_sr(request: SrRequest) -> Path:
    for source in request.sources:  # the job's own copies of the images' headers
        empty_unreadable_values(source)
        drop_unusable_geometry(source)
    sr = build_sr(request.findings, request.sources, series_instance_uid=request.series_instance_uid,
                  sop_instance_uid=request.sop_instance_uid, series_number=SR_SERIES_NUMBER, instance_number=1,
                  predecessors=request.predecessors)
    return save_dataset(sr, request.path)


def _helper_pid(_: int) -> int:
    time.sleep(0.05)  # held briefly, so that each of the pool's first tasks starts a helper of its own
    return os.getpid()


class ResultWriter:
    """Runs ``write_seg``/``write_sr`` in a pool of ``processes`` helpers (0: in the calling thread).

    The helpers fork from a fork server that imported this module once, so none inherits the worker's threads
    or model. A helper that dies breaks the pool: the job sees the error (and is retried) and the next job
    gets a new pool. With ``retain_memory`` each helper keeps the memory it frees (``dicom_node.memory``).
    """

    def __init__(self, processes: int, retain_memory: bool = False) -> None:
        self.processes = processes
        self.retain_memory = retain_memory
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context,
                                                 initializer=retain_freed_memory if self.retain_memory else None)
            return self._pool

    def start(self) -> list[int]:
        """Start the fork server and the helpers now (the worker does it when it starts), so that its first job
        does not wait for them; returns the helpers' process ids (none with ``processes=0``)."""
        if self.processes == 0:
            return []
        pool = self._executor()
        return sorted(set(pool.map(_helper_pid, range(self.processes))))

    def submit(self, function: Callable[[SegRequest], Path] | Callable[[SrRequest], Path],
               request: SegRequest | SrRequest) -> Future[Path]:
        if self.processes == 0:
            done: Future[Path] = Future()
            try:
                done.set_result(function(request))
            except Exception as error:
                done.set_exception(error)
            return done
        try:
            return self._executor().submit(function, request)
        except BrokenProcessPool:
            self.reset()
            return self._executor().submit(function, request)

    def wait(self, futures: list[Future[Path]]) -> list[Path]:
        """The written paths, in order; the first error is raised (and a broken pool is replaced)."""
        try:
            return [future.result() for future in futures]
        except BrokenProcessPool:
            log.error("a result-writer process died: the pool is restarted for the next job")
            self.reset()
            raise

    def reset(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
