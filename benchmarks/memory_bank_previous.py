"""The memory bank's fitting as it was before issue 24, kept as the baseline of bench_memory_bank.

Three passes over the training images (MRKD scores, patches, kNN scores), greedy coreset over up to
200,000 candidates in a 128-dimension projection with the process's threads. Only the fitting
functions are used (fit_memory_bank and what it calls); the model's head and MemoryBank come from
mrkd.train.memory_bank, so both sides build the same kind of bank. Not imported by mrkd itself.
"""

from __future__ import annotations

from mrkd.errors import SettingError

import time
from typing import List, Optional, Sequence

import torch

# Unchanged since then: shared, so the baseline differs from today's code only where the fit changed.
from mrkd.train.memory_bank import TrainingPatches, bank_size, patch_features, score_spread

SCORES = ("mrkd", "knn", "both")
SAMPLERS = ("coreset", "random")
CORESET_CANDIDATES = 200_000    # greedy selection is O(candidates × kept): bounded on big training sets
CORESET_PROJECTION = 128
DEFAULT_FRACTION = 0.05         # ELPV validation: coreset 5 % = 10 % > random 10 % (benchmarks/RESULTS.md)
DEFAULT_MAX_PATCHES = 8192      # bounds the graph's MatMul and the coreset's time on large training sets
BOTH_SCALE_WEIGHTS = (0.0, 1.0, 1.0)    # MRKD scales (strides 4, 8, 16) in the "both" map
BANK_CHUNK = 4096


