"""Mammo-CLIP pretraining on the archive index: the reference's multi-view contrastive objective.

Objective (``batmanlab/Mammo-CLIP``, ``src/codebase/breastclip/loss/breast_clip.py`` lines 42-125, weights
from ``src/codebase/configs/loss/breast_clip.yaml``): for the two images I1, I2 (CC and MLO of one breast) and
the two texts T1, T2 (two sections or phrasings of its report),

    L = (L_i2t + L_t2i) / 2 + 1.0 * L_i2i + 0.5 * L_t2t

where L_i2t / L_t2i are InfoNCE losses averaged over the four image-text pairs (I1,T1), (I2,T1), (I1,T2),
(I2,T2), L_i2i the symmetric InfoNCE between I1 and I2 and L_t2t between T1 and T2. Under DDP each process
scores its own rows against the embeddings of all processes, as the reference does. With gradient
accumulation the negatives are those of one micro-batch. Optimizer and schedule as the reference: AdamW
(lr 5e-5, weight decay 1e-4), linear warm-up over the first 1/15 of the steps (1 of its 15 epochs), then
cosine decay to zero (its cos^2 form is the same curve). After each step the logit scale is clamped to
[0, ln 100], as CLIP and open_clip do.

Launch with ``python -m torch.distributed.run --nproc_per_node=K -m training.pretrain INDEX OUT ...`` for
several processes (NCCL on CUDA, gloo on CPU); rank 0 alone writes the log, checkpoints and model version.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from models import ClipConfig, MammoClip, load_model, new_model, save_model_version
from models.errors import ConfigurationError
from training.batch_norm import batch_norm_momentum
from training.contrastive import group_targets
from training.datasets import Augment, BreastDataset
from training.demo import NOT_CLINICAL
from training.plots import plot_training_curve
from training.provenance import write_trained_on

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
VERSION_DIR = "model"
RESEARCH_ONLY = "Research use only: contrastive pretraining on a site archive, not validated for clinical use."
LOSS_PARTS = ("loss", "i2t", "t2i", "i2i", "t2t")
MAX_LOGIT_SCALE = math.log(100.0)  # the logit scale is clamped to [0, ln 100] after each step, as in CLIP
# Settings a resumed run may change without changing the trajectory.
RESUME_FREE = ("resume", "progress", "workers", "checkpoint_every", "keep_checkpoints")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides a pretraining run; defaults follow the reference where it has one.

    ``model`` is the architecture of a random start (ignored when starting from a checkpoint);
    ``text_encoder`` the local Hugging Face directory of the text tower (random start) or of the tokenizer
    (reference ``.tar``). ``batch_size`` is per process and micro-batch. ``batch_norm_momentum`` None means
    0.1 from a random start (see ``training.batch_norm``) and the checkpoint's own value otherwise.
    """

    model: ClipConfig = field(default_factory=ClipConfig)
    text_encoder: Path | None = None
    steps: int = 10_000
    batch_size: int = 8
    accumulation: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 1e-4
    warmup_fraction: float = 1 / 15
    i2i_weight: float = 1.0
    t2t_weight: float = 0.5
    train_text_encoder: bool = False
    group_positives: bool = False  # texts phrased from equal labels are positives of each other (False: the reference)
    batch_norm_momentum: float | None = None
    augment: bool = True
    amp: bool = True
    amp_dtype: str = "bfloat16"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    deterministic: bool = True
    seed: int = 10
    workers: int = 2
    split: str = "train"
    synthetic_data: bool = False
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


