"""A memory bank of training patches inside the model: the kNN distance map of ``--score knn|both``.

On real images (ELPV solar cells, ``mrkd bench quality``) a nearest-neighbour patch distance on the
teacher's own features is a strong detector, and the sum of it and the MRKD map beats either alone
(numbers in benchmarks/RESULTS.md). So it lives in the model, not beside it: the bank is a buffer of
the anomaly-map head, the distance map is one more "scale" the head sums, and the exported ONNX graph
carries the bank as a constant — the runtime and TensorRT path stay one.

* Features: the teacher's stride-8 and stride-16 maps — from 256 px inputs up each averaged over its
  3 × 3 neighbourhood (``pool``, PatchCore's local aggregation: a patch is compared with its
  surroundings, not one position; below that as they are: default_pool, chosen on ELPV validation) —
  16 upsampled bilinearly to 8, concatenated.
* Bank: ``fraction`` of all training patches, FP32, chosen by ``sampler``: "coreset" (greedy k-center
  selection, as PatchCore: each new patch is the one farthest from those kept, distances taken in a
  seeded random projection to CORESET_PROJECTION = 128 dimensions) or "random" (a seeded random
  subset). By default the coreset chooses from every held patch (at most CORESET_CANDIDATES =
  CORESET_HELD = 200,000, a uniform sample past that), by _blocked_greedy: the same choices (float
  rounding aside) as one matrix-vector product over every candidate a step (_greedy_steps, the kernel before; memory-bound,
  about 100 MB read a step), but the centres are folded in every CORESET_SETTLE steps as matrix
  products and in between only the candidates that can be the farthest are kept current (700 ELPV
  cells at 256 px: 8,192 of 200,000 in seconds instead of minutes, benchmarks/RESULTS.md). The
  training patches are streamed: past CORESET_HELD (or the cap) a uniform random sample is kept, so
  building the bank holds at most ~120 MB of patches whatever the training set's size. The bank's
  memory: patches × channels × 4 bytes (Lite0 at the default cap of 8192 patches: 8192 × 152 × 4 B ≈
  4.75 MB, in the checkpoint and the graph).
* The fast option (not the default: ELPV validation, poly image AUROC −0.008 at 128 px): fit_memory_bank
  with candidates=FAST_CANDIDATES, projection_dim=FAST_PROJECTION —
  tailed_coreset chooses 90 % of the bank from a seeded random pool of 50,000 patches in 64 dimensions,
  then the last CORESET_TAIL (10 %) by greedy k-center continued over every held patch (the pool alone
  missed rare patches).
* Distance: per patch the minimum L2 distance to the bank, written as ``|q|² − 2 q·b + |b|²`` over bank
  chunks (MatMul + ReduceMin in the graph; no cdist operator needed), clamped at 0, square root.
* ``both``: each detector's map is divided by the spread (std) of its image scores on the training
  images (a seeded sample of SPREAD_IMAGES = 256 of them when there are more: ELPV validation, 128 px,
  every training cell, against all of them: image AUROC mono ±0.000, poly −0.0008), then summed; the
  threshold is calibrated on the summed map as usual. The MRKD part uses the
  stride-8 and stride-16 scales only (``BOTH_SCALE_WEIGHTS``): chosen on the ELPV validation split
  (poly +0.010 image AUROC, mono ±0.001 against all three scales), confirmed on the test split.
* Fitting (issue 24): one pass over the training images runs the teacher once per batch (input
  channels-last) for both the bank's patches and MRKD's scores, keeping the spread images' stride-8/16
  features (up to SPREAD_CACHE_BYTES); then the coreset, then the kNN scores of the spread images from
  those features (nearest_distance: blocked matrix products); a tqdm bar for each step and the seconds
  of each in the report. Before and after on the same images: ``mrkd bench --only memory_bank``
  (the previous fitting is kept in mrkd.benchmarks.memory_bank_previous).
"""

from __future__ import annotations

