"""The training speed-ups (mrkd.train.feature_cache, teachers.FastTeacher) change nothing but speed.

The reference is the plain MRKD training loop written out in this file: every step runs the
original teacher on the clean and on the patch-swapped image. ``train()`` with its feature cache and
fast teacher copy must give the same losses and weights to float tolerance. No timing here: the
speed is measured in ``mrkd bench --only train``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mrkd.train.feature_cache import CleanFeatureCache, TeacherFeatures, plan_cache
from mrkd.train.teachers import FastTeacher, build_teacher
from train_fixtures import CATEGORY, IMAGE_SIZE, tiny_data

RUN = dict(epochs=2, batch_size=4, image_size=IMAGE_SIZE, eval_every=0, seed=5, progress=False,
           holdout_fraction=0.0)


def _random_batchnorm_statistics(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so that folding them is really tested."""
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            bn.running_var.copy_(torch.rand(n, generator=generator) * 2 + 0.2)
            bn.weight.data.copy_(torch.randn(n, generator=generator) * 0.5 + 1)
            bn.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)


@pytest.mark.parametrize("backbone", ["resnet18", pytest.param("wide_resnet50_2", marks=pytest.mark.slow),
                                      "efficientnet_lite0", "efficientnet_lite2"])
def test_fast_teacher_gives_the_original_features(backbone):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher, _ = build_teacher(backbone, "random")
    _random_batchnorm_statistics(teacher)
    fast = FastTeacher(teacher)
    assert fast.folded > 0
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = teacher(x)
    got = fast(x)
    for a, b in zip(expected, got):
        assert b.is_contiguous() and a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    # The copy is separate: the model's own teacher keeps its BatchNorms and layout.
    assert any(isinstance(m, nn.BatchNorm2d) for m in teacher.modules())


