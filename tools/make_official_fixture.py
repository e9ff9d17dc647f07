"""Regenerate tests/fixtures/official_wrn50_64px.npz from the OFFICIAL MRKD code.

    python tools/make_official_fixture.py /path/to/extracted/MRKD [--out tests/fixtures/official_wrn50_64px.npz]

The official repository is not part of mrkd; this script imports its modules (resnet.py,
de_resnet.py, test.py) from the folder given on the command line, runs its WideResNet50-2 encoder,
``bn`` and ``decoder`` with feature-level masking off (``lambda_mgd = 0``: the mask is all ones) and
its anomaly-map protocol (``test.cal_anomaly_map`` in 'a' mode, then ``gaussian_filter(sigma=4)``),
and stores inputs and results.

No weights are stored: every tensor is filled by ``fill_state_dict`` from a generator seeded with a
hash of the parameter's NAME, so tests/test_official_parity.py rebuilds exactly the same weights from
key names and shapes alone (it imports this file for that one function).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
FIXTURE = FIXTURES / "official_wrn50_64px.npz"
# The official modules' parameter names, shapes and dtypes, so the test rebuilds the weights from the
# official names (not from ours: a renamed layer in mrkd must not silently pass).
KEYS_FIXTURE = FIXTURES / "official_wrn50_keys.json"
IMAGE_SIZE = 64
BATCH = 2
INPUT_SEED = 20230601


def name_seed(key: str) -> int:
    """A 64-bit seed from the parameter name (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def name_keyed_array(key: str, shape) -> np.ndarray:
    """Deterministic float64 values for parameter ``key`` of ``shape``, scaled so activations stay sane.

    numpy's PCG64 uniform stream is used because it is stable across numpy versions. Convolutions
    get variance 1/fan_in (a 2×2 kernel is a stride-2 transposed convolution, whose fan-in is its
    input width); BatchNorm gets weight ≈ 1, small bias and mean, and a positive running variance.
    """
    rng = np.random.Generator(np.random.PCG64(name_seed(key)))
    shape = tuple(int(s) for s in shape)
    u = rng.random(shape) * 2.0 - 1.0            # uniform in [-1, 1), variance 1/3
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) == 4:
        fan_in = shape[0] if shape[2:] == (2, 2) else shape[1] * shape[2] * shape[3]
        return u * np.sqrt(3.0 / fan_in)
    if leaf == "weight":                         # BatchNorm gamma (1-D)
        return 1.0 + 0.2 * u
    if leaf == "running_var":
        return 1.0 + 0.5 * u                     # in [0.5, 1.5): positive
    if leaf == "num_batches_tracked":
        return np.zeros(shape)
    return 0.05 * u                              # biases, BN beta, running_mean


def fill_state_dict(state_dict: dict) -> dict:
    """A copy of ``state_dict`` with every tensor replaced by its name-keyed values (same dtype)."""
    import torch
    return {key: torch.from_numpy(name_keyed_array(key, value.shape)).to(value.dtype)
            for key, value in state_dict.items()}


