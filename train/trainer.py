"""MRKD training: one category (or a plain folder of good images) -> last.ckpt, history.jsonl.

Paper/official defaults: Adam(lr 0.005, betas (0.5, 0.999)), batch 16, 256 px, 200 epochs. Ours differ in
the teacher (EfficientNet-Lite0) and the epochs (DEFAULT_EPOCHS, 10).

Model selection: none on test labels. The model a run hands on (``mrkd eval RUN_DIR``, ``mrkd export
RUN_DIR``, the demo) is the final epoch's, as in the official protocol; the periodic test-split
evaluation is written to history.jsonl for monitoring only. The steps of one run (load data, build,
restore, per-epoch loader, ``_train_step``, save, monitor, calibrate) are small functions sharing a
``TrainRun`` state.

    summary = train("data/", "grain", "runs/grain", TrainConfig(epochs=50))

Everything needed to resume sits in last.ckpt's ``train_state`` entry (tensors and primitives only,
so it loads with ``torch.load(weights_only=True)``): optimizer state, epochs done, RNG states and
the loss/metric history. A killed run started again with ``resume=True`` continues after the last
saved epoch; every epoch's random draws are seeded from (seed, epoch, rank), so on CPU a resumed run
gives the same weights as an uninterrupted one.

Multi-process: start with ``torchrun --nproc_per_node N``; DistributedDataParallel wraps the trainable
part (bottleneck + student), a DistributedSampler splits the images, rank 0 writes every file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from mrkd.errors import MrkdError, SettingError
from mrkd.atomic import atomic_write_text
from mrkd.child_signal import sigchld_kept
from mrkd.console import warn_for_all_ranks
from mrkd.deps import require

torch = require("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from mrkd.runtime import calibration as calibration_rules  # noqa: E402
from mrkd.train import calibrate as calibration  # noqa: E402
from mrkd.train.memory_bank import check_pool, max_pool  # noqa: E402
from mrkd.train.checkpoint import (TRAINED_ON, CheckpointError, read_checkpoint, save_checkpoint,  # noqa: E402
                                   plain_images_name, trained_on)
from mrkd.train.data import ILM_SOURCES, DataError, TrainDataset, list_categories, require_readable, scan_category, \
    scan_folder  # noqa: E402
from mrkd.train.evaluate import metrics_on_test_split, resolve_device  # noqa: E402
from mrkd.train.allocator import ALLOCATORS, apply_allocator  # noqa: E402
from mrkd.train.feature_cache import CACHE_MODES, TeacherFeatures  # noqa: E402
from mrkd.train.head import distillation_loss  # noqa: E402
from mrkd.train import DEFAULT_BACKBONE, DEFAULT_EPOCHS  # noqa: E402
from mrkd.train.model import build_model  # noqa: E402

HISTORY_FILE = "history.jsonl"
LAST = "last.ckpt"         # the final epoch's weights: what training hands on
MONITORED = ("image_auroc", "pixel_auroc", "aupro")


@dataclass
class TrainConfig:
    """Training settings. Defaults are the paper's (and the official script's) but ``epochs``."""

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 16
    lr: float = 0.005
    betas: Tuple[float, float] = (0.5, 0.999)
    image_size: int = 256
    seed: int = 111
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:1"
    amp: bool = False                    # mixed precision, used on CUDA only
    num_workers: int = 0
    ilm: bool = True                     # image-level masking (patch swap into the student's input)
    ilm_preset: str = "auto"             # "auto" (per category) | "texture" | "object"
    ilm_source: str = "same"             # patches from the "same" image (official) | an "other" training image
    mask_ratio: float = 0.2              # feature-level masking ratio
    flm: bool = True                     # feature-level masking
    eval_every: int = 10                 # epochs between test-split evaluations; 0 = never
    save_every: int = 1                  # epochs between last.ckpt writes (the final epoch always)
    holdout_fraction: float = 0.1        # good train images kept out for calibration
    min_holdout: int = 2
    threshold_quantile: float = calibration_rules.DEFAULT_QUANTILE     # share of good parts the threshold passes
    threshold_method: str = calibration_rules.DEFAULT_METHOD           # "quantile" | "tolerance"
    threshold_confidence: float = calibration_rules.DEFAULT_CONFIDENCE # for "tolerance" (mrkd.runtime.calibration)
    resize_mode: str = "resize"          # "resize" | "center_crop" (official)
    # "both" (default: best on real images, benchmarks/RESULTS.md) | "mrkd" | "knn": mrkd.train.memory_bank
    score: str = "both"
    knn_memory_fraction: float = 0.05    # share of training patches in the memory bank (knn/both)
    knn_sampler: str = "coreset"         # how the bank's patches are chosen: "coreset" | "random"
    knn_max_patches: int = 8192          # cap on the bank's size (0: none); see mrkd.train.memory_bank
    knn_pool: Optional[int] = None       # bank patches averaged over pool × pool; None: memory_bank.default_pool
    eval_batch_size: int = 8
    progress: bool = True
    # Speed only (mrkd.train.feature_cache): the same result to float rounding.
    feature_cache: str = "auto"          # clean images' teacher features computed once: auto|fp32|fp16|off
    feature_cache_mb: float = 2048       # memory budget of that cache
    fast_teacher: bool = True            # teacher copy with BatchNorm folded, channels-last
    allocator: str = "keep"              # "keep": glibc keeps freed memory (mrkd.train.allocator) | "system"

    # Settings that may change between a run and its resumption (they do not change the result).
    RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "eval_every", "save_every", "progress",
                         "eval_batch_size", "threshold_quantile", "threshold_method",
                         "threshold_confidence", "feature_cache", "feature_cache_mb", "fast_teacher",
                         "allocator",
                         # the memory bank is fitted after the last epoch: the epochs do not depend on it
                         "score", "knn_memory_fraction", "knn_sampler", "knn_max_patches", "knn_pool")

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.score not in ("mrkd", "knn", "both"):
            raise SettingError(f"score must be 'mrkd', 'knn' or 'both', got {self.score!r}")
        if not 0.0 < self.knn_memory_fraction <= 1.0:
            raise SettingError(f"knn_memory_fraction must be in (0, 1], got {self.knn_memory_fraction}")
        if self.knn_sampler not in ("coreset", "random"):
            raise SettingError(f"knn_sampler must be 'coreset' or 'random', got {self.knn_sampler!r}")
        if isinstance(self.knn_max_patches, bool) or not isinstance(self.knn_max_patches, int) \
                or self.knn_max_patches < 0:
            raise SettingError(f"knn_max_patches must be an integer >= 0 (0: no cap), got {self.knn_max_patches!r}")
        if self.knn_pool is not None:
            check_pool(self.knn_pool)
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 32:
            raise SettingError(f"epochs and batch_size must be >= 1 and image_size >= 32 "
                             f"(got {self.epochs}, {self.batch_size}, {self.image_size})")
        if self.image_size % 32:
            # Strides 4/8/16 plus the bottleneck's stride 2: other sizes give student maps of another size.
            raise SettingError(f"image_size must be a multiple of 32, got {self.image_size}")
        if self.knn_pool is not None and self.knn_pool > max_pool(self.image_size):
            raise SettingError(f"knn_pool {self.knn_pool} is wider than the stride-16 feature map at image_size "
                               f"{self.image_size} ({self.image_size // 16} a side): at most "
                               f"{max_pool(self.image_size)} here")
        if not (math.isfinite(self.lr) and 0.0 < self.lr <= 1.0):
            raise SettingError(f"lr must be a finite number in (0, 1], got {self.lr}")
        if not 0.0 <= self.mask_ratio < 1.0:     # a share of positions zeroed; 1 zeroes all (NaN: neither)
            raise SettingError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.eval_every < 0:
            raise SettingError(f"eval_every must be >= 0 (0: never), got {self.eval_every}")
        if not 0 <= self.seed < 2 ** 32:        # numpy's seeding refuses the rest
            raise SettingError(f"seed must be in 0..{2 ** 32 - 1}, got {self.seed}")
        if not (math.isfinite(self.feature_cache_mb) and self.feature_cache_mb >= 0):
            raise SettingError(f"feature_cache_mb must be a finite number >= 0, got {self.feature_cache_mb}")
        if self.allocator not in ALLOCATORS:
            raise SettingError(f"allocator must be one of {ALLOCATORS}, got {self.allocator!r}")
        if self.feature_cache not in CACHE_MODES:
            raise SettingError(f"feature_cache must be one of {CACHE_MODES}, got {self.feature_cache!r}")
        if self.ilm_source not in ILM_SOURCES:
            raise SettingError(f"ilm_source must be one of {ILM_SOURCES}, got {self.ilm_source!r}")
        if self.ilm_preset not in ("auto", "texture", "object"):
            raise SettingError(f"ilm_preset must be 'auto', 'texture' or 'object', got {self.ilm_preset!r}")
        if self.threshold_method not in calibration_rules.THRESHOLD_METHODS:
            raise SettingError(f"threshold_method must be one of {calibration_rules.THRESHOLD_METHODS}, "
                             f"got {self.threshold_method!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise SettingError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data


# ----------------------------------------------------------------------------- distributed helpers

def _distributed() -> Tuple[int, int, int]:
    """(rank, world size, local rank), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