def greedy_coreset(patches: torch.Tensor, keep: int, seed: int = 0,
                   projection_dim: int = CORESET_PROJECTION) -> torch.Tensor:
    """Indices of ``keep`` rows of ``patches`` chosen by greedy k-center selection: start from a seeded
    random row, then repeatedly add the row farthest (L2) from every row chosen so far. Distances are
    taken in a seeded Gaussian random projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss;
    none when the rows are that narrow already)."""
    n, channels = patches.shape
    keep = int(min(max(keep, 1), n))
    generator = torch.Generator().manual_seed(int(seed))
    points = patches.float()
    if channels > projection_dim:
        projection = torch.randn(channels, projection_dim, generator=generator) / projection_dim ** 0.5
        points = points @ projection
    points = points.contiguous()
    squared = points.pow(2).sum(1)
    chosen = torch.empty(keep, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = torch.full((n,), float("inf"))
    for index in range(1, keep + 1):
        centre = points[chosen[index - 1]]
        # |p - c|² = |p|² - 2 p·c + |c|²: one matrix-vector product per chosen row
        distance = squared - 2.0 * (points @ centre) + squared[chosen[index - 1]]
        torch.minimum(nearest, distance, out=nearest)
        if index == keep:
            break
        chosen[index] = int(torch.argmax(nearest))
    return chosen


def subsample_patches(patches: torch.Tensor, fraction: float, seed: int = 0, sampler: str = "coreset",
                      max_patches: int = 0, total: int = 0) -> torch.Tensor:
    """``fraction`` of the rows of ``patches`` (at least one, at most ``max_patches`` when that is > 0),
    by ``sampler`` (see the module's notes). ``total``: how many patches ``patches`` was sampled from
    (TrainingPatches.total), when that is more than its rows; the bank's size counts those."""
    if not 0 < fraction <= 1:
        raise SettingError(f"memory bank fraction must be in (0, 1], got {fraction}")
    if sampler not in SAMPLERS:
        raise SettingError(f"memory bank sampler {sampler!r}: expected one of {SAMPLERS}")
    if max_patches < 0:
        raise SettingError(f"memory bank max_patches must be >= 0 (0: no cap), got {max_patches}")
    keep = min(bank_size(max(total, len(patches)), fraction, max_patches), len(patches))
    order = torch.randperm(len(patches), generator=torch.Generator().manual_seed(int(seed)))
    if sampler == "random" or keep >= len(patches):
        return patches[order[:keep]].contiguous()
    candidates = patches[order[:CORESET_CANDIDATES]]
    return candidates[greedy_coreset(candidates, keep, seed)].contiguous()


def sample_limit(sampler: str, max_patches: int) -> Optional[int]:
    """How many training patches need holding in memory to choose a bank: the coreset never looks
    past CORESET_CANDIDATES; a random bank needs its own size (unknown up front without a cap)."""
    if sampler == "coreset":
        return max(CORESET_CANDIDATES, max_patches)
    return max_patches if max_patches > 0 else None


def training_patches(model, batches, limit: Optional[int] = None, seed: int = 0) -> TrainingPatches:
    """Every stride-8 patch feature of the (pre-processed) training batches, or — past ``limit`` rows —
    a uniform random sample of ``limit`` of them, kept while streaming (each row gets a seeded random
    key and the ``limit`` smallest keys stay), so memory stays bounded on large training sets. Below
    the limit the rows are all there, in order."""
    kept: List[torch.Tensor] = []
    keys = torch.empty(0)
    held, total = None, 0
    generator = torch.Generator().manual_seed(int(seed) + 7919)
    device = next(model.parameters()).device
    with torch.no_grad():
        for x in batches:
            f = patch_features(model.teacher(x.to(device)))
            rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu()
            total += len(rows)
            if limit is None:
                kept.append(rows)
                continue
            batch_keys = torch.rand(len(rows), generator=generator)
            if held is None and total <= limit:
                kept.append(rows)
                keys = torch.cat([keys, batch_keys])
                continue
            if held is None:     # first time past the limit: from here on a sample of ``limit`` rows
                held = torch.cat(kept) if kept else rows[:0]
                kept = []
            held, keys = torch.cat([held, rows]), torch.cat([keys, batch_keys])
            if len(held) > limit:
                smallest = torch.topk(keys, limit, largest=False).indices.sort().values
                held, keys = held[smallest], keys[smallest]
    if held is None:
        held = torch.cat(kept) if kept else torch.empty(0, 0)
    return TrainingPatches(held.contiguous(), total)


def build_bank(model, batches, fraction: float = DEFAULT_FRACTION, seed: int = 0, sampler: str = "coreset",
               max_patches: int = DEFAULT_MAX_PATCHES) -> torch.Tensor:
    """The memory bank: ``fraction`` of the training patches (at most ``max_patches``), by ``sampler``."""
    sample = training_patches(model, batches, sample_limit(sampler, max_patches), seed)
    return subsample_patches(sample.rows, fraction, seed, sampler, max_patches, total=sample.total)


def _image_scores(model, batches) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat([model.scores(x.to(device)).cpu() for x in batches])


def fit_memory_bank(model, paths: Sequence[str], score: str, fraction: float = DEFAULT_FRACTION, seed: int = 0,
                    batch_size: int = 16, sampler: str = "coreset", max_patches: int = DEFAULT_MAX_PATCHES) -> dict:
    """Give ``model`` its memory bank from the training images ``paths`` and set the head for ``score``.

    "knn": the map is the distance map alone. "both": MRKD's map over the std of its training-image
    scores plus the distance map over the std of its own. Returns what was set (for the report).
    """
    from mrkd.train.data import TestDataset, TestItem
    if score not in SCORES:
        raise SettingError(f"score {score!r}: expected one of {SCORES}")
    config = model.config
    items = [TestItem(str(p), 0, "good", None) for p in paths]
    dataset = TestDataset(items, config.image_size, config.resize_mode, config.mean, config.std)

    def batches():
        for image, _, _, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False):
            yield image

    was_training = model.training
    model.eval()
    head = model.head
    head.set_memory_bank(None, 0.0)
    base_weights = tuple(config.scale_weights) if any(config.scale_weights) else (1.0, 1.0, 1.0)
    if score == "both":
        base_weights = BOTH_SCALE_WEIGHTS
    head.scale_weights = base_weights
    # Timed per step for bench_memory_bank (the computation is build_bank's, split in its two parts).
    clock = time.perf_counter()
    mrkd_std = score_spread(_image_scores(model, batches())) if score == "both" else 1.0
    seconds = {"mrkd_scores": time.perf_counter() - clock}
    from mrkd.train.memory_bank import MemoryBank
    clock = time.perf_counter()
    sample = training_patches(model, batches(), sample_limit(sampler, max_patches), seed)
    seconds["patches"] = time.perf_counter() - clock
    clock = time.perf_counter()
    bank = MemoryBank(subsample_patches(sample.rows, fraction, seed, sampler, max_patches, total=sample.total)).to(
        next(model.parameters()).device)
    seconds["coreset"] = time.perf_counter() - clock
    head.set_memory_bank(bank, 1.0)
    head.scale_weights = (0.0, 0.0, 0.0)
    clock = time.perf_counter()
    knn_std = score_spread(_image_scores(model, batches())) if score == "both" else 1.0
    seconds["knn_scores"] = time.perf_counter() - clock
    if score == "mrkd":
        head.set_memory_bank(None, 0.0)
        head.scale_weights = base_weights
        knn_weight = 0.0
    elif score == "knn":
        knn_weight = 1.0
    else:
        head.scale_weights = tuple(w / mrkd_std for w in base_weights)
        knn_weight = 1.0 / knn_std
        head.set_memory_bank(bank, knn_weight)
    config.score, config.scale_weights, config.knn_weight = score, head.scale_weights, knn_weight
    config.knn_memory_fraction, config.knn_sampler = float(fraction), sampler
    model.train(was_training)
    return {"score": score, "sampler": sampler, "bank_patches": int(len(bank.bank)), "bank_mb": round(bank.memory_bytes / 2 ** 20, 2),
            "mrkd_train_score_std": mrkd_std, "knn_train_score_std": knn_std,
            "seconds": {k: round(v, 2) for k, v in seconds.items()}}
