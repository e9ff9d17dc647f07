"""MRKD training: one category (or a plain folder of good images) -> best.ckpt, last.ckpt, history.jsonl.

Paper/official defaults: Adam(lr 0.005, betas (0.5, 0.999)), batch 16, 256 px, 200 epochs.

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
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from mrkd.atomic import atomic_write_text
from mrkd.deps import require

torch = require("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from mrkd.train import calibrate as calibration  # noqa: E402
from mrkd.train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint  # noqa: E402
from mrkd.train.data import DataError, TrainDataset, list_categories, scan_category, scan_folder  # noqa: E402
from mrkd.train.evaluate import metrics_on_test_split, resolve_device  # noqa: E402
from mrkd.train.head import distillation_loss  # noqa: E402
from mrkd.train.model import build_model  # noqa: E402

HISTORY_FILE = "history.jsonl"
LAST, BEST = "last.ckpt", "best.ckpt"


@dataclass
class TrainConfig:
    """Training settings. Defaults are the paper's (and the official script's)."""

    epochs: int = 200
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
    mask_ratio: float = 0.2              # feature-level masking ratio
    flm: bool = True                     # feature-level masking
    eval_every: int = 10                 # epochs between test-split evaluations; 0 = never
    save_every: int = 1                  # epochs between last.ckpt writes (the final epoch always)
    holdout_fraction: float = 0.1        # good train images kept out for calibration
    min_holdout: int = 2
    threshold_quantile: float = 0.99     # share of good parts the threshold should pass
    threshold_method: str = "quantile"   # "quantile" | "tolerance" (mrkd.train.calibrate)
    threshold_confidence: float = 0.75   # for "tolerance": calibrate.TOLERANCE_CONFIDENCE
    resize_mode: str = "resize"          # "resize" | "center_crop" (official)
    eval_batch_size: int = 8
    progress: bool = True

    # Settings that may change between a run and its resumption (they do not change the result).
    RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "eval_every", "save_every", "progress",
                         "eval_batch_size", "threshold_quantile", "threshold_method",
                         "threshold_confidence")

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.epochs < 1 or self.batch_size < 1 or self.image_size < 32:
            raise ValueError(f"epochs and batch_size must be >= 1 and image_size >= 32 "
                             f"(got {self.epochs}, {self.batch_size}, {self.image_size})")
        if self.image_size % 32:
            # Strides 4/8/16 plus the bottleneck's stride 2: other sizes give student maps of another size.
            raise ValueError(f"image_size must be a multiple of 32, got {self.image_size}")
        if self.ilm_preset not in ("auto", "texture", "object"):
            raise ValueError(f"ilm_preset must be 'auto', 'texture' or 'object', got {self.ilm_preset!r}")
        if self.threshold_method not in calibration.THRESHOLD_METHODS:
            raise ValueError(f"threshold_method must be one of {calibration.THRESHOLD_METHODS}, "
                             f"got {self.threshold_method!r}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")

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
                        f"(holdout_fraction={config.holdout_fraction}); add images or set holdout_fraction=0")
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
    identity.update(backbone=backbone, teacher_weights=str(teacher_weights), category=category or "")
    return identity


def _resume_state(out_dir: Path, identity: dict) -> Optional[dict]:
    path = out_dir / LAST
    if not path.is_file():
        return None
    data = read_checkpoint(path)
    state = data.get("train_state")
    if state is None:
        raise CheckpointError(f"{path}: holds no training state; cannot resume (use --no-resume to start over)")
    differences = {k: (state["identity"].get(k), v) for k, v in identity.items() if state["identity"].get(k) != v}
    if differences:
        lines = ", ".join(f"{k}: saved {old!r} != now {new!r}" for k, (old, new) in differences.items())
        raise CheckpointError(f"{path}: was trained with other settings ({lines}); use the same settings, "
                              f"another --out folder, or --no-resume to start over")
    state["checkpoint"] = data
    return state


# ----------------------------------------------------------------------------- training

def _evaluate_now(model, test_items, config: TrainConfig, device) -> dict:
    result = metrics_on_test_split(model, test_items, batch_size=config.eval_batch_size, device=device,
                                   progress=False)
    return {key: result[key] for key in ("image_auroc", "pixel_auroc", "aupro")}


def train(data_root, category: Optional[str], out_dir, config: Optional[TrainConfig] = None,
          backbone: str = "wide_resnet50_2", teacher_weights: str = "imagenet", resume: bool = True,
          skip_unreadable: bool = False) -> dict:
    """Train one MRKD model.

    ``category``: a sub-folder of ``data_root`` in MVTec layout (evaluated on its test split every
    ``eval_every`` epochs), or None when ``data_root`` is a plain folder or glob of good images.
    Writes ``last.ckpt`` (with the training state), ``best.ckpt`` (best image AUROC, or lowest loss
    without evaluation; both calibrated on the held-out good images) and ``history.jsonl`` into
    ``out_dir``. Returns a summary dict (paths, epochs, history, calibration, last metrics, and
    ``model``: the trained model in memory, after the last epoch).
    """
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    rank, world, local_rank = _distributed()
    device = resolve_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    use_amp = config.amp and device.type == "cuda"

    if category:
        data = scan_category(data_root, category, skip_unreadable=skip_unreadable, require_test=False)
        train_paths, test_items = data.train_paths, data.test_items
    else:
        train_paths, test_items = scan_folder(data_root), []
    has_test = any(i.label == 1 for i in test_items) and any(i.label == 0 for i in test_items)
    evaluating = has_test and config.eval_every > 0
    fit_paths, holdout_paths = split_holdout(train_paths, config)

    identity = _run_identity(config, backbone, teacher_weights, data_root, category)
    state = _resume_state(out_dir, identity) if resume else None

    seed_everything(config.seed)  # the same on every rank: a random teacher and the initial student agree
    model = build_model(backbone, teacher_weights, image_size=config.image_size, mask_ratio=config.mask_ratio,
                        flm=config.flm, resize_mode=config.resize_mode).to(device)
    seed_everything(config.seed + rank)  # feature-level masks differ between ranks
    trainable = StudentPath(model)
    if world > 1:
        trainable = nn.parallel.DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=config.lr, betas=config.betas)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, history, best_value = 0, [], None
    if state is not None:
        checkpoint = state["checkpoint"]
        if checkpoint["teacher"].get("state_dict") is not None:  # a random or file teacher travels along
            model.teacher.load_state_dict(checkpoint["teacher"]["state_dict"])
        model.bottleneck.load_state_dict(checkpoint["bottleneck"])
        model.student.load_state_dict(checkpoint["student"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = int(state["epoch"]), list(state["history"])
        best_value = state.get("best_value")
        rng = state["rng"][rank] if rank < len(state["rng"]) else None
        if rng is not None:
            set_rng_state(rng)

    dataset = TrainDataset(fit_paths, config.image_size, config.resize_mode, model.config.mean, model.config.std,
                           augment=_augment(config, data_root, category), seed=config.seed,
                           progress=config.progress and rank == 0)
    sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=True, seed=config.seed) \
        if world > 1 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm
    epochs_bar = tqdm(range(start_epoch, config.epochs), desc=f"train {category or Path(str(data_root)).name}",
                      unit="epoch", initial=start_epoch, total=config.epochs,
                      disable=not config.progress or rank != 0)
    started = time.perf_counter()
    last_metrics = None
    for epoch in epochs_bar:
        epoch_seed = _epoch_seed(config.seed, epoch, rank)
        _reseed_dataset(dataset, epoch_seed)
        generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 0))
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=config.batch_size, shuffle=sampler is None, sampler=sampler,
            num_workers=config.num_workers, worker_init_fn=_seed_worker, generator=generator,
            pin_memory=device.type == "cuda")
        model.train()
        total, count = torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), device=device)
        for clean, student_input in loader:
            clean = clean.to(device, non_blocking=True)
            student_input = student_input.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                target = model.teacher_features(clean)
                source = model.teacher_features(student_input) if config.ilm else target
                loss = distillation_loss(target, trainable(source))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach().double() * clean.shape[0]
            count += clean.shape[0]
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(count)
            # BatchNorm running statistics are per process; keep rank 0's so every rank holds one model.
            for buffer in model.bottleneck.buffers():
                dist.broadcast(buffer, 0)
            for buffer in model.student.buffers():
                dist.broadcast(buffer, 0)
        row = {"epoch": epoch + 1, "loss": float(total / count.double()),
               "seconds": round(time.perf_counter() - started, 3)}
        final = epoch + 1 == config.epochs
        if rank == 0 and evaluating and ((epoch + 1) % config.eval_every == 0 or final):
            last_metrics = _evaluate_now(model, test_items, config, device)
            row.update(last_metrics)
        history.append(row)
        epochs_bar.set_postfix(loss=f"{row['loss']:.4f}",
                               **({"img_auroc": f"{row['image_auroc']:.3f}"} if "image_auroc" in row else {}))

        # Best: highest image AUROC when evaluating (epochs without an evaluation never win), else lowest loss.
        value = row.get("image_auroc") if evaluating else -row["loss"]
        improved = value is not None and (best_value is None or value > best_value)
        if improved:
            best_value = value
        all_rng = [rng_state()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, all_rng[0])
            all_rng = gathered
        if rank == 0:
            if improved:
                save_checkpoint(model, out_dir / BEST, extra={"epoch": epoch + 1, "history_row": row})
            if (epoch + 1) % config.save_every == 0 or final:
                train_state = {"identity": identity, "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                               "rng": all_rng, "history": history, "best_value": best_value,
                               "holdout": holdout_paths}
                save_checkpoint(model, out_dir / LAST, extra={"train_state": train_state})
            _write_history(out_dir, history)
        _barrier(world)
    epochs_bar.close()

    summary = {"category": category, "out_dir": str(out_dir), "epochs": config.epochs, "history": history,
               "last": str(out_dir / LAST), "best": str(out_dir / BEST), "metrics": last_metrics,
               "holdout": holdout_paths, "world_size": world, "model": model}
    if rank == 0:
        summary["calibration"] = _calibrate_checkpoints(out_dir, model, holdout_paths or fit_paths, config,
                                                        device)
    _barrier(world)
    return summary


def _calibrate_checkpoints(out_dir: Path, model, good_paths: Sequence[str], config: TrainConfig, device) -> dict:
    """Calibrate last.ckpt (the model in memory) and best.ckpt on the good images; rewrite both."""
    model.eval()
    calibration.calibrate(model, good_paths, quantile=config.threshold_quantile,
                          batch_size=config.eval_batch_size, device=device, method=config.threshold_method,
                          confidence=config.threshold_confidence)
    last = read_checkpoint(out_dir / LAST)
    save_checkpoint(model, out_dir / LAST, extra={"train_state": last["train_state"]})
    return calibration.recalibrate_checkpoint(out_dir / BEST, list(good_paths), quantile=config.threshold_quantile,
                                              method=config.threshold_method, confidence=config.threshold_confidence,
                                              batch_size=config.eval_batch_size, device=device)


def train_all(data_root, categories: Optional[Sequence[str]], out_dir, config: Optional[TrainConfig] = None,
              **kwargs) -> dict:
    """Train every category (None: all under ``data_root``) into ``out_dir/<category>/``."""
    names = list(categories) if categories else list_categories(data_root)
    return {name: train(data_root, name, Path(out_dir) / name, config, **kwargs) for name in names}