class StudentPath(nn.Module):
    """The trainable part (bottleneck + student) as one module, so DDP syncs only its gradients."""

    def __init__(self, model):
        super().__init__()
        self.bottleneck, self.student = model.bottleneck, model.student

    def forward(self, teacher_feats: List[torch.Tensor]) -> List[torch.Tensor]:
        return self.student(self.bottleneck(teacher_feats))


# ----------------------------------------------------------------------------- seeds and RNG state

def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def rng_state() -> dict:
    """torch/numpy/random RNG states as tensors and lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "python": [int(py_state[0]), list(py_state[1]), py_state[2]]}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_worker(worker_id: int) -> None:
    # torch gives each worker a distinct seed derived from the loader's generator; pass it on.
    worker_seed = torch.initial_seed() % 2 ** 32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


# ----------------------------------------------------------------------------- data

def split_holdout(paths: Sequence[str], config: TrainConfig) -> Tuple[List[str], List[str]]:
    """(training paths, held-out calibration paths): a seeded random share of the good images."""
    paths = list(paths)
    if config.holdout_fraction == 0:
        return paths, []
    count = max(config.min_holdout, int(round(config.holdout_fraction * len(paths))))
    if len(paths) - count < 1:
        raise DataError(f"{len(paths)} good image(s) are too few to hold out {count} for calibration "
                        f"(--holdout {config.holdout_fraction}); add images or train with --holdout 0 "
                       f"(Python: holdout_fraction=0)")
    order = np.random.default_rng(config.seed).permutation(len(paths))
    held = sorted(paths[i] for i in order[:count])
    return [p for p in paths if p not in set(held)], held


def _augment(config: TrainConfig, data_root, category: Optional[str]):
    if not config.ilm:
        return None
    from mrkd.train.augment import PRESETS, PatchSwap, preset_for
    if config.ilm_preset != "auto":
        return PatchSwap(PRESETS[config.ilm_preset])
    return PatchSwap(preset_for(category, data_root) if category else PRESETS["texture"])


def _reseed_dataset(dataset: TrainDataset, seed: int) -> None:
    """Give the dataset's augmentation RNG a fresh per-epoch seed (epochs repeat exactly on resume)."""
    dataset.set_epoch_seed(seed)