from mrkd.errors import SettingError

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("mrkd", "knn", "both")
SAMPLERS = ("coreset", "random")
# Coreset defaults = the settings before issue 24 (ELPV validation, poly: the fast settings lost 0.008
# AUROC), chosen now by the exact blocked kernel. The fast path is an option: candidates=FAST_CANDIDATES,
# projection_dim=FAST_PROJECTION (spreads on SPREAD_IMAGES, as the default since issue 24).
CORESET_CANDIDATES = 200_000   # the pool: greedy selection is O(candidates × kept × dims); see bench_memory_bank
CORESET_PROJECTION = 128
FAST_CANDIDATES = 50_000
FAST_PROJECTION = 64
FAST_SPREAD_IMAGES = 256       # = SPREAD_IMAGES since issue 24's validation; kept for the bench
CORESET_TAIL = 0.1             # of the bank chosen over every held patch, not just the pool
CORESET_HELD = 200_000          # patches held for the tail (~120 MB at Lite0's 152 channels)
DEFAULT_FRACTION = 0.05         # ELPV validation: coreset 5 % = 10 % > random 10 % (benchmarks/RESULTS.md)
DEFAULT_MAX_PATCHES = 8192      # bounds the graph's MatMul and the coreset's time on large training sets
# The bank's patches (and the queries) are their 3 × 3 neighbourhood's average, as PatchCore's local
# aggregation, where the stride-8 map is at least 32 patches across (inputs of 256 px and more): ELPV
# validation, --score both image AUROC at 256 px mono +0.004, poly +0.009 (3 seeds); at 128 px (16
# patches across, the window a fifth of the cell) it lost 0.016 mono, 0.009 poly, so there the default
# stays 1 (benchmarks/RESULTS.md). Checkpoints from before it have 1 (no averaging).
POOL_MIN_SIDE = 256
POOL_WIDE = 3
BOTH_SCALE_WEIGHTS = (0.0, 1.0, 1.0)    # MRKD scales (strides 4, 8, 16) in the "both" map
BANK_CHUNK = 4096
QUERY_BLOCK_BYTES = 64 * 2 ** 20  # one block of eager distances (MemoryBank.forward): 4096 query rows
                                  # × a 4096-row bank chunk in FP32
GREEDY_KERNELS = ("blocked", "addmv")
SPREAD_CACHE_BYTES = 256 * 2 ** 20  # spread images' teacher features kept for their kNN scores
CORESET_SETTLE = 256           # greedy steps between settlings in _blocked_greedy (see there)
SPREAD_IMAGES = 256            # training images the score spreads of "both" are measured on (see spread_images)


def default_pool(image_size) -> int:
    """The neighbourhood the bank averages over by default for inputs of ``image_size`` (int or (h, w))."""
    side = min(image_size) if isinstance(image_size, (tuple, list)) else int(image_size)
    return POOL_WIDE if side >= POOL_MIN_SIDE else 1


def max_pool(image_size) -> int:
    """The widest averaging window for inputs of ``image_size`` (int or (h, w)): the side of the stride-16
    feature map (its largest odd number); a wider window averages every patch over the whole map, so all
    patches look alike and the bank cannot tell a defect's position from the rest."""
    side = (min(image_size) if isinstance(image_size, (tuple, list)) else int(image_size)) // 16
    return max(1, side if side % 2 else side - 1)


def check_pool(pool) -> None:
    """The averaging window must be an odd side (centred on the patch) of at least 1."""
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1 or pool % 2 == 0:
        raise SettingError(f"memory bank pool must be an odd whole number >= 1 (1: no averaging), got {pool!r}")