# ---------------------------------------------------------------------------------------------- objective


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the gradient over processes and keeps this rank's rows
    (an all-reduce, so any backend works)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows, ctx.rank = tensor.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def _world() -> tuple[int, int]:
    """(rank, world size) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def multiview_clip_loss(image: Tensor, image_view: Tensor, text: Tensor, text2: Tensor, scale: Tensor,
                        i2i_weight: float = 1.0, t2t_weight: float = 0.5,
                        meanings: Tensor | None = None) -> dict[str, Tensor]:
    """The reference's loss and its parts from L2-normalized embeddings (N, D) of this process. With
    ``meanings`` (N,) of the breasts' texts (``BreastDataset``: equal for texts phrased from equal labels), an
    image's positives in the image-text terms are every text of its text's meaning in the global batch, not
    only its own: two phrasings of equal labels are no false negatives of each other. The image-image and
    text-text terms keep the breast's own other view or text as the one positive."""
    rank, world = _world()
    local = {"I1": image, "I2": image_view, "T1": text, "T2": text2}
    everyone = {name: _GatherWithGrad.apply(x) if world > 1 else x for name, x in local.items()}
    own = torch.arange(len(image), device=image.device) + rank * len(image)
    shared = own if meanings is None else _meaning_targets(meanings.to(image.device), world)

    def nce(rows: str, columns: str, wanted: Tensor = own) -> Tensor:
        return F.cross_entropy(scale * local[rows] @ everyone[columns].t(), wanted)

    pairs = (("I1", "T1"), ("I2", "T1"), ("I1", "T2"), ("I2", "T2"))
    parts = {"i2t": sum(nce(i, t, shared) for i, t in pairs) / 4, "t2i": sum(nce(t, i, shared) for i, t in pairs) / 4,
             "i2i": (nce("I1", "I2") + nce("I2", "I1")) / 2, "t2t": (nce("T2", "T1") + nce("T1", "T2")) / 2}
    parts["loss"] = (parts["i2t"] + parts["t2i"]) / 2 + i2i_weight * parts["i2i"] + t2t_weight * parts["t2t"]
    return parts


def _meaning_targets(meanings: Tensor, world: int) -> Tensor:
    """(N, N * world) target probabilities: uniform over the global batch's items whose text has each local
    item's text's meaning (its own always among them)."""
    everyone = meanings
    if world > 1:
        gathered = [torch.empty_like(meanings) for _ in range(world)]
        dist.all_gather(gathered, meanings)
        everyone = torch.cat(gathered)
    return group_targets(meanings, everyone)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------------------ process group


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1) unless one is running; leave it after."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigurationError(
                f"training process {local_rank} of this machine has no GPU of its own ({visible} visible): start "
                "at most one process per GPU (torchrun --nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                "to train on the CPU")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Deterministic kernels inside the block (cuDNN, cuBLAS; a warning for ops that have none), so that a
    resumed run repeats the uninterrupted one on CUDA as it does on CPU; the previous settings after."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# -------------------------------------------------------------------------------------------- RNG states


def _rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain values (loadable with ``weights_only=True``)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------ the run


def initial_model(start_from: Path | None, config: PretrainConfig) -> MammoClip:
    """A reference ``.tar`` or model-version folder, or a random image tower (``config.model``) with the
    pretrained text tower of ``config.text_encoder`` (default: the embedded MiniLM)."""
    if start_from is None:
        return new_model(config.model, config.text_encoder)
    return load_model(start_from, text_encoder=config.text_encoder)


def _checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("step-*.pt"))


def _logged_step(line: str) -> float:
    """The step of a metrics line; infinity for a line cut short."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError):
        return math.inf


def _single_threaded_worker(_worker_id: int) -> None:
    """A loader worker augments one breast at a time: OpenCV's own thread pool would only oversubscribe."""
    import cv2

    cv2.setNumThreads(1)