class _NotFoldable(nn.Module):
    """conv1 and bn1 are named as a pair, but a ReLU sits between them: folding would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        return [self.bn1(torch.relu(self.conv1(x)))]


def test_a_wrongly_paired_batchnorm_is_refused_not_folded():
    module = _NotFoldable().eval()
    _random_batchnorm_statistics(module)
    with pytest.raises(RuntimeError, match="fold_batchnorm=False"):
        FastTeacher(module)
    FastTeacher(module, fold_batchnorm=False)   # the unfolded copy is fine


def test_cache_plan_picks_the_most_precise_copy_that_fits():
    mib = 2 ** 20
    assert plan_cache("auto", mib, 100, 200).mode == "fp32"
    half = plan_cache("auto", mib, 100, 60)
    assert half.mode == "fp16" and half.total_bytes == 50 * mib
    assert plan_cache("auto", mib, 100, 40).mode == "off"
    assert plan_cache("fp32", mib, 100, 60).mode == "off"
    assert plan_cache("fp16", mib, 100, 1000).mode == "fp16"
    assert plan_cache("off", mib, 100, 1000).mode == "off"
    with pytest.raises(ValueError, match="feature cache"):
        plan_cache("fp8", mib, 1, 1)


def _lite_model_and_dataset():
    from mrkd.train.data import TrainDataset, scan_category
    from mrkd.train.model import build_model
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", "imagenet", image_size=IMAGE_SIZE)
    paths = scan_category(tiny_data(), CATEGORY, require_test=False).train_paths[:6]
    dataset = TrainDataset(paths, IMAGE_SIZE, "resize", model.config.mean, model.config.std, progress=False)
    return model, dataset


@pytest.mark.parametrize("mode,rtol", [("fp32", 1e-4), ("fp16", 2e-3)])
def test_cached_features_are_the_teachers_features_of_each_clean_image(mode, rtol):
    model, dataset = _lite_model_and_dataset()
    cache = CleanFeatureCache.build(FastTeacher(model.teacher), dataset, mode, batch_size=4,
                                    device=torch.device("cpu"))
    assert len(cache) == len(dataset)
    order = torch.tensor([5, 0, 3])
    looked_up = cache.lookup(order)
    for position, index in enumerate(order.tolist()):
        clean, _ = dataset[index]   # the dataset's own clean tensor, one image at a time
        expected = model.teacher_features(clean[None])
        for a, b in zip(expected, looked_up):
            torch.testing.assert_close(b[position:position + 1], a, rtol=rtol, atol=rtol * float(a.abs().max()))


def test_the_off_path_runs_the_models_own_teacher_on_both_images():
    model, dataset = _lite_model_and_dataset()
    features = TeacherFeatures(model, dataset, ilm=True, cache="off", fast_teacher=False)
    assert features.dataset() is dataset and features.cache is None
    calls = []
    original = model.teacher_features
    model.teacher_features = lambda x: calls.append(x) or original(x)
    features = TeacherFeatures(model, dataset, ilm=True, cache="off", fast_teacher=False)
    clean, student = torch.stack([dataset[0][0], dataset[1][0]]), torch.stack([dataset[0][1], dataset[1][1]])
    features((clean, student))
    assert [c is clean for c in calls] == [True, False] and calls[1] is student


# --------------------------------------------------------------------------- training equivalence

def _reference_training(config, backbone, teacher_weights):
    """MRKD training as the trainer did it before the speed-ups: teacher on clean and on patched
    images every step. Seeds, data order and augmentation follow the trainer's documented protocol
    (seed, then per epoch (seed, epoch, rank 0)), so the two runs see the same batches."""
    from mrkd.train.data import TrainDataset, scan_category
    from mrkd.train.head import distillation_loss
    from mrkd.train.model import build_model
    from mrkd.train.trainer import _augment, _epoch_seed, seed_everything

    paths = scan_category(tiny_data(), CATEGORY, require_test=False).train_paths
    seed_everything(config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(backbone, teacher_weights, image_size=config.image_size, mask_ratio=config.mask_ratio,
                            flm=config.flm)
    seed_everything(config.seed)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=config.lr, betas=config.betas)
    dataset = TrainDataset(paths, config.image_size, "resize", model.config.mean, model.config.std,
                           augment=_augment(config, tiny_data(), CATEGORY), seed=config.seed, progress=False,
                           ilm_source=config.ilm_source)
    losses = []
    for epoch in range(config.epochs):
        dataset.set_epoch_seed(_epoch_seed(config.seed, epoch, 0))
        generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch, 0))
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True,
                                             generator=generator)
        model.train()
        total, count = 0.0, 0
        for clean, student_input in loader:
            target = model.teacher_features(clean)
            source = model.teacher_features(student_input) if config.ilm else target
            loss = distillation_loss(target, model.student(model.bottleneck(source)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * clean.shape[0]
            count += clean.shape[0]
        losses.append(total / count)
    return losses, model


def _trainable_state(model) -> dict:
    return {**{f"bottleneck.{k}": v for k, v in model.bottleneck.state_dict().items()},
            **{f"student.{k}": v for k, v in model.student.state_dict().items()}}


def _weights_distance(got, expected) -> float:
    """||got - expected|| / ||expected|| over every floating-point tensor of the trainable part."""
    keys = [k for k in expected if expected[k].is_floating_point()]
    diff = sum(float((got[k] - expected[k]).double().pow(2).sum()) for k in keys)
    return (diff / sum(float(expected[k].double().pow(2).sum()) for k in keys)) ** 0.5


def _train_fast(tmp_path, config, backbone, weights):
    from mrkd.train.trainer import train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return train(tiny_data(), CATEGORY, tmp_path / "run", config, backbone=backbone, teacher_weights=weights,
                     resume=False)


@pytest.mark.slow
@pytest.mark.parametrize("ilm", [True, False])
def test_feature_cache_alone_reproduces_the_plain_loop_exactly(tmp_path, ilm):
    """The cache changes which code computes the clean features, not their values: same losses and
    weights as the plain loop, bit for bit, over two epochs (same batches, masks and patch swaps)."""
    from mrkd.train.trainer import TrainConfig
    config = TrainConfig(**RUN, ilm=ilm, feature_cache="fp32", fast_teacher=False)
    reference_losses, reference = _reference_training(config, "efficientnet_lite0", "imagenet")
    summary = _train_fast(tmp_path, config, "efficientnet_lite0", "imagenet")
    assert summary["teacher_features"]["feature_cache"] == "fp32"
    assert [row["loss"] for row in summary["history"]] == reference_losses
    got, expected = _trainable_state(summary["model"]), _trainable_state(reference)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_one_step_with_the_fast_teacher_has_the_plain_steps_loss_and_gradients():
    """Before training dynamics amplify rounding: one step from the same weights, with the same
    feature masks, gives the same loss and gradients with FastTeacher as with the model's teacher.

    Inputs are Gaussian noise with a patch moved by hand: on one batch of the synthetic textures a
    single student ReLU input out of 24,576 sat within rounding of 0, and its flip moved 0.7% of the
    gradient norm (a kink, not an error: the fast features were closer to a float64 teacher's than
    the plain ones). Here the measured difference is ~5e-6 of the gradient norm."""
    from mrkd.train.head import distillation_loss
    model, _ = _lite_model_and_dataset()
    clean = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    student_input = clean.clone()
    student_input[:, :, 10:30, 20:40] = clean[:, :, 30:50, 5:25]
    fast = FastTeacher(model.teacher)
    model.train()

    def step(teacher):
        model.zero_grad()
        torch.manual_seed(7)   # the same feature-level masks for both
        loss = distillation_loss(teacher(clean), model.student(model.bottleneck(teacher(student_input))))
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.trainable_parameters()]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain_loss, plain_grads = step(model.teacher_features)
    model.load_state_dict(state)    # BatchNorm running statistics moved: put them back
    fast_loss, fast_grads = step(fast)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(plain_grads, fast_grads):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,weights,cache", [
    ("efficientnet_lite0", "imagenet", "auto"),
    ("resnet18", "random", "fp16"),
])
def test_fast_training_stays_within_rounding_divergence_of_the_plain_loop(tmp_path, backbone, weights, cache):
    """With every speed-up on, eight Adam steps end where the plain loop ends up to the divergence
    that float rounding alone causes in this training: the plain loop run with 1 instead of 2
    threads differs from itself by 3.0% (weights, relative norm) and 1e-3 (epoch loss) after the
    same steps (measured on Lite0); Adam's first steps turn rounding-level gradient differences of
    near-zero gradients into whole-step differences. Bounds here: 10% and 3e-3."""
    from mrkd.train.trainer import TrainConfig
    config = TrainConfig(**RUN, feature_cache=cache)
    reference_losses, reference = _reference_training(config, backbone, weights)
    summary = _train_fast(tmp_path, config, backbone, weights)
    assert summary["teacher_features"]["feature_cache"] == ("fp32" if cache == "auto" else cache)
    assert summary["teacher_features"]["fast_teacher"]
    assert summary["images_per_second"] > 0
    assert all(row["images_per_second"] > 0 for row in summary["history"])
    np.testing.assert_allclose([row["loss"] for row in summary["history"]], reference_losses, rtol=3e-3)
    got, expected = _trainable_state(summary["model"]), _trainable_state(reference)
    assert got.keys() == expected.keys()
    assert _weights_distance(got, expected) < 0.10


def test_mrkd_train_prints_throughput_and_a_too_small_cache_budget_falls_back(tmp_path):
    from click.testing import CliRunner

    from mrkd.cli import main
    result = CliRunner().invoke(main, ["train", str(tiny_data()), "-c", CATEGORY, "--out", str(tmp_path / "runs"),
                                       "--backbone", "resnet18", "--teacher-weights", "random", "--epochs", "1",
                                       "--batch-size", "8", "--image-size", str(IMAGE_SIZE), "--eval-every", "0",
                                       "--feature-cache-mb", "0.01"])
    assert result.exit_code == 0, result.output
    assert "images/s (feature cache off)" in result.output


def test_a_cache_too_large_for_its_budget_says_what_it_needs_however_small():
    from mrkd.train.feature_cache import plan_cache
    plan = plan_cache("auto", bytes_per_image_fp32=40_000, images=5, budget_mb=0)
    # fp16 of 5 images x 40,000 bytes = 100,000 bytes = 0.0954 MiB: said as such, not "0 MiB"
    assert plan.mode == "off" and "need 0.0954 MiB, over the 0 MiB budget" in plan.reason, plan.reason
