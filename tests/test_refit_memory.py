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
    given = []
    real = refit.nearest_distance

    def observed(rows, bank, *args, **kwargs):
        given.append(len(rows))
        return real(rows, bank, *args, **kwargs)
    monkeypatch.setattr(refit, "nearest_distance", observed)
    result = refit.refit_model(model, reviewed, held, defects, radius_quantile=0.9, batch_size=BATCH)
    assert len(held) == 6 and len(defects) == 3 and per_image == 64
    # the last call is farthest-first's: the candidates (3 reviewed images, less those the guard kept out)
    # go in whole, as it compares each with every other; every call before it had one batch's patches at most
    assert given[-1] == 3 * per_image - result.guarded_patches, given
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