def fixture_inputs() -> np.ndarray:
    """The fixed BATCH×3×64×64 float32 inputs (ImageNet-normalised scale)."""
    rng = np.random.Generator(np.random.PCG64(INPUT_SEED))
    return rng.standard_normal((BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


@contextlib.contextmanager
def recorded_rand(draws: list):
    """Record every ``torch.rand`` draw (the official decoder draws its FLM masks with it)."""
    import torch
    original = torch.rand

    def rand(*args, **kwargs):
        out = original(*args, **kwargs)
        draws.append(out.clone())
        return out

    torch.rand = rand
    try:
        yield
    finally:
        torch.rand = original


@contextlib.contextmanager
def cuda_is_identity():
    """The official decoder calls ``.cuda()`` on its masks; on a CPU machine make that a no-op."""
    import torch
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def run_official(repo: Path) -> dict:
    """Run the official WRN50 encoder+bn+decoder (FLM off) and map protocol on the fixed inputs."""
    import torch
    from scipy.ndimage import gaussian_filter
    sys.path.insert(0, str(repo))
    try:
        import de_resnet
        import resnet
        import test as official_test
    finally:
        sys.path.remove(str(repo))
    encoder, bn = resnet.wide_resnet50_2(pretrained=False)
    decoder = de_resnet.de_wide_resnet50_2(pretrained=False, _class_=None)
    decoder.lambda_mgd = 0.0   # FLM off: torch.where(rand > 1, 0, 1) is all ones
    for module in (encoder, bn, decoder):
        module.load_state_dict(fill_state_dict(module.state_dict()))
        module.eval()
    layout = {name: {key: [list(value.shape), str(value.dtype).replace("torch.", "")]
                     for key, value in module.state_dict().items()}
              for name, module in (("encoder", encoder), ("bn", bn), ("decoder", decoder))}
    x = torch.from_numpy(fixture_inputs())
    per_scale, final = [], []
    with torch.no_grad(), cuda_is_identity():
        teacher = encoder(x)
        student = decoder(bn(teacher))
        for i in range(x.shape[0]):   # cal_anomaly_map reads sample 0 only: call it per sample
            amap, scale_maps = official_test.cal_anomaly_map(
                [t[i:i + 1] for t in teacher], [s[i:i + 1] for s in student], IMAGE_SIZE, amap_mode="a")
            final.append(gaussian_filter(amap, sigma=4))
        # The per-scale 1 − cos maps at feature resolution, exactly as cal_anomaly_map computes them.
        for t, s in zip(teacher, student):
            per_scale.append((1 - torch.nn.functional.cosine_similarity(t, s)).numpy())
    final = np.stack(final).astype(np.float32)
    flm = run_official_masked(encoder, bn, decoder, official_test, x)
    return layout, {**flm,
        "inputs": x.numpy(),
        "per_scale_0": per_scale[0].astype(np.float32),
        "per_scale_1": per_scale[1].astype(np.float32),
        "per_scale_2": per_scale[2].astype(np.float32),
        "final_maps": final,
        "scores": final.reshape(final.shape[0], -1).max(1),
    }


def run_official_masked(encoder, bn, decoder, official_test, x, lambda_mgd: float = 0.2) -> dict:
    """The same with the official test-time FLM on, storing the masks it drew (keep = 1, zeroed = 0)."""
    import torch
    from scipy.ndimage import gaussian_filter
    decoder.lambda_mgd = lambda_mgd
    draws: list = []
    torch.manual_seed(INPUT_SEED)
    with torch.no_grad(), cuda_is_identity(), recorded_rand(draws):
        teacher = encoder(x)
        student = decoder(bn(teacher))
    decoder.lambda_mgd = 0.0
    final = []
    for i in range(x.shape[0]):
        amap, _ = official_test.cal_anomaly_map([t[i:i + 1] for t in teacher], [s[i:i + 1] for s in student],
                                                IMAGE_SIZE, amap_mode="a")
        final.append(gaussian_filter(amap, sigma=4))
    # The official rule: a position is zeroed where rand > 1 − lambda_mgd.
    masks = {f"flm_mask_{d.shape[-1]}": (d <= 1 - lambda_mgd).float().numpy() for d in draws}
    assert len(masks) == 3, "expected one mask per decoder scale"
    final = np.stack(final).astype(np.float32)
    return {**masks, "flm_ratio": np.float32(lambda_mgd), "flm_final_maps": final,
            **{f"flm_per_scale_{i}": (1 - torch.nn.functional.cosine_similarity(t, s)).numpy().astype(np.float32)
               for i, (t, s) in enumerate(zip(teacher, student))}}


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official_repo", type=Path, help="folder holding the official resnet.py, de_resnet.py, test.py")
    parser.add_argument("--out", type=Path, default=FIXTURE, help="where to write the .npz fixture")
    parser.add_argument("--keys-out", type=Path, default=KEYS_FIXTURE,
                        help="where to write the official parameter names/shapes (JSON)")
    args = parser.parse_args(argv)
    import json
    from mrkd.atomic import atomic_open, atomic_write_text
    layout, arrays = run_official(args.official_repo.resolve())
    with atomic_open(args.out, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    atomic_write_text(args.keys_out, json.dumps(layout, indent=1, sort_keys=True) + "\n")
    for path in (args.out, args.keys_out):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    print(f"official scores {arrays['scores']}")


if __name__ == "__main__":
    main()
