"""A refit holds the held-out images' patches one batch at a time, not all at once.

The growth stop (the bank's radius) is a quantile of the held-out good images' patches' nearest-bank
distances, and the defect guard keeps each confirmed defect's most anomalous patches. Both took every
image's patch features first: at 512 px a ResNet-18 image has 4096 patches x 384 floats (6 MiB), so
200 held-out images held 1.2 GiB, twice over while they were joined (measured: the refit's peak RSS
2884 MiB over the loaded model's, of which the decoded squares were 153 MiB). Only the distances (and
the guard's few patches per image) are needed.

Real refit of test_refit's parent (ELPV cells, small ResNet-18 model, 64 px: 64 patches an image). The
rows each distance computation is given are observed by wrapping refit's nearest_distance (it computes
the real distances); the radius and guard are compared with brute force in float64.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_refit import exact_nearest, good_marks, one_thread, parent  # noqa: E402,F401  (module fixtures)

import mrkd.train.refit as refit  # noqa: E402

BATCH = 2


def rows_given(monkeypatch) -> list:
    """The row count of every call to refit's nearest_distance from now on (the real one computes)."""
    given, real = [], refit.nearest_distance

    def observed(rows, bank, *args, **kwargs):
        given.append(len(rows))
        return real(rows, bank, *args, **kwargs)
    monkeypatch.setattr(refit, "nearest_distance", observed)
    return given


def test_held_out_and_defect_patches_reach_the_distances_one_batch_at_a_time(parent, monkeypatch):
    """Before: one call with the 6 held-out images' 384 patches (and the defects' 2 x 64 at once)."""
    from mrkd.train.checkpoint import load_checkpoint
    model = load_checkpoint(parent / "parent.ckpt")
    bank = model.head.memory_bank.bank.detach().double()
    held = sorted(str(p) for p in (parent / "good").iterdir())
    reviewed = [str(m[1]) for m in good_marks(parent, 3)]
    defects = sorted(str(p) for p in (parent / "evidence").iterdir() if str(p) not in reviewed)[:3]
    per_image = len(refit.image_patches(model, held[:1]))
    held_rows = refit.image_patches(model, held).double()
    defect_rows = refit.image_patches(model, defects).double()
    given = rows_given(monkeypatch)
    result = refit.refit_model(model, reviewed, held, defects, radius_quantile=0.9, batch_size=BATCH)
    assert len(held) == 6 and len(defects) == 3 and per_image == 64
    # the last call is farthest-first's: only the candidates it could add go in whole (beyond the radius,
    # not kept out by the guard: brute force below), as it compares each with every other; every call
    # before it had one batch's patches at most (the reviewed images' too, since they are only filtered)
    assert max(given[:-1]) <= BATCH * per_image, given
    # the same radius and guard as from every patch at once (brute force, float64)
    exact = exact_nearest(held_rows, bank).numpy()
    assert result.radius == pytest.approx(float(np.quantile(exact, 0.9)), rel=1e-4)
    distance = exact_nearest(defect_rows, bank).reshape(3, per_image)
    top = distance.topk(refit.GUARD_TOP, dim=1).indices
    guard = torch.cat([defect_rows.reshape(3, per_image, -1)[i, top[i]] for i in range(3)])
    candidates = refit.image_patches(model, reviewed).double()
    kept_out = (torch.cdist(candidates, guard) <= refit.GUARD_KEEP * exact_nearest(guard, bank)).any(1)
    assert result.guarded_patches == int(kept_out.sum())
    beyond = exact_nearest(candidates, bank) > result.radius
    assert given[-1] == int((beyond & ~kept_out).sum()) < 3 * per_image - result.guarded_patches, given


def brute_farthest_first(candidates: torch.Tensor, bank: torch.Tensor, radius: float) -> list:
    """Greedy k-center growth in float64 with scipy's distances: the rows of ``candidates`` added, in order."""
    from scipy.spatial.distance import cdist
    points, distance = candidates.double().numpy(), cdist(candidates.double().numpy(), bank.double().numpy()).min(1)
    added = []
    while len(added) < len(points) and distance.max() > radius:
        index = int(distance.argmax())
        added.append(index)
        distance = np.minimum(distance, cdist(points, points[index:index + 1])[:, 0])
    return added


def test_mirrored_candidates_are_taken_one_batch_at_a_time_and_grow_the_bank_as_brute_force(parent, monkeypatch):
    """With --augment flips every reviewed image is offered four times: before, all those patches were held
    and given to the guard and to farthest-first at once (4 x 3 images x 64 patches in one call); now each
    batch and transform is cut to what the growth could take first, and the bank grows as a brute-force
    farthest-first over every candidate (float64, scipy) says."""
    from mrkd.train.checkpoint import load_checkpoint
    model = load_checkpoint(parent / "parent.ckpt")
    bank = model.head.memory_bank.bank.detach().clone()
    held = sorted(str(p) for p in (parent / "good").iterdir())
    reviewed = [str(m[1]) for m in good_marks(parent, 3)]
    per_image = len(refit.image_patches(model, reviewed[:1]))
    given = rows_given(monkeypatch)
    result = refit.refit_model(model, reviewed, held, radius_quantile=0.9, batch_size=BATCH, augment="flips")
    assert max(given) <= BATCH * per_image, given
    from mrkd.train.memory_bank import training_patches
    flips = [lambda x: x] + [refit.AUGMENTS[name] for name in refit.augment_names("flips")]
    squares = list(refit._batches(model, reviewed, 3))
    candidates = torch.cat([training_patches(model, [transform(x) for x in squares]).rows for transform in flips])
    assert len(candidates) == 4 * 3 * per_image
    expected = brute_farthest_first(candidates, bank, result.radius)
    assert 0 < len(expected) == result.added_patches, (len(expected), result.added_patches)
    grown = model.head.memory_bank.bank.detach()
    assert torch.allclose(grown[len(bank):].double(), candidates[expected].double(), atol=1e-5)
