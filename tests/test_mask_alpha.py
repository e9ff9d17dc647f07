"""Ground-truth masks saved with transparency, through mrkd eval: a transparent pixel is background
whatever colour lies under it; a mask marked in its alpha alone is refused in one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mrkd.cli import main
from train_fixtures import CATEGORY, tiny_data, trained_run

pytestmark = pytest.mark.slow

PIXEL_METRICS = ("pixel_auroc", "aupro", "aupro_paper", "n_defect_with_regions", "n_defect_full_mask",
                 "n_defect_empty_mask")


def _masks(root: Path):
    return sorted((root / CATEGORY / "ground_truth").rglob("*.png"))


def _defect(mask_path: Path) -> np.ndarray:
    marked = np.asarray(Image.open(mask_path).convert("L")) > 0
    assert marked.any() and not marked.all()        # a real defect, so a wrong reading shows
    return marked


def _as_rgba(mask_path: Path, colour_under_clear, alpha_only: bool = False) -> None:
    """Rewrite a white-on-black mask as PIL's RGBA, transparent off the defect with ``colour_under_clear``
    there (what an editor may leave), or (``alpha_only``) black everywhere, opaque on the defect."""
    marked = _defect(mask_path)
    rgba = np.zeros(marked.shape + (4,), np.uint8)
    rgba[..., :3] = colour_under_clear
    rgba[marked, :3] = 0 if alpha_only else 255
    rgba[..., 3] = np.where(marked, 255, 0)
    Image.fromarray(rgba, "RGBA").save(mask_path)


def _eval(root: Path, out: Path):
    checkpoint = Path(trained_run()["out_dir"]) / "last.ckpt"
    result = CliRunner().invoke(main, ["eval", str(checkpoint), str(root), "-c", CATEGORY, "-o", str(out),
                                       "--device", "cpu"])
    return result


def _pixel_metrics(out: Path) -> dict:
    saved = json.loads((out / "metrics.json").read_text())
    saved = saved[CATEGORY]
    return {key: saved[key] for key in PIXEL_METRICS}


@pytest.mark.parametrize("colour_under_clear", [(255, 255, 255), (90, 0, 30)])
def test_a_defect_painted_on_a_transparent_layer_is_evaluated_as_painted(tmp_path, colour_under_clear):
    plain, clear = tmp_path / "plain", tmp_path / "clear"
    shutil.copytree(tiny_data(), plain)
    shutil.copytree(tiny_data(), clear)
    for mask_path in _masks(clear):
        _as_rgba(mask_path, colour_under_clear)
    results = {}
    for root in (plain, clear):
        result = _eval(root, tmp_path / f"eval-{root.name}")
        assert result.exit_code == 0, result.output
        results[root.name] = _pixel_metrics(tmp_path / f"eval-{root.name}")
    assert results["plain"]["n_defect_with_regions"] == 15
    assert results["clear"] == results["plain"]


def test_a_mask_marked_in_its_alpha_only_is_refused_in_one_line(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data(), root)
    ambiguous = _masks(root)[0]
    _as_rgba(ambiguous, (0, 0, 0), alpha_only=True)
    result = _eval(root, tmp_path / "eval")
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: ") and str(ambiguous) in lines[-1], result.output
    assert "alpha channel only" in lines[-1] and "Traceback" not in result.output
    assert not (tmp_path / "eval" / "metrics.json").exists()
