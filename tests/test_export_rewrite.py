"""ConvTranspose -> 1×1 Conv + DepthToSpace: checked against PyTorch's own ConvTranspose2d/BatchNorm2d."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mrkd.export.rewrite import convtranspose_as_conv_depth_to_space
from export_fixtures import run_onnx


def _to_onnx(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), (x,), buffer, input_names=["input"], output_names=["out"], opset_version=17,
                      dynamo=False, do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    return onnx.load_from_string(buffer.getvalue())


def _randomise_bn(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bn.weight.data = torch.rand(bn.num_features, generator=g) + 0.5
    bn.bias.data = torch.randn(bn.num_features, generator=g)
    bn.running_mean = torch.randn(bn.num_features, generator=g)
    bn.running_var = torch.rand(bn.num_features, generator=g) + 0.1


@pytest.mark.parametrize("block, cin, cout, bias, with_bn", [(2, 8, 6, False, True), (2, 5, 3, True, False),
                                                            (3, 4, 7, True, True)])
def test_rewrite_matches_pytorch(tmp_path, block, cin, cout, bias, with_bn):
    torch.manual_seed(block * 100 + cin)
    deconv = nn.ConvTranspose2d(cin, cout, block, stride=block, bias=bias)
    layers = [deconv]
    if with_bn:
        bn = nn.BatchNorm2d(cout)
        _randomise_bn(bn, cin)
        layers.append(bn)
    layers.append(nn.ReLU())
    module = nn.Sequential(*layers).eval()
    x = torch.randn(2, cin, 5, 7)
    proto = _to_onnx(module, x)
    assert convtranspose_as_conv_depth_to_space(proto) == 1
    ops = [n.op_type for n in proto.graph.node]
    assert "ConvTranspose" not in ops and "DepthToSpace" in ops
    assert "BatchNormalization" not in ops     # folded into the 1×1 Conv (or there was none)
    onnx.checker.check_model(proto)
    path = tmp_path / "rewritten.onnx"
    onnx.save(proto, str(path))
    got = run_onnx(path, x.numpy())["out"]
    with torch.no_grad():
        expected = module(x).numpy()
    assert got.shape == expected.shape == (2, cout, 5 * block, 7 * block)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    # No orphaned weights: the ConvTranspose's and BatchNorm's parameters left with their nodes.
    used = {name for node in proto.graph.node for name in node.input}
    assert all(init.name in used for init in proto.graph.initializer)


@pytest.mark.parametrize("deconv", [nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1),   # kernel != stride
                                    nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),     # grouped
                                    nn.ConvTranspose2d(4, 4, 2, stride=2, dilation=2)])              # dilated
def test_rewrite_leaves_other_convtransposes_alone(deconv):
    proto = _to_onnx(deconv, torch.randn(1, 4, 6, 6))
    before = proto.SerializeToString()
    assert convtranspose_as_conv_depth_to_space(proto) == 0
    assert proto.SerializeToString() == before


def test_rewrite_keeps_a_batchnorm_that_others_read():
    """A BN whose input is also a graph output (or read twice) is not folded: the raw ConvTranspose
    output must survive for its other readers."""
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.deconv = nn.ConvTranspose2d(3, 2, 2, stride=2)
            self.bn = nn.BatchNorm2d(2)
            _randomise_bn(self.bn, 7)

        def forward(self, x):
            y = self.deconv(x)
            return self.bn(y) + y

    module = TwoReaders().eval()
    x = torch.randn(1, 3, 4, 4)
    proto = _to_onnx(module, x)
    assert convtranspose_as_conv_depth_to_space(proto) == 1
    assert "BatchNormalization" in [n.op_type for n in proto.graph.node]
    from mrkd.runtime.backends.onnxruntime_backend import ort_session
    got = ort_session(proto.SerializeToString(), ["cpu"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), atol=1e-5, rtol=1e-5)