def patch_features(teacher_feats: Sequence[torch.Tensor], pool: int = 1) -> torch.Tensor:
    """Stride-8 and stride-16 features, each averaged over its ``pool`` × ``pool`` neighbourhood (1: as
    they are; zero padding counted at the border, as PatchCore's aggregation), 16 upsampled to 8
    (bilinear), concatenated: N×C×h×w."""
    mid, deep = teacher_feats[1].float(), teacher_feats[2].float()
    if pool > 1:
        mid = F.avg_pool2d(mid, pool, 1, pool // 2)
        deep = F.avg_pool2d(deep, pool, 1, pool // 2)
    deep = F.interpolate(deep, size=mid.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([mid, deep], 1)


class MemoryBank(nn.Module):
    """Minimum L2 distance of each stride-8 patch to a bank of training patches, as an N×h×w map."""

    def __init__(self, bank: torch.Tensor, chunk: int = BANK_CHUNK, pool: int = 1):
        super().__init__()
        if bank.dim() != 2 or len(bank) == 0:
            raise ValueError(f"memory bank must be a non-empty patches × channels matrix, got {tuple(bank.shape)}")
        check_pool(pool)
        self.pool = int(pool)        # the neighbourhood the bank's patches were averaged over
        bank = bank.detach().float().contiguous()
        self.register_buffer("bank", bank)
        self.chunk = int(chunk)

    @property
    def memory_bytes(self) -> int:
        return self.bank.numel() * self.bank.element_size()

    def forward(self, teacher_feats: Sequence[torch.Tensor]) -> torch.Tensor:
        features = patch_features(teacher_feats, self.pool)
        h, w = features.shape[-2:]
        queries = features.flatten(2).transpose(1, 2)                     # N×hw×C
        if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            best = self._nearest_squared(queries)                         # the graph: one block
        else:
            # Eager use (calibration, eval, the spread scores): the distance temporaries are
            # queries × bank chunk floats, 1.5 GiB at batch 8 and 512 px; blocks of query rows keep them
            # within QUERY_BLOCK_BYTES whatever the batch and image size.
            rows = queries.reshape(-1, queries.shape[-1])
            step = max(1, QUERY_BLOCK_BYTES // (4 * min(self.chunk, len(self.bank))))
            best = torch.cat([self._nearest_squared(rows[start:start + step])
                              for start in range(0, len(rows), step)])
        return best.clamp_min(0.0).sqrt().reshape(-1, h, w)

    def _nearest_squared(self, queries: torch.Tensor) -> torch.Tensor:
        """Each query row's squared L2 distance to its nearest bank row (…×C -> …)."""
        query_sq = queries.pow(2).sum(-1, keepdim=True)                   # …×1
        best = None
        for start in range(0, len(self.bank), self.chunk):
            part = self.bank[start:start + self.chunk]                    # M×C (a graph constant)
            d2 = query_sq - 2.0 * torch.matmul(queries, part.t()) + part.pow(2).sum(-1)
            nearest = d2.amin(-1)
            best = nearest if best is None else torch.minimum(best, nearest)
        return best


def greedy_coreset(patches: torch.Tensor, keep: int, seed: int = 0,
                   projection_dim: int = CORESET_PROJECTION, progress: bool = False,
                   kernel: str = "blocked") -> torch.Tensor:
    """Indices of ``keep`` rows of ``patches`` chosen by greedy k-center selection: start from a seeded
    random row, then repeatedly add the row farthest (L2) from every row chosen so far. Distances are
    taken in a seeded Gaussian random projection to ``projection_dim`` dimensions (Johnson-Lindenstrauss;
    none when the rows are that narrow already). ``progress``: a tqdm bar over the rows kept.
    ``kernel``: "blocked" (_blocked_greedy) or "addmv" (_greedy_steps: one matrix-vector product over
    every row a step); both choose the same rows (float rounding aside)."""
    if kernel not in GREEDY_KERNELS:
        raise SettingError(f"coreset kernel {kernel!r}: expected one of {GREEDY_KERNELS}")
    n, channels = patches.shape
    keep = int(min(max(keep, 1), n))
    generator = torch.Generator().manual_seed(int(seed))
    points = _project(patches, projection_dim, generator)
    chosen = torch.empty(keep, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    bar = _bar(keep, "memory bank: coreset", "patch") if progress else None
    try:
        if kernel == "blocked":
            _blocked_greedy(points, points.pow(2).sum(1), chosen, bar)
        else:
            _greedy_steps(points, points.pow(2).sum(1), torch.full((n,), float("inf")), chosen, 1, bar)
    finally:
        if bar is not None:
            bar.close()
    return chosen


def _project(patches: torch.Tensor, projection_dim: int, generator: torch.Generator) -> torch.Tensor:
    points = patches.float()
    if patches.shape[1] > projection_dim:
        points = points @ random_projection(patches.shape[1], projection_dim, generator)
    return points.contiguous()


def _greedy_steps(points: torch.Tensor, squared: torch.Tensor, nearest: torch.Tensor, chosen: torch.Tensor,
                  first: int, bar=None, stop_below: Optional[float] = None, offset: int = 0) -> int:
    """Greedy k-center from ``chosen[first - 1]`` on: fold each new centre into ``nearest`` (squared
    distances of every row of ``points`` to the centres so far) and fill ``chosen[first:]``. Returns how
    many of ``chosen`` are filled: all, unless the farthest row's squared distance falls to
    ``stop_below`` or under first (then that row is not taken)."""
    keep = len(chosen)
    distance = torch.empty(len(points))
    # One thread: each step is one small matrix-vector product (candidates x dims, a few MB); a
    # second OpenMP thread made it 3.5x slower on 2 busy cores (benchmarks/RESULTS.md, issue 24).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for index in range(first, keep + 1):
            centre = chosen[index - 1]
            # |p - c|² = |p|² - 2 p·c + |c|²: one fused matrix-vector product per chosen row
            torch.addmv(squared, points, points[centre], alpha=-2.0, out=distance)
            distance += squared[centre]
            torch.minimum(nearest, distance, out=nearest)
            if bar is not None and (index % 256 == 0 or index == keep):
                bar.update(max(0, offset + index - bar.n))
            if index == keep:
                break
            farthest = int(torch.argmax(nearest))
            if stop_below is not None and float(nearest[farthest]) <= stop_below:
                return index
            chosen[index] = farthest
    finally:
        torch.set_num_threads(threads)
    return keep


def _blocked_greedy(points: torch.Tensor, squared: torch.Tensor, chosen: torch.Tensor, bar=None,
                    settle_every: int = CORESET_SETTLE, finish: bool = False) -> Optional[torch.Tensor]:
    """Greedy k-center from ``chosen[0]`` on, filling ``chosen[1:]``: the same choices as _greedy_steps
    (one centre's distances to every row a step: the rows are read once per step, 100 MB at 200,000 ×
    128 dims, so that kernel is bound by memory bandwidth), in a fraction of the memory traffic.

    * Settling: every ``settle_every`` steps the centres added since are folded into every row's
      distance at once, as blocked matrix products (bound by arithmetic, not memory), and the rows are
      sorted by that distance, farthest first.
    * Between settlings a row's distance can only fall as centres are added, so its settled distance
      bounds it from above: the farthest row is among the first rows of that order, and only those are
      kept current (one small matrix-vector product a step). Rows are taken in order until the
      farthest current distance among them is above the next row's settled distance: no row further
      down can be farther. A settling also comes early when those rows grow past a quarter of all.

    Exact: no distance is approximated, only left uncomputed where it cannot change the choice; ties
    go to the lowest row index, as torch.argmax does in _greedy_steps. tests/test_memory_bank.py checks
    it against _greedy_steps and a brute-force k-center. ``finish``: return every row's squared
    distance to the nearest of all ``chosen`` (what _greedy_steps leaves in its ``nearest``)."""
    n = len(points)
    keep = len(chosen)
    threads = torch.get_num_threads()
    # One thread throughout: on 2 shared cores a second OpenMP thread made the matrix products 2-6x
    # slower in wall time (waiting on a busy core), as it did _greedy_steps' (benchmarks/RESULTS.md).
    torch.set_num_threads(1)
    nearest = torch.full((n,), float("inf"))     # squared distance to the settled centres chosen[:settled]
    settled, ahead = 0, n                        # ahead: rows of the settled order kept current
    order = settled_sorted = rows = ahead_points = ahead_squared = current = None
    try:
        for index in range(1, keep + 1):
            if settled == 0 or index - settled >= settle_every or ahead > n // 4:
                _fold_centres(points, squared, chosen[settled:index], nearest)
                settled = index
                settled_sorted, order = torch.sort(nearest, descending=True, stable=True)
                ahead = 0
                rows = order[:0]
                ahead_points, ahead_squared, current = points[:0], squared[:0], nearest[:0]
            elif ahead:
                centre = chosen[index - 1]
                distance = torch.addmv(ahead_squared, ahead_points, points[centre], alpha=-2.0)
                distance += squared[centre]
                torch.minimum(current, distance, out=current)
            if bar is not None and (index % 256 == 0 or index == keep):
                bar.update(max(0, index - bar.n))
            if index == keep:
                break
            while True:
                if ahead:
                    farthest = current.max()
                    # strictly above the next settled distance: a row below cannot tie or pass it
                    if ahead == n or bool(farthest > settled_sorted[ahead]):
                        break
                more = order[ahead:ahead + min(n - ahead, max(256, ahead))]
                values = settled_sorted[ahead:ahead + len(more)].clone()
                if index > settled:
                    _fold_centres(points, squared, chosen[settled:index], values, more)
                rows = torch.cat([rows, more])
                ahead_points = torch.cat([ahead_points, points.index_select(0, more)])
                ahead_squared = torch.cat([ahead_squared, squared.index_select(0, more)])
                current = torch.cat([current, values])
                ahead += len(more)
            chosen[index] = rows[current == farthest].min()
        if finish:
            _fold_centres(points, squared, chosen[settled:], nearest)
    finally:
        torch.set_num_threads(threads)
    return nearest if finish else None


def _fold_centres(points: torch.Tensor, squared: torch.Tensor, centres: torch.Tensor, nearest: torch.Tensor,
                  rows: Optional[torch.Tensor] = None, block: int = 4096) -> None:
    """``nearest`` (one value per row of ``points``, or per entry of ``rows``) lowered to each row's
    squared distance to the nearest of ``centres`` (row indices) where that is nearer, in blocked matrix
    products: min over centres c of (|c|² − 2 p·c), then + |p|² (a row's constant: adding it after the
    minimum gives the same float as before it, rounding being monotonic)."""
    if len(centres) == 0:
        return
    centre_points = points[centres].t().contiguous()
    centre_squared = squared[centres]
    count = len(points) if rows is None else len(rows)
    for start in range(0, count, block):
        stop = min(count, start + block)
        if rows is None:
            part_points, part_squared = points[start:stop], squared[start:stop]
        else:
            part = rows[start:stop]
            part_points, part_squared = points.index_select(0, part), squared.index_select(0, part)
        d2 = torch.addmm(centre_squared, part_points, centre_points, alpha=-2.0).amin(1)
        d2 += part_squared
        torch.minimum(nearest[start:stop], d2, out=nearest[start:stop])


def _continue_greedy(points, squared, nearest, chosen, first: int, bar=None) -> None:
    """Greedy k-center over every row from ``chosen[first]`` on, exactly, but stepping over the rows
    farthest from the centres so far only: a row whose distance is at most the largest one left out
    can only be chosen once every row looked at is that close, and then all rows are taken again."""
    rest = len(chosen) - first
    look = min(len(points), max(8 * rest, 4096))
    if look < len(points):
        values, rows = torch.topk(nearest, look + 1)
        bound, rows = float(values[-1]), rows[:-1]
        part_nearest = nearest[rows].clone()
        part = torch.empty(rest, dtype=torch.long)
        part_points, part_squared = points[rows], squared[rows]
        part[0] = int(torch.argmax(part_nearest))
        if float(part_nearest[part[0]]) > bound:
            done = _greedy_steps(part_points, part_squared, part_nearest, part, 1, bar, stop_below=bound,
                                 offset=first)
            chosen[first:first + done] = rows[part[:done]]
            if done == rest:
                return
            # the rows left out may matter from here: their distances to the centres just added
            added = points[chosen[first:first + done]]
            d2 = squared[:, None] - 2.0 * points @ added.t() + squared[chosen[first:first + done]]
            torch.minimum(nearest, d2.amin(1), out=nearest)
            first += done
    chosen[first] = int(torch.argmax(nearest))
    _greedy_steps(points, squared, nearest, chosen, first + 1, bar)


def tailed_coreset(patches: torch.Tensor, keep: int, seed: int = 0, candidates: int = CORESET_CANDIDATES,
                   tail: float = CORESET_TAIL, projection_dim: int = CORESET_PROJECTION,
                   progress: bool = False) -> torch.Tensor:
    """Indices of ``keep`` rows of ``patches``: greedy k-center on the first ``candidates`` of them (the
    pool: pass the rows in random order) for all but ``tail`` of the bank, then greedy k-center
    continued over every row (the rows
    outside that pool get their distances to the centres so far in blocked matrix products, then each
    further step is one matrix-vector product over all rows). The pool makes the bulk cheap; the tail
    picks the rare patches the pool missed, which bound the covering radius k-center minimises."""
    n = len(patches)
    keep = int(min(max(keep, 1), n))
    if n <= candidates or tail <= 0:
        return greedy_coreset(patches[:candidates], keep, seed, projection_dim, progress)
    head = max(1, keep - int(round(tail * keep)))
    generator = torch.Generator().manual_seed(int(seed))
    points = _project(patches, projection_dim, generator)
    squared = points.pow(2).sum(1)
    chosen = torch.empty(keep, dtype=torch.long)
    chosen[0] = int(torch.randint(candidates, (1,), generator=generator))
    bar = _bar(keep, "memory bank: coreset", "patch") if progress else None
    try:
        pool_nearest = _blocked_greedy(points[:candidates], squared[:candidates], chosen[:head], bar,
                                       finish=True)
        nearest = torch.empty(n)
        nearest[:candidates] = pool_nearest
        centres = points[chosen[:head]]
        centre_sq = squared[chosen[:head]]
        for start in range(candidates, n, 2048):
            block = points[start:start + 2048]
            d2 = squared[start:start + 2048, None] - 2.0 * block @ centres.t() + centre_sq
            nearest[start:start + 2048] = d2.amin(1)
        if head < keep:
            _continue_greedy(points, squared, nearest, chosen, head, bar)
    finally:
        if bar is not None:
            bar.close()
    return chosen


def random_projection(channels: int, dims: int, generator: torch.Generator) -> torch.Tensor:
    """A ``channels`` × ``dims`` Gaussian matrix scaled by 1/sqrt(dims): for any two rows the squared
    distance after projection over the one before is distributed as chi²(dims)/dims (mean 1, std
    sqrt(2/dims): ±18 % at 64 dims, so distances within about ±9 %), which is all the coreset relies
    on; tests/test_memory_bank.py checks those quantiles."""
    return torch.randn(channels, dims, generator=generator) / dims ** 0.5


def _bar(total: int, desc: str, unit: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)


def bank_size(patches: int, fraction: float, max_patches: int = 0) -> int:
    """How many of ``patches`` the bank keeps: ``fraction`` of them, at least one, at most
    ``max_patches`` (0: no cap)."""
    keep = max(1, int(round(fraction * patches)))
    return min(keep, max_patches) if max_patches > 0 else keep


def subsample_patches(patches: torch.Tensor, fraction: float, seed: int = 0, sampler: str = "coreset",
                      max_patches: int = 0, total: int = 0, progress: bool = False,
                      candidates: int = CORESET_CANDIDATES, projection_dim: int = CORESET_PROJECTION,
                      tail: float = CORESET_TAIL) -> torch.Tensor:
    """``fraction`` of the rows of ``patches`` (at least one, at most ``max_patches`` when that is > 0),
    by ``sampler`` (see the module's notes). ``total``: how many patches ``patches`` was sampled from
    (TrainingPatches.total), when that is more than its rows; the bank's size counts those. The
    coreset chooses from a seeded random ``candidates`` of the rows, in ``projection_dim`` dimensions,
    but ``tail`` of the bank from every row held (at most CORESET_HELD): see tailed_coreset."""
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
    held = patches[order[:max(candidates, CORESET_HELD)]]
    return held[tailed_coreset(held, keep, seed, candidates, tail, projection_dim, progress)].contiguous()


@dataclass
class TrainingPatches:
    """The training patches a bank is chosen from: all of them, or a uniform random sample of ``limit``
    rows when there are more (``total`` says how many there were)."""

    rows: torch.Tensor      # patches × channels
    total: int


def sample_limit(sampler: str, max_patches: int, candidates: int = CORESET_CANDIDATES) -> Optional[int]:
    """How many training patches need holding in memory to choose a bank: the coreset never looks
    past ``candidates``; a random bank needs its own size (unknown up front without a cap)."""
    if sampler == "coreset":
        return max(candidates, CORESET_HELD, max_patches)
    return max_patches if max_patches > 0 else None


class PatchReservoir:
    """Training patch rows added batch by batch: all of them, or past ``limit`` rows a uniform random
    sample of ``limit`` (each row gets a seeded random key and the ``limit`` smallest keys stay), so
    memory stays bounded on large training sets. Below the limit the rows are all there, in order."""

    def __init__(self, limit: Optional[int] = None, seed: int = 0):
        self.limit = limit
        self.kept: List[torch.Tensor] = []
        self.keys = torch.empty(0)
        self.held: Optional[torch.Tensor] = None
        self.total = 0
        self.generator = torch.Generator().manual_seed(int(seed) + 7919)

    def add(self, rows: torch.Tensor) -> None:
        limit = self.limit
        self.total += len(rows)
        if limit is None:
            self.kept.append(rows)
            return
        batch_keys = torch.rand(len(rows), generator=self.generator)
        if self.held is None and self.total <= limit:
            self.kept.append(rows)
            self.keys = torch.cat([self.keys, batch_keys])
            return
        if self.held is None:     # first time past the limit: from here on a sample of ``limit`` rows
            self.held = torch.cat(self.kept) if self.kept else rows[:0]
            self.kept = []
        self.held, self.keys = torch.cat([self.held, rows]), torch.cat([self.keys, batch_keys])
        if len(self.held) > limit:
            smallest = torch.topk(self.keys, limit, largest=False).indices.sort().values
            self.held, self.keys = self.held[smallest], self.keys[smallest]

    def result(self) -> TrainingPatches:
        held = self.held
        if held is None:
            held = torch.cat(self.kept) if self.kept else torch.empty(0, 0)
        return TrainingPatches(held.contiguous(), self.total)


def patch_rows(teacher_feats: Sequence[torch.Tensor], pool: int = 1) -> torch.Tensor:
    """The stride-8 patch features of a batch as rows (patches × channels), on the CPU."""
    f = patch_features(teacher_feats, pool)
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu()


def training_patches(model, batches, limit: Optional[int] = None, seed: int = 0) -> TrainingPatches:
    """Every stride-8 patch feature of the (pre-processed) training batches, or — past ``limit`` rows —
    a uniform random sample of ``limit`` of them (see PatchReservoir), averaged as the model's bank is
    (``config.knn_pool``)."""
    reservoir = PatchReservoir(limit, seed)
    device = next(model.parameters()).device
    with torch.no_grad():
        for x in batches:
            reservoir.add(patch_rows(model.teacher(x.to(device)), model.config.knn_pool))
    return reservoir.result()


def build_bank(model, batches, fraction: float = DEFAULT_FRACTION, seed: int = 0, sampler: str = "coreset",
               max_patches: int = DEFAULT_MAX_PATCHES) -> torch.Tensor:
    """The memory bank: ``fraction`` of the training patches (at most ``max_patches``), by ``sampler``."""
    sample = training_patches(model, batches, sample_limit(sampler, max_patches), seed)
    return subsample_patches(sample.rows, fraction, seed, sampler, max_patches, total=sample.total)


def score_spread(scores: torch.Tensor) -> float:
    """The scale one detector's map is divided by in "both": the spread (population std) of its image
    scores on the training images. Where that is 0 or undefined (one image, identical images) the mean
    score stands in, and 1 where that is no positive number either — never 0, NaN or inf."""
    scores = scores.double()
    spread = float(scores.std(unbiased=False)) if len(scores) else float("nan")
    mean = float(scores.mean()) if len(scores) else float("nan")
    if math.isfinite(spread) and spread > 1e-6 * max(abs(mean), 1e-12):
        return spread
    if math.isfinite(mean) and mean > 0:
        return mean
    return 1.0


def spread_images(count: int, seed: int = 0, limit: int = SPREAD_IMAGES) -> List[int]:
    """Which of ``count`` training images the score spreads of "both" are measured on: all of them up
    to ``limit``, else a seeded random ``limit`` of them (in order). The spread is a normalising scale;
    256 images pin it down to a few per cent, and scoring 700 images through the student and the bank
    cost more than choosing the bank."""
    if count <= limit:
        return list(range(count))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(int(seed) + 104729))
    return sorted(order[:limit].tolist())


def _teacher(model, x: torch.Tensor) -> List[torch.Tensor]:
    """The teacher's features of a batch, the input channels-last: the same features (float rounding
    aside) in about half the CPU time of the default layout (Lite0's depthwise convolutions)."""
    return model.teacher(x.contiguous(memory_format=torch.channels_last))


def nearest_distance(bank: torch.Tensor, teacher_feats: Sequence[torch.Tensor], block: int = 4096,
                     pool: int = 1) -> torch.Tensor:
    """MemoryBank's map (each stride-8 patch's L2 distance to its nearest bank row, N×h×w) computed for
    fitting: min over bank rows b of (|b|² − 2 q·b) in blocked matrix products on one thread, then + |q|²
    (the same arithmetic as the graph's up to float rounding; tests/test_memory_bank.py checks them
    against each other). About 3x less CPU than MemoryBank.forward, which materialises every distance."""
    features = patch_features(teacher_feats, pool)
    n, channels, h, w = features.shape
    queries = features.permute(0, 2, 3, 1).reshape(-1, channels)
    bank = bank.to(queries)
    bank_t, bank_squared = bank.t().contiguous(), bank.pow(2).sum(1)
    best = torch.full((len(queries),), float("inf"), device=queries.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # see _blocked_greedy
    rows = max(1, QUERY_BLOCK_BYTES // (4 * min(block, len(bank))))    # each product within that budget
    try:
        for first in range(0, len(queries), rows):
            own = queries[first:first + rows]
            for start in range(0, len(bank), block):
                part = torch.addmm(bank_squared[start:start + block], own, bank_t[:, start:start + block],
                                   alpha=-2.0)
                torch.minimum(best[first:first + rows], part.amin(1), out=best[first:first + rows])
    finally:
        torch.set_num_threads(threads)
    best += queries.pow(2).sum(1)
    return best.clamp_min(0.0).sqrt().reshape(n, h, w)


def _loader(model, paths: Sequence[str], batch_size: int):
    from mrkd.train.data import TestDataset, TestItem
    config = model.config
    items = [TestItem(str(p), 0, "good", None) for p in paths]
    dataset = TestDataset(items, config.image_size, config.resize_mode, config.mean, config.std)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def fit_memory_bank(model, paths: Sequence[str], score: str, fraction: float = DEFAULT_FRACTION, seed: int = 0,
                    batch_size: int = 16, sampler: str = "coreset", max_patches: int = DEFAULT_MAX_PATCHES,
                    progress: bool = True, spread_limit: int = SPREAD_IMAGES,
                    candidates: int = CORESET_CANDIDATES, projection_dim: int = CORESET_PROJECTION,
                    tail: float = CORESET_TAIL, pool: Optional[int] = None) -> dict:
    """Give ``model`` its memory bank from the training images ``paths`` and set the head for ``score``.

    "knn": the map is the distance map alone. "both": MRKD's map over the std of its training-image
    scores plus the distance map over the std of its own, both measured on ``spread_images``.
    Returns what was set (for the report).

    One pass over the images runs the teacher once per batch: its patches stream into the bank's
    sample and, for the images the spreads are measured on, the student gives MRKD's scores from the
    same features. The coreset follows, then the kNN scores of those images (teacher and bank only).
    ``progress``: a tqdm bar for each of the three steps. ``spread_limit``, ``candidates``,
    ``projection_dim``: see spread_images and subsample_patches. ``pool``: the neighbourhood each
    patch is averaged over (patch_features); None: default_pool of the model's input size.
    """
    if score not in SCORES:
        raise SettingError(f"score {score!r}: expected one of {SCORES}")
    config = model.config
    pool = default_pool(config.image_size) if pool is None else pool
    check_pool(pool)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    head = model.head
    head.set_memory_bank(None, 0.0)
    base_weights = tuple(config.scale_weights) if any(config.scale_weights) else (1.0, 1.0, 1.0)
    if score == "both":
        base_weights = BOTH_SCALE_WEIGHTS
    head.scale_weights = base_weights
    spread_index = spread_images(len(paths), seed, spread_limit) if score == "both" else []
    spread_set = set(spread_index)
    reservoir = PatchReservoir(sample_limit(sampler, max_patches, candidates), seed)
    mrkd_scores: List[torch.Tensor] = []
    # The spread images' stride-8/16 teacher features, kept for their kNN scores once the bank is
    # chosen (no second teacher pass) while they fit in SPREAD_CACHE_BYTES; past that, recomputed.
    cached: List[List[torch.Tensor]] = []
    cache_bytes, cache_full = 0, False
    seconds = {"teacher": 0.0, "mrkd_scores": 0.0, "patches": 0.0}
    bar = _bar(len(paths), "memory bank: features", "img") if progress else None
    with torch.no_grad():
        start = 0
        for x, _, _, _ in _loader(model, paths, batch_size):
            clock = time.perf_counter()
            teacher_feats = _teacher(model, x.to(device))
            seconds["teacher"] += time.perf_counter() - clock
            clock = time.perf_counter()
            reservoir.add(patch_rows(teacher_feats, pool))
            seconds["patches"] += time.perf_counter() - clock
            rows = [i for i in range(len(x)) if start + i in spread_set]
            if rows:
                clock = time.perf_counter()
                own = teacher_feats if len(rows) == len(x) else [f[rows] for f in teacher_feats]
                mrkd_scores.append(head.scores(head(own, model.student(model.bottleneck(own)))).cpu())
                if not cache_full:
                    kept = [f.contiguous() for f in own[1:3]]
                    cache_bytes += sum(f.numel() * f.element_size() for f in kept)
                    cache_full = cache_bytes > SPREAD_CACHE_BYTES
                    if cache_full:
                        cached.clear()
                    else:
                        cached.append(kept)
                seconds["mrkd_scores"] += time.perf_counter() - clock
            start += len(x)
            if bar is not None:
                bar.update(len(x))
    if bar is not None:
        bar.close()
    sample = reservoir.result()
    started = time.perf_counter()
    bank = MemoryBank(subsample_patches(sample.rows, fraction, seed, sampler, max_patches, total=sample.total,
                                        progress=progress, candidates=candidates,
                                        projection_dim=projection_dim, tail=tail), pool=pool).to(device)
    seconds["coreset"] = time.perf_counter() - started
    started = time.perf_counter()
    mrkd_std = score_spread(torch.cat(mrkd_scores)) if score == "both" else 1.0
    knn_std = 1.0
    if score == "both":
        knn_scores: List[torch.Tensor] = []
        bar = _bar(len(spread_index), "memory bank: kNN scores", "img") if progress else None
        if cache_full:
            batches = ([None] + list(_teacher(model, x.to(device))[1:3])
                       for x, _, _, _ in _loader(model, [paths[i] for i in spread_index], batch_size))
        else:
            batches = ([None] + kept for kept in cached)
        with torch.no_grad():
            for feats in batches:
                knn_map = nearest_distance(bank.bank, feats, pool=pool)
                knn_scores.append(head.scores(head.blur(head.upsample_sum([knn_map]))).cpu())
                if bar is not None:
                    bar.update(len(feats[1]))
        if bar is not None:
            bar.close()
        knn_std = score_spread(torch.cat(knn_scores))
    seconds["knn_scores"] = time.perf_counter() - started
    if score == "mrkd":
        head.set_memory_bank(None, 0.0)
        head.scale_weights = base_weights
        knn_weight = 0.0
    elif score == "knn":
        head.set_memory_bank(bank, 1.0)
        head.scale_weights = (0.0, 0.0, 0.0)
        knn_weight = 1.0
    else:
        head.scale_weights = tuple(w / mrkd_std for w in base_weights)
        knn_weight = 1.0 / knn_std
        head.set_memory_bank(bank, knn_weight)
    config.score, config.scale_weights, config.knn_weight = score, head.scale_weights, knn_weight
    config.knn_memory_fraction, config.knn_sampler, config.knn_pool = float(fraction), sampler, pool
    model.train(was_training)
    return {"score": score, "sampler": sampler, "bank_patches": int(len(bank.bank)), "bank_mb": round(bank.memory_bytes / 2 ** 20, 2),
            "mrkd_train_score_std": mrkd_std, "knn_train_score_std": knn_std,
            "spread_images": len(spread_index), "pool": pool, "seconds": {k: round(v, 2) for k, v in seconds.items()}}