# ----------------------------------------------------------------------------- history and state

def _write_history(out_dir: Path, history: List[dict]) -> None:
    atomic_write_text(out_dir / HISTORY_FILE, "".join(json.dumps(row) + "\n" for row in history))


def _run_identity(config: TrainConfig, backbone: str, teacher_weights: str, data_root, category) -> dict:
    identity = {k: v for k, v in config.to_dict().items() if k not in TrainConfig.RESUMABLE_CHANGES}
    # the data too: a run in the same --out on another folder resumed (or "finished") the first folder's model
    identity.update(backbone=backbone, teacher_weights=str(teacher_weights), category=category or "",
                    data_root=str(Path(str(data_root)).resolve()))
    return identity


# What runs saved before a setting existed did: patches always came from another image.
IDENTITY_BEFORE_FIELD = {"ilm_source": "other"}
# What runs saved before a field existed did not record, so it cannot be compared (the data folder).
IDENTITY_UNRECORDED = ("data_root",)


def _resume_state(out_dir: Path, identity: dict) -> Optional[dict]:
    path = out_dir / LAST
    if not path.is_file():
        return None
    data = read_checkpoint(path)
    state = data.get("train_state")
    if state is None:
        raise CheckpointError(f"{path}: holds no training state; cannot resume (choose another --out folder)")
    saved = {**IDENTITY_BEFORE_FIELD, **state["identity"]}
    unrecorded = {k for k in IDENTITY_UNRECORDED if k not in saved}     # runs saved before the field existed
    differences = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v and k not in unrecorded}
    if differences:
        lines = ", ".join(f"{k}: saved {old!r} != now {new!r}" for k, (old, new) in differences.items())
        start_over = ", or --no-resume to start over" if state.get("finished") is False else \
            " (a finished run's model is never replaced)"
        raise CheckpointError(f"{path}: was trained with other settings ({lines}); use the same settings or "
                              f"another --out folder{start_over}")
    state["checkpoint"] = data
    return state