class PretrainRun:
    """One pretraining run: model, data, optimizer state and position; ``run()`` trains and saves.

    Construct inside ``process_group()`` when several processes train together.
    """

    def __init__(self, index_location: str | Path, out_folder: Path, *, start_from: Path | None = None,
                 config: PretrainConfig = PretrainConfig()) -> None:
        self.config, self.out = config, Path(out_folder)
        self.index_location, self.start_from = index_location, start_from
        self.rank, self.world = _world()
        self.device = _device()
        _seed_all(config.seed)
        self.model = initial_model(start_from, config)
        self.from_scratch = start_from is None
        self.started_from = "random initialization" if start_from is None else Path(start_from).name
        self.dataset = BreastDataset(index_location, config.split, self.model.config.preprocess(),
                                     augment=Augment() if config.augment else None, seed=config.seed)
        per_epoch = len(DistributedSampler(self.dataset, self.world, self.rank)) // config.batch_size
        if per_epoch < 1:
            raise ConfigurationError(f"the {config.split} split has {len(self.dataset)} usable breasts: too "
                                     f"few for batches of {config.batch_size} on {self.world} processes")
        checkpoint = self._start_checkpoint()
        self._prepare_model(checkpoint)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        warmup = max(1, round(config.steps * config.warmup_fraction))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: warmup_cosine(step, warmup, config.steps))
        self.amp = config.amp and self.device.type == "cuda"
        self.amp_dtype = getattr(torch, config.amp_dtype)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)
        self.step = self.epoch = self.position = 0
        self._batches: Iterator[dict[str, Any]] | None = None
        torch.manual_seed(config.seed + self.rank)  # dropout masks differ between processes
        if checkpoint is not None:
            self._restore(checkpoint)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics()

    # -- setup

    def _start_checkpoint(self) -> dict[str, Any] | None:
        found = _checkpoints(self.out / CHECKPOINT_DIR)
        if not self.config.resume:
            if found or (self.out / METRICS_FILE).exists() or (self.out / VERSION_DIR).exists():
                raise ConfigurationError(f"{self.out} already holds a run: resume it (resume=True) or choose "
                                         "another folder")
            return None
        if not found:
            log.info("no checkpoint in %s: starting from the beginning", self.out)
            return None
        checkpoint = torch.load(found[-1], map_location="cpu", weights_only=True)
        saved = {k: v for k, v in checkpoint["config"].items() if k not in RESUME_FREE}
        now = {k: v for k, v in self.config.to_json().items() if k not in RESUME_FREE}
        changed = sorted(k for k in now if saved.get(k) != now[k])
        started_from = checkpoint.get("started_from", self.started_from)  # not recorded before 2026-12-01
        if started_from != self.started_from:  # the model built, its batch-norm momentum and its card would differ
            raise ConfigurationError(f"cannot resume {found[-1].name}: the run started from {started_from}, not "
                                     f"{self.started_from} (give the same --start-from)")
        if changed or checkpoint["world_size"] != self.world or checkpoint["dataset_size"] != len(self.dataset):
            raise ConfigurationError(
                f"cannot resume {found[-1].name} exactly: settings changed ({', '.join(changed) or 'none'}), "
                f"processes {checkpoint['world_size']} -> {self.world}, breasts {checkpoint['dataset_size']} -> "
                f"{len(self.dataset)}")
        log.info("resuming from %s", found[-1])
        return checkpoint

    def _prepare_model(self, checkpoint: dict[str, Any] | None) -> None:
        model = self.model
        if checkpoint is not None:
            model.load_state_dict(checkpoint["model"])
        model.requires_grad_(True)
        text = model.text_encoder
        text.requires_grad_(self.config.train_text_encoder)
        if text.text_encoder.pooler is not None:  # "eos" pooling never uses BERT's pooler
            text.text_encoder.pooler.requires_grad_(False)
        model.to(self.device)
        # channels-last convolutions train faster (training.memory_format), set before DDP lays out its buckets;
        # this run's model is its own, and save_model_version writes contiguous tensors
        model.image_encoder.to(memory_format=torch.channels_last)
        self.forward_module: torch.nn.Module = model
        if self.world > 1:
            self.forward_module = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.step, self.epoch, self.position = checkpoint["step"], checkpoint["epoch"], checkpoint["position"]
        _set_rng_state(checkpoint["rng"][self.rank])

    def _truncate_metrics(self) -> None:
        """Drop what a killed run logged after its last checkpoint (and a line it was killed writing)."""
        path = self.out / METRICS_FILE
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= self.step]
            path.write_text("".join(f"{line}\n" for line in kept))

    # -- data

    def _loader(self) -> DataLoader:
        sampler = DistributedSampler(self.dataset, self.world, self.rank, shuffle=True, seed=self.config.seed)
        sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        order = list(sampler)[self.position * self.config.batch_size:]
        return DataLoader(self.dataset, batch_size=self.config.batch_size, sampler=order, drop_last=True,
                          num_workers=self.config.workers, pin_memory=self.device.type == "cuda",
                          worker_init_fn=_single_threaded_worker if self.config.workers else None,
                          generator=torch.Generator().manual_seed(self.config.seed))

    def _next_batch(self) -> dict[str, Any]:
        while True:
            if self._batches is None:
                self._batches = iter(self._loader())
            batch = next(self._batches, None)
            if batch is not None:
                self.position += 1
                return batch
            self._batches, self.epoch, self.position = None, self.epoch + 1, 0

    # -- training

    def _losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = torch.cat([batch["image"], batch["image_view"]]).to(self.device, non_blocking=True)
        tokens = self.model.text_encoder.tokenize(batch["text"] + batch["text2"])
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp else nullcontext()
        with autocast:
            image_emb, text_emb, scale = self.forward_module(images, tokens)
        image, image_view = image_emb.float().chunk(2)
        text, text2 = text_emb.float().chunk(2)
        meanings = batch["meaning"] if self.config.group_positives else None
        return multiview_clip_loss(image, image_view, text, text2, scale.float(), self.config.i2i_weight,
                                   self.config.t2t_weight, meanings)

    def _train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        totals = torch.zeros(len(LOSS_PARTS), device=self.device)
        accumulation = self.config.accumulation
        for micro in range(accumulation):
            batch = self._next_batch()
            last = micro == accumulation - 1
            sync = nullcontext() if last or self.world == 1 else self.forward_module.no_sync()
            with sync:
                parts = self._losses(batch)
                self.scaler.scale(parts["loss"] / accumulation).backward()
            totals += torch.stack([parts[name].detach() for name in LOSS_PARTS]) / accumulation
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.world > 1:
            dist.all_reduce(totals)
            totals /= self.world
        values = dict(zip(LOSS_PARTS, totals.tolist(), strict=True))
        images = 2 * self.config.batch_size * accumulation * self.world
        return {"step": self.step + 1, "epoch": self.epoch, **values, "lr": lr,
                "logit_scale": self.model.logit_scale.exp().item(),
                "images_per_s": images / (time.perf_counter() - started)}

    def _train_mode(self) -> AbstractContextManager[None]:
        self.model.train()
        if not self.config.train_text_encoder:
            self.model.text_encoder.eval()
        momentum = self.config.batch_norm_momentum
        if momentum is None and self.from_scratch:
            momentum = 0.1
        return nullcontext() if momentum is None else batch_norm_momentum(self.model.image_encoder, momentum)

    def run(self) -> Path:
        """Train to ``config.steps`` (checkpointing every ``checkpoint_every``) and save the model version."""
        title = f"pretraining ({'synthetic, not clinical' if self.config.synthetic_data else 'archive'})"
        with deterministic_algorithms(self.config.deterministic), self._train_mode(), tqdm(
                total=self.config.steps, initial=self.step, desc=title,
                disable=not (self.config.progress and self.rank == 0)) as bar:
            while self.step < self.config.steps:
                metrics = self._train_step()
                self.step += 1
                if self.rank == 0:
                    with (self.out / METRICS_FILE).open("a") as handle:
                        handle.write(json.dumps(metrics) + "\n")
                if self.step % self.config.checkpoint_every == 0 and self.step < self.config.steps:
                    self._save_checkpoint()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}")
                bar.update()
        self.model.eval()
        version = self.out / VERSION_DIR
        if self.world > 1:
            self._average_buffers()
        if self.rank == 0:
            self._save_version(version)
        if self.world > 1:
            dist.barrier()
        return version

    def _average_buffers(self) -> None:
        """DDP copies rank 0's batch-norm statistics to all ranks before each forward, so after the last one
        each rank holds its own: end with their mean, the same on every rank."""
        for buffer in self.model.buffers():
            if buffer.is_floating_point():
                dist.all_reduce(buffer)
                buffer /= self.world

    # -- outputs (rank 0)

    def _save_checkpoint(self) -> None:
        states: list[Any] = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, _rng_state())
        else:
            states = [_rng_state()]
        if self.rank != 0:
            return
        folder = self.out / CHECKPOINT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        state = {"step": self.step, "epoch": self.epoch, "position": self.position, "world_size": self.world,
                 "dataset_size": len(self.dataset), "config": self.config.to_json(), "started_from": self.started_from,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": states}
        path = folder / f"step-{self.step:08d}.pt"
        partial = path.with_suffix(".partial")
        torch.save(state, partial)
        partial.replace(path)
        for old in _checkpoints(folder)[:-self.config.keep_checkpoints]:
            old.unlink()
        log.info("checkpoint %s", path)

    def card(self, history: list[dict[str, Any]], studies_sha256: str) -> dict[str, Any]:
        """Provenance of the trained model: counts of its data (no identifiers) and the digest of the studies
        it learned from (``training.provenance``), objective, steps."""
        config, dataset = self.config, self.dataset
        return {
            "name": "mammo-clip-pretrained", "version": f"{config.steps}-steps-seed-{config.seed}",
            "intended_use": NOT_CLINICAL if config.synthetic_data else RESEARCH_ONLY, "clinical_use": False,
            "started_from": self.started_from,
            "training_data": {"source": "synthetic phantoms" if config.synthetic_data else "archive index",
                              "split": config.split, "studies": dataset.studies, "breasts": len(dataset),
                              "images": dataset.images, "left_out": dict(dataset.left_out),
                              "studies_sha256": studies_sha256},
            "objective": {"name": "Mammo-CLIP multi-view contrastive (Ghosh et al., MICCAI 2024)",
                          "loss": "(i2t + t2i) / 2 + i2i_weight * i2i + t2t_weight * t2t",
                          "positives": "a text phrased from labels: every text of equal labels in the batch "
                          "(i2t, t2i); a report's: its own breast's only" if config.group_positives
                          else "its own text only (the reference)",
                          "i2i_weight": config.i2i_weight, "t2t_weight": config.t2t_weight,
                          "text_encoder": "trained" if config.train_text_encoder else "frozen"},
            "training": {"steps": config.steps, "batch_size": config.batch_size,
                         "accumulation": config.accumulation, "processes": self.world,
                         "learning_rate": config.learning_rate, "weight_decay": config.weight_decay,
                         "warmup_fraction": config.warmup_fraction, "augment": config.augment,
                         "amp": config.amp_dtype if self.amp else "off", "seed": config.seed},
            "final_loss": history[-1]["loss"],
        }

    def _save_version(self, version: Path) -> None:
        history = [json.loads(line) for line in (self.out / METRICS_FILE).read_text().splitlines()]
        studies = write_trained_on(version, self.index_location, (self.config.split,), self.start_from)
        save_model_version(self.model, version, card=self.card(history, studies))
        title = "Mammo-CLIP pretraining" + (" on synthetic phantoms (not clinical)" if self.config.synthetic_data
                                            else "")
        plot_training_curve([h["loss"] for h in history], version / "training_curve.png", title)


def pretrain(index_location: str | Path, out_folder: Path, *, start_from: Path | None = None,
             config: PretrainConfig = PretrainConfig()) -> Path:
    """Pretrain on the index's ``config.split``; returns the saved model-version folder (``out/model``)."""
    with process_group():
        return PretrainRun(index_location, out_folder, start_from=start_from, config=config).run()


def main(argv: list[str] | None = None) -> None:
    """Command line for ``torchrun -m training.pretrain`` (or plain ``python -m`` for one process)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", help="archive index folder or database URL")
    parser.add_argument("out", type=Path, help="run folder: metrics, checkpoints, model version")
    parser.add_argument("--start-from", type=Path, help="reference .tar or model-version folder")
    parser.add_argument("--text-encoder", type=Path, help="local Hugging Face text model directory")
    parser.add_argument("--image-encoder", default=ClipConfig.image_encoder, help="random start: architecture")
    parser.add_argument("--size", default="1520x912", help="random start: input HxW")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=PretrainConfig.batch_size)
    parser.add_argument("--accumulation", type=int, default=PretrainConfig.accumulation)
    parser.add_argument("--lr", type=float, default=PretrainConfig.learning_rate)
    parser.add_argument("--checkpoint-every", type=int, default=PretrainConfig.checkpoint_every)
    parser.add_argument("--workers", type=int, default=PretrainConfig.workers)
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--group-positives", action="store_true",
                        help="texts phrased from equal labels (a label-only archive) are positives of each other, "
                             "not false negatives (default: each text's only positive is its own breast, as the "
                             "reference trains; on the synthetic acceptance run this was no better)")
    parser.add_argument("--synthetic", action="store_true", help="the archive is synthetic phantoms")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    height, width = (int(n) for n in args.size.lower().split("x"))
    config = PretrainConfig(
        model=ClipConfig(image_encoder=args.image_encoder, input_height=height, input_width=width),
        text_encoder=args.text_encoder, steps=args.steps, batch_size=args.batch_size,
        accumulation=args.accumulation, learning_rate=args.lr, checkpoint_every=args.checkpoint_every,
        workers=args.workers, seed=args.seed, train_text_encoder=args.train_text_encoder,
        group_positives=args.group_positives, synthetic_data=args.synthetic, resume=args.resume)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(pretrain(args.index, args.out, start_from=args.start_from, config=config))


if __name__ == "__main__":
    main()
