"""bench_ignore_mask's coded cells and masks: the code stays inside its area, the masks cover it with the
margin asked for, and MapGeometry.blur_margin (which the bench and the editor share) is the blur's sigmas in
the frame's pixels, rounded up, two by default."""

from __future__ import annotations

import numpy as np


def test_the_code_changes_only_its_area_and_differs_from_cell_to_cell():
    from mrkd.benchmarks.bench_ignore_mask import CELL, CODE, paint_code
    rng = np.random.default_rng(0)
    cell = np.full((CELL, CELL), 90, np.uint8)
    first, second = paint_code(cell, rng), paint_code(cell, rng)
    outside = np.ones((CELL, CELL), bool)
    outside[CODE] = False
    assert np.array_equal(first[outside], cell[outside]) and np.array_equal(second[outside], cell[outside])
    assert set(np.unique(first[CODE])) == {0, 255} and not np.array_equal(first[CODE], second[CODE])
    assert np.array_equal(cell, np.full((CELL, CELL), 90, np.uint8))       # a copy: the source untouched


def test_masks_cover_the_code_widened_by_the_margin_and_the_editors_margin_is_the_runtimes():
    import math
    from mrkd.benchmarks.bench_ignore_mask import CELL, CODE, code_mask
    from mrkd.runtime.ignore_mask import MapGeometry
    rows, cols = CODE
    tight, wide = code_mask((0, 0)), code_mask((7, 3))
    assert (tight > 0).sum() == (rows.stop - rows.start) * (cols.stop - cols.start) and tight[CODE].min() == 255
    ys, xs = np.nonzero(wide)
    assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == \
        (cols.start - 7, cols.stop + 7, rows.start - 3, rows.stop + 3)
    for size, sigma in ((256, 4.0), (128, 4.0), (224, 2.5)):
        geometry = MapGeometry(size, "resize", sigma)
        for sigmas in (1.0, 2.0, 8.0):
            side = math.ceil(sigmas * sigma * CELL / size)
            assert geometry.blur_margin((CELL, CELL), sigmas) == (side, side)
        assert geometry.blur_margin((CELL, CELL)) == geometry.blur_margin((CELL, CELL), 2.0)
        assert geometry.blur_margin((CELL, CELL), 0.0) == (0, 0)