def _keep_a_later_threshold(run: "TrainRun", state: dict) -> None:
    """A finished run started again calibrates anew on its held-out images. Where `mrkd calibrate` set
    last.ckpt's threshold after training (on the line's parts), that replaced it without a word: with no
    epoch left to train it is refused; with more epochs the weights change, so the run goes on and says
    that threshold is replaced. Runs finished before the training's own threshold was recorded cannot
    tell and go on as before."""
    if not state.get("finished") or "calibration" not in state:
        return
    held = state["checkpoint"].get("calibration") or {}
    if held == state["calibration"]:
        return
    path = run.out_dir / LAST
    later = f"{held['threshold']:g}" if "threshold" in held else "none"
    trained = state["calibration"].get("threshold")
    what = f"its threshold was set after training ({later}, by mrkd calibrate; training set " \
           f"{'none' if trained is None else format(trained, 'g')})"
    if int(state["epoch"]) >= run.config.epochs:
        raise CheckpointError(f"{path}: {what}; starting the finished run again would calibrate it anew on the "
                              f"held-out training images and replace that: use `mrkd calibrate` to set it "
                              f"again, or another --out")
    warn_for_all_ranks(f"{path}: {what}; training on to {run.config.epochs} epochs replaces it "
                       f"(the new weights are calibrated anew: run `mrkd calibrate` again afterwards)")


def _refuse_replacing_a_model(out_dir: Path) -> None:
    """--no-resume starts over on an unfinished run's snapshot only. It replaced whatever last.ckpt held
    when the first new epoch was saved: a finished, calibrated model (then lost, and half-trained if the
    new run was stopped) as well as a file that is no training snapshot at all."""
    path = out_dir / LAST
    if not path.exists():
        return
    state = read_checkpoint(path).get("train_state")
    if isinstance(state, dict) and state.get("finished") is False:
        return
    held = "a finished training run's model" if isinstance(state, dict) else "a model that is no run's snapshot"
    raise CheckpointError(f"{path}: holds {held}; --no-resume starts over on an unfinished run only and never "
                          f"replaces a model: choose another --out folder, or move it away first")


# ----------------------------------------------------------------------------- training

MONITORING_NOTE = "test split, monitoring only: never used to choose, calibrate or export weights"


def _report(message: str) -> None:
    """One line on stderr for a problem that does not stop the run (the run ends with its checkpoint)."""
    from mrkd.console import say
    say(f"mrkd train: {message}")        # above the epoch bar, not after it on its line


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


@dataclass
class TrainData:
    """What one run trains on, is calibrated on and is monitored with."""

    fit_paths: List[str]
    holdout_paths: List[str]
    test_items: list

    @property
    def can_monitor(self) -> bool:
        return any(i.label == 1 for i in self.test_items) and any(i.label == 0 for i in self.test_items)


@dataclass
class TrainRun:
    """The state one training run carries from step to step (rank 0 alone writes files)."""

    config: TrainConfig
    out_dir: Path
    category: Optional[str]
    data_root: str
    identity: dict
    data: TrainData
    rank: int
    world: int
    device: "torch.device"
    use_amp: bool
    model: nn.Module = None
    trainable: nn.Module = None          # bottleneck + student, DDP-wrapped under torchrun
    optimizer: "torch.optim.Optimizer" = None
    scaler: "torch.amp.GradScaler" = None
    epochs_done: int = 0
    history: List[dict] = dataclasses.field(default_factory=list)
    last_metrics: Optional[dict] = None
    errors: List[str] = dataclasses.field(default_factory=list)
    started: float = 0.0                 # time.perf_counter() when the epochs began
    features: Optional[TeacherFeatures] = None   # the teacher features of each batch (cache, fast copy)

    @property
    def writer(self) -> bool:
        return self.rank == 0


