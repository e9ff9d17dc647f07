"""The anomalib quality row (benchmarks/bench_anomalib_quality.py): the package's Lite0 ImageNet weights
mapped into timm's tf_efficientnet_lite0 give anomalib's PatchCore the same stride-8/16 features as
mrkd's teacher, and a wrong feature set is refused. anomalib lives in a virtual environment of its own
(scripts/setup_anomalib_venv.sh), which the test setup does not build: without it the smoke test is
skipped, saying how to get it."""

import importlib.util
import shutil

import numpy as np
import pytest

from mrkd.benchmarks import bench_anomalib, bench_anomalib_quality
from test_bench_anomalib import skip_peer_benchmark


def _side_module():
    """The anomalib-side script's pure key mapping (it imports anomalib only inside its functions)."""
    spec = importlib.util.spec_from_file_location("anomalib_quality_side", bench_anomalib_quality.SIDE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_keys_map_to_timm_stage_and_role():
    side = _side_module()
    # flat blocks 0 | 1 2 | 3 4 | 5 6 7 | 8 9 10 | 11..14 | 15
    assert [side.block_position(i) for i in (0, 1, 3, 5, 8, 10, 11, 15)] == \
        [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (4, 2), (5, 0), (6, 0)]
    assert side.timm_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert side.timm_key("_blocks.0._bn2.running_var") == "blocks.0.0.bn2.running_var"
    assert side.timm_key("_blocks.4._expand_conv.weight") == "blocks.2.1.conv_pw.weight"
    assert side.timm_key("_blocks.4._bn1.bias") == "blocks.2.1.bn2.bias"
    assert side.timm_key("_blocks.9._project_conv.weight") == "blocks.4.1.conv_pwl.weight"
    assert side.timm_key("_blocks.9._bn2.weight") == "blocks.4.1.bn3.weight"
    assert side.timm_key("_conv_stem.weight") == "conv_stem.weight"
    assert side.timm_key("_bn0.running_mean") == "bn1.running_mean"
    with pytest.raises(side.MappingError):
        side.block_position(16)
    with pytest.raises(side.MappingError):
        side.timm_key("_blocks.0._expand_conv.weight")    # the first stage has no expansion


@pytest.mark.slow
def test_patchcore_gets_our_features_and_a_wrong_feature_set_is_refused(tmp_path):
    if bench_anomalib.anomalib_python() is None:
        skip_peer_benchmark()
    settings = bench_anomalib_quality.quick_settings()
    result = bench_anomalib_quality.compare(settings, tmp_path / "work", log=lambda *_: None)
    check = result["feature_check"]
    assert "error" not in check and check["images"] == 2 * settings.probe_images
    assert set(check["max_abs_diff"]) == {"blocks.2", "blocks.4"}
    assert check["shapes"] == {"blocks.2": [40, settings.image_size // 8, settings.image_size // 8],
                               "blocks.4": [112, settings.image_size // 16, settings.image_size // 16]}
    assert max(check["max_abs_diff"].values()) < 1e-4
    assert min(check["max_abs_feature"].values()) > 1.0          # real activations, not zeros
    rows = result["rows"]
    assert {(r["category"], r["method"]) for r in rows} == {
        (c, m) for c in settings.categories for m in ("anomalib PatchCore (Lite0)", "mrkd --score both")}
    for row in rows:
        assert 0.0 <= row["image_auroc"] <= 1.0
        if row["method"] == "mrkd --score both":      # sklearn on our scores = bench_quality's own metric
            assert row["image_auroc"] == pytest.approx(row["bench_quality_auroc"], abs=1e-4)
    patchcore = [r for r in rows if r["method"].startswith("anomalib")]
    assert all(r["bank_patches"] == int(r["candidates"] * settings.coreset_sampling_ratio) for r in patchcore)

    # The check can fail: mrkd's stride-16 features scaled by 1.001 are refused before PatchCore runs.
    workdir = tmp_path / "work"
    (workdir / "result.json").unlink()
    for category in settings.categories:
        shutil.rmtree(workdir / category)
    probe = workdir / "probe_blocks.4.npy"
    np.save(probe, np.load(probe) * 1.001)
    side = bench_anomalib_quality.start_side(bench_anomalib.anomalib_python(), workdir)
    with pytest.raises(bench_anomalib_quality.FeatureCheckError, match="^blocks.4: timm's and mrkd's Lite0 features differ"):
        bench_anomalib_quality.finish_side(side, workdir, timeout=600)