def _start_process(config: TrainConfig) -> Tuple[int, int, "torch.device", bool]:
    """(rank, world size, device, use AMP) for this process."""
    rank, world, local_rank = _distributed()
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return rank, world, device, config.amp and device.type == "cuda"


def _load_data(data_root, category: Optional[str], config: TrainConfig, skip_unreadable: bool,
               require_masks: bool) -> TrainData:
    if category:
        data = scan_category(data_root, category, skip_unreadable=skip_unreadable, require_test=False,
                             require_masks=require_masks)
        train_paths, test_items = data.train_paths, data.test_items
    else:
        train_paths, test_items = scan_folder(data_root, skip_unreadable=skip_unreadable), []
    fit_paths, holdout_paths = split_holdout(train_paths, config)
    if not skip_unreadable:     # else decoded already; the fitted images are read before the first step
        require_readable(holdout_paths, "held out for calibration")
    return TrainData(fit_paths, holdout_paths, test_items)


def _refuse_batches_of_one(config: TrainConfig, fit_images: int, world: int) -> None:
    """At image size 32 the bottleneck's map is 1×1, where BatchNorm cannot train on one image: a batch
    size of 1, or one image per process, was a ValueError traceback from the first step. (A last batch of
    one among more images is dropped instead: _epoch_loader.)"""
    if config.image_size // 32 > 1:
        return
    per_process = -(-fit_images // world)
    if config.batch_size == 1 or per_process == 1:
        said = "--batch-size 1" if config.batch_size == 1 else f"{fit_images} training image(s) per process"
        raise SettingError(f"--image-size 32 with {said}: the bottleneck's feature map is 1×1 there, and BatchNorm "
                           f"cannot train on a batch of one image; use a larger --image-size, or batches of 2 or "
                           f"more (--batch-size, and at least 2 training images per process)")


def _build(run: TrainRun, backbone: str, teacher_weights: str) -> None:
    config = run.config
    seed_everything(config.seed)  # the same on every rank: a random teacher and the initial student agree
    run.model = build_model(backbone, teacher_weights, image_size=config.image_size, mask_ratio=config.mask_ratio,
                            flm=config.flm, resize_mode=config.resize_mode).to(run.device)
    seed_everything(config.seed + run.rank)  # feature-level masks differ between ranks
    run.trainable = StudentPath(run.model)
    if run.world > 1:
        run.trainable = nn.parallel.DistributedDataParallel(
            run.trainable, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    run.optimizer = torch.optim.Adam(run.model.trainable_parameters(), lr=config.lr, betas=config.betas)
    run.scaler = torch.amp.GradScaler("cuda", enabled=run.use_amp)


def _restore(run: TrainRun, state: dict) -> None:
    """Continue from last.ckpt's training state: weights, optimizer, epochs done, history, RNG."""
    checkpoint = state["checkpoint"]
    if checkpoint["teacher"].get("state_dict") is not None:  # a random or file teacher travels along
        run.model.teacher.load_state_dict(checkpoint["teacher"]["state_dict"])
    run.model.bottleneck.load_state_dict(checkpoint["bottleneck"])
    run.model.student.load_state_dict(checkpoint["student"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.epochs_done, run.history = int(state["epoch"]), list(state["history"])
    rng = state["rng"][run.rank] if run.rank < len(state["rng"]) else None
    if rng is not None:
        set_rng_state(rng)


def _epoch_loader(run: TrainRun, dataset: TrainDataset, sampler, epoch: int):
    """This epoch's DataLoader; its shuffle and augmentation are seeded from (seed, epoch, rank)."""
    config = run.config
    _reseed_dataset(dataset, _epoch_seed(config.seed, epoch, run.rank))
    generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 0))
    if sampler is not None:
        sampler.set_epoch(epoch)
    images = run.features.dataset()
    count = len(sampler) if sampler is not None else len(images)
    # A last batch of one image cannot train BatchNorm where the bottleneck is 1×1 (image size 32):
    # drop it (the shuffle puts another image last next epoch).
    drop_last = count > 1 and count % config.batch_size == 1
    return torch.utils.data.DataLoader(
        images, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=config.num_workers, worker_init_fn=_seed_worker, generator=generator,
        pin_memory=run.device.type == "cuda", drop_last=drop_last)


def _train_step(run: TrainRun, batch) -> "torch.Tensor":
    """One optimizer step on one batch; returns the batch's (detached) distillation loss."""
    with torch.autocast(run.device.type, dtype=torch.float16, enabled=run.use_amp):
        target, source = run.features(batch)
        loss = distillation_loss(target, run.trainable(source))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss.detach()


class TrainingDiverged(MrkdError):
    """The loss or the weights stopped being finite (a learning rate too high, or data that overflows):
    the run stops before it saves that epoch, so no checkpoint holds NaN weights."""


def _train_epoch(run: TrainRun, loader, epoch: int) -> float:
    """Every batch of one epoch; returns the mean loss over all images (all ranks). Raises
    TrainingDiverged when a step's loss or the weights at the end are not finite."""
    run.model.train()
    total = torch.zeros((), dtype=torch.float64, device=run.device)
    count = torch.zeros((), device=run.device)
    losses = []            # per step, on the device: checked once at the end (no sync per step on a GPU)
    for batch in loader:   # (clean, student input), or (indices, student input) with the feature cache
        loss = _train_step(run, batch)
        losses.append(loss.float())
        total += loss.double() * batch[1].shape[0]
        count += batch[1].shape[0]
    if run.world > 1:
        dist.all_reduce(total)       # a non-finite loss on any rank makes every rank's total non-finite
        dist.all_reduce(count)
        _share_batchnorm_statistics(run.model)
    _check_finite(run, epoch, total, losses)
    return float(total / count.double())


def _check_finite(run: TrainRun, epoch: int, total: "torch.Tensor", losses: List["torch.Tensor"]) -> None:
    """TrainingDiverged naming the epoch (1-based) and the first step whose loss was not finite, or
    that the weights are not (the last step's update can break them with a finite loss)."""
    weights = list(run.model.bottleneck.state_dict().values()) + list(run.model.student.state_dict().values())
    weights_ok = bool(torch.stack([torch.isfinite(w).all() for w in weights if w.is_floating_point()]).all())
    if bool(torch.isfinite(total)) and weights_ok:
        return
    steps = torch.stack(losses).cpu() if losses else torch.zeros(0)
    bad = (~torch.isfinite(steps)).nonzero().flatten().tolist()
    if bad:
        what = f"the loss was {float(steps[bad[0]]):g} at step {bad[0] + 1} of {len(losses)}"
    elif not bool(torch.isfinite(total)):
        what = "the loss was not finite on another process"
    else:
        what = "the weights were no longer finite after its last step"
    saved = run.out_dir / LAST
    # an earlier epoch's last.ckpt stays: marked unfinished, it resumes with these settings (a new --lr is
    # other settings: --no-resume or another --out)
    kept = f"{saved} holds the last epoch saved before it" if epoch > 0 and saved.is_file() else \
        "nothing of this run was saved"
    raise TrainingDiverged(f"training diverged in epoch {epoch + 1}: {what} (learning rate {run.config.lr:g}); "
                           f"{kept}; train again with a lower --lr (the paper's is 0.005)")


def _share_batchnorm_statistics(model) -> None:
    # BatchNorm running statistics are per process; keep rank 0's so every rank holds one model.
    for buffer in list(model.bottleneck.buffers()) + list(model.student.buffers()):
        dist.broadcast(buffer, 0)


def _gather_rng(world: int) -> List[dict]:
    states = [rng_state()]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, states[0])
        states = gathered
    return states


def _train_state(run: TrainRun, all_rng: List[dict]) -> dict:
    return {"identity": run.identity, "epoch": run.epochs_done, "optimizer": run.optimizer.state_dict(),
            "rng": all_rng, "history": run.history, "holdout": run.data.holdout_paths,
            "epochs_planned": run.config.epochs, "finished": False}     # True once bank and threshold are set


def _save_last(run: TrainRun, all_rng: List[dict]) -> None:
    """last.ckpt (weights + everything needed to resume) and history.jsonl."""
    save_checkpoint(run.model, run.out_dir / LAST,
                    extra={"train_state": _train_state(run, all_rng), TRAINED_ON: run_trained_on(run)})
    _write_history(run.out_dir, run.history)


def run_trained_on(run: TrainRun) -> dict:
    return trained_on(run.data_root, run.category)


def _monitor(run: TrainRun, row: dict) -> None:
    """Test-split metrics into this epoch's history row, for watching the run only (see MONITORING_NOTE).

    Runs after last.ckpt is written; an error here is reported in one line and the run goes on."""
    config = run.config
    saved_rng = rng_state()   # test-time feature masking draws random numbers; training must not see them
    try:
        result = metrics_on_test_split(run.model, run.data.test_items, batch_size=config.eval_batch_size,
                                       device=run.device, progress=False)
    except Exception as exc:  # noqa: BLE001 - any failure of monitoring must not cost the run
        message = f"epoch {row['epoch']}: test-split evaluation failed ({_one_line(exc)}); training goes on"
        _report(message)
        run.errors.append(message)
        row["monitoring_error"] = _one_line(exc)
        return
    finally:
        set_rng_state(saved_rng)
    run.last_metrics = {key: result.get(key) for key in MONITORED}
    row.update(run.last_metrics, monitoring=MONITORING_NOTE)


def _run_epoch(run: TrainRun, dataset: TrainDataset, sampler, epoch: int) -> dict:
    """Train one epoch, write last.ckpt when due, then (rank 0) monitor on the test split."""
    config = run.config
    epoch_started = time.perf_counter()
    loss = _train_epoch(run, _epoch_loader(run, dataset, sampler, epoch), epoch)
    run.epochs_done = epoch + 1
    row = {"epoch": epoch + 1, "loss": loss, "seconds": round(time.perf_counter() - run.started, 3),
           "images_per_second": round(len(dataset) / (time.perf_counter() - epoch_started), 2)}
    run.history.append(row)
    final = epoch + 1 == config.epochs
    all_rng = _gather_rng(run.world)   # every rank takes part in the gather
    if run.writer:
        if (epoch + 1) % config.save_every == 0 or final:
            _save_last(run, all_rng)
        if run.data.can_monitor and config.eval_every > 0 and ((epoch + 1) % config.eval_every == 0 or final):
            _monitor(run, row)
            _write_history(run.out_dir, run.history)
    _barrier(run.world)
    return row


def train(data_root, category: Optional[str], out_dir, config: Optional[TrainConfig] = None,
          backbone: str = DEFAULT_BACKBONE, teacher_weights: str = "imagenet", resume: bool = True,
          skip_unreadable: bool = False, require_masks: bool = False, replace: bool = False) -> dict:
    """Train one MRKD model; what it hands on is the final epoch's weights, in ``last.ckpt``.

    ``category``: a sub-folder of ``data_root`` in MVTec layout, or None when ``data_root`` is a plain
    folder or glob of good images. Writes ``last.ckpt`` (written before any evaluation of its epoch;
    with the training state; after the last epoch calibrated on the held-out good images) and
    ``history.jsonl`` into ``out_dir``. Every ``eval_every`` epochs the test split is evaluated for
    monitoring only: the numbers go to history.jsonl and never choose weights (as in the official
    protocol, the model is the last epoch's). A failed evaluation or calibration is reported in one
    line and the run still ends with its final checkpoint. ``require_masks``: a defect image without
    a mask is an error (default: it counts in the image-level metrics only). ``resume=False`` starts
    over on an unfinished run's last.ckpt only; any other last.ckpt in ``out_dir`` is refused before
    anything runs, unless ``replace`` (a caller's own earlier run, as the demo's). Returns a summary dict
    (paths, epochs, history, calibration, last monitoring metrics, errors, and ``model``: the trained
    model in memory, after the last epoch).
    """
    config = config or TrainConfig()
    allocator = apply_allocator(config.allocator)   # process-wide; before the first large tensor
    rank, world, device, use_amp = _start_process(config)
    data = _load_data(data_root, category, config, skip_unreadable, require_masks)
    _refuse_batches_of_one(config, len(data.fit_paths), world)
    identity = _run_identity(config, backbone, teacher_weights, data_root, category)
    run = TrainRun(config, Path(out_dir), category, str(data_root), identity, data, rank, world, device, use_amp)
    if not resume and not replace:      # every rank, so that none goes on to wait for the others
        _refuse_replacing_a_model(run.out_dir)
    state = _resume_state(run.out_dir, identity) if resume else None
    if state is not None:
        _keep_a_later_threshold(run, state)
    _build(run, backbone, teacher_weights)
    if state is not None:
        _restore(run, state)

    dataset = TrainDataset(data.fit_paths, config.image_size, config.resize_mode, run.model.config.mean,
                           run.model.config.std, augment=_augment(config, data_root, category),
                           seed=config.seed, progress=config.progress and run.writer,
                           ilm_source=config.ilm_source)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=config.seed) \
        if world > 1 else None
    if run.writer:
        run.out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm
    epochs_bar = tqdm(range(run.epochs_done, config.epochs), desc=f"train {category or plain_images_name(data_root)}",
                      unit="epoch", initial=run.epochs_done, total=config.epochs,
                      disable=not config.progress or not run.writer)
    first_epoch = run.epochs_done
    run.started = time.perf_counter()
    run.features = TeacherFeatures(run.model, dataset, ilm=config.ilm, cache=config.feature_cache,
                                   cache_mb=config.feature_cache_mb, fast_teacher=config.fast_teacher,
                                   batch_size=config.batch_size, device=device, autocast=use_amp)
    with sigchld_kept():
        try:
            for epoch in epochs_bar:
                row = _run_epoch(run, dataset, sampler, epoch)
                epochs_bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_second']:.1f}",
                                       **({"img_auroc": f"{row['image_auroc']:.3f}"} if "image_auroc" in row else {}))
        finally:
            epochs_bar.close()     # an error line (a diverged run) starts on a line of its own

    summary = {"category": category, "out_dir": str(run.out_dir), "epochs": config.epochs, "history": run.history,
               "last": str(run.out_dir / LAST), "checkpoint": str(run.out_dir / LAST),
               "metrics": run.last_metrics, "holdout": data.holdout_paths, "world_size": world,
               "model": run.model, "errors": run.errors, "teacher_features": run.features.describe(),
               "allocator": dataclasses.asdict(allocator),
               "images_per_second": _images_per_second(run, len(dataset) * (config.epochs - first_epoch))}
    if run.writer:
        summary["calibration"] = _finish(run)
    _barrier(world)
    return summary


def _images_per_second(run: TrainRun, images: int) -> Optional[float]:
    """Training throughput of this call: ``images`` over the time from the feature cache's build to
    the last epoch's end (checkpoint writes and monitoring between epochs included)."""
    return round(images / run.history[-1]["seconds"], 2) if images and run.history else None


def _finish(run: TrainRun) -> Optional[dict]:
    """Calibrate the final model on the held-out good images (the training images with --holdout 0)
    and rewrite last.ckpt with the full history. A calibration error is reported in one line; the
    uncalibrated final checkpoint stays."""
    config = run.config
    good_paths = run.data.holdout_paths or run.data.fit_paths
    calibration_result = None
    if config.score != "mrkd":   # the memory bank comes from the fitted images, before calibration
        from mrkd.train.memory_bank import fit_memory_bank
        fit_memory_bank(run.model, run.data.fit_paths, config.score, config.knn_memory_fraction, config.seed,
                        batch_size=config.eval_batch_size, sampler=config.knn_sampler,
                        max_patches=config.knn_max_patches, progress=bool(config.progress and run.writer),
                        pool=config.knn_pool)
    try:
        run.model.eval()
        calibration_result = calibration.calibrate(
            run.model, good_paths, quantile=config.threshold_quantile, batch_size=config.eval_batch_size,
            device=run.device, method=config.threshold_method, confidence=config.threshold_confidence)
    except Exception as exc:  # noqa: BLE001 - the trained weights are saved either way
        message = f"calibration on {len(good_paths)} good image(s) failed ({_one_line(exc)}); " \
                  f"{run.out_dir / LAST} is uncalibrated (run `mrkd calibrate` on it)"
        _report(message)
        run.errors.append(message)
    last = read_checkpoint(run.out_dir / LAST)
    # the threshold this run set, so that a start again can tell one `mrkd calibrate` set later
    set_here = run.model.calibration.to_dict() if run.model.calibration is not None else {}
    train_state = dict(last["train_state"], history=run.history, finished=True, calibration=set_here)
    save_checkpoint(run.model, run.out_dir / LAST, extra={"train_state": train_state, TRAINED_ON: run_trained_on(run)})
    _write_history(run.out_dir, run.history)
    return calibration_result


def train_all(data_root, categories: Optional[Sequence[str]], out_dir, config: Optional[TrainConfig] = None,
              **kwargs) -> dict:
    """Train every category (None: all under ``data_root``) into ``out_dir/<category>/``."""
    names = list(categories) if categories else list_categories(data_root)
    return {name: train(data_root, name, Path(out_dir) / name, config, **kwargs) for name in names}
