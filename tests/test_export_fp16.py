"""FP16 export: FP16 backbone, explicit Cast, FP32 head; fidelity on a CPU half backend; overflow guard."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mrkd.export import ExportOptions, export_onnx, fp16_fidelity_report, fp16_options
from mrkd.export.int8 import QUANTISED_SCOPES
from mrkd.train.head import cosine_distance
from export_fixtures import small_model

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_model()
    path = tmp_path_factory.mktemp("fp16") / "model_fp16.onnx"
    return model, export_onnx(model, path, fp16_options(ExportOptions()), simplify="never")


def _tensor_types(proto) -> dict:
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    return types


def test_graph_is_fp16_backbone_with_fp32_head(exported):
    _, result = exported
    proto = onnx.load(str(result.path))
    types = _tensor_types(proto)
    backbone_convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith(QUANTISED_SCOPES)]
    assert backbone_convs and all(types[n.input[1]] == FLOAT16 for n in backbone_convs)
    assert all(types[n.output[0]] == FLOAT16 for n in backbone_convs)
    # Three teacher + three student features are Cast to FP32 explicitly.
    to_fp32 = [n for n in proto.graph.node if n.op_type == "Cast"
               and next(a.i for a in n.attribute if a.name == "to") == FLOAT and types.get(n.input[0]) == FLOAT16]
    assert len(to_fp32) >= 6
    head_ops = {"ReduceSum", "Sqrt", "Div", "Resize", "ReduceMax", "Mul", "Pow"}
    head_nodes = [n for n in proto.graph.node if n.op_type in head_ops and not n.name.startswith(QUANTISED_SCOPES)]
    assert head_nodes
    for node in head_nodes:
        for name in node.input:
            if name in types and node.op_type != "Resize":
                assert types[name] != FLOAT16, f"head node {node.name} reads FP16 tensor {name}"
    assert {o.name: types[o.name] for o in proto.graph.output} == {"anomaly_map": FLOAT, "score": FLOAT}
    assert result.metadata.precision == "fp16"


def test_fp16_fidelity_report_on_cpu_half_backend(exported):
    model, result = exported
    report = fp16_fidelity_report(model, result.path, ExportOptions())
    print(report.format())
    assert report.finite and "onnxruntime-cpu" in report.notes[0]
    # Half precision really ran (not silently FP32), and stays close to FP32.
    assert 0 < report.map_max_abs_diff < 5e-3
    assert report.score_max_abs_diff < 5e-3
    assert report.decision_agreement is not None


def _naive_fp16_cosine(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """What a head left in half precision computes: every sum in FP16."""
    dot = (t * s).sum(1)
    return 1 - dot / (t.pow(2).sum(1).sqrt() * s.pow(2).sum(1).sqrt())


def test_fp32_head_survives_features_that_overflow_a_naive_fp16_head():
    gen = torch.Generator().manual_seed(0)
    # Features of magnitude ~20 over 1024 channels: sum of squares ~4e5 > FP16 max 65504.
    teacher = (20 + torch.randn(2, 1024, 4, 4, generator=gen)).half()
    student = (20 + torch.randn(2, 1024, 4, 4, generator=gen) * 3).half()
    naive = _naive_fp16_cosine(teacher, student)
    assert not torch.isfinite(naive).all()
    guarded = cosine_distance(teacher, student)
    assert guarded.dtype == torch.float32 and torch.isfinite(guarded).all()
    t64, s64 = teacher.double().numpy(), student.double().numpy()
    reference = 1 - (t64 * s64).sum(1) / (np.linalg.norm(t64, axis=1) * np.linalg.norm(s64, axis=1))
    np.testing.assert_allclose(guarded.numpy(), reference, atol=1e-5)


class ScaledTeacher(torch.nn.Module):
    """The teacher with its features multiplied by ``factor``: large-norm features on purpose."""

    def __init__(self, teacher, factor: float):
        super().__init__()
        self.teacher, self.factor = teacher, factor

    def forward(self, x):
        return [f * self.factor for f in self.teacher(x)]


def test_exported_fp16_graph_with_large_features_stays_finite(tmp_path):
    from mrkd.export import ExportGraph
    from export_fixtures import run_onnx
    model = small_model()
    # resnet18's stride-16 features have RMS ~1.8 over 256 channels: x12 makes their sum of squares
    # ~1e5, past FP16's 65504, while every single value still fits FP16.
    model.teacher = ScaledTeacher(model.teacher, 12.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        half = ExportGraph(model, fp16_options(ExportOptions())).eval()
        teacher_feats = half.teacher(x.half())
        student_feats = half.student(half.bottleneck(teacher_feats))
        assert all(torch.isfinite(f).all() for f in teacher_feats + student_feats)
        naive = [_naive_fp16_cosine(t, s) for t, s in zip(teacher_feats, student_feats)]
        exact = [cosine_distance(t.double(), s.double()) for t, s in zip(teacher_feats, student_feats)]
    # The construction works: a norm overflows to inf in FP16, so the naive map is inf/nan, or
    # (finite dot / inf norm = 0) silently wrong — 1 − cos stuck at 1.
    assert any(not torch.isfinite(t.pow(2).sum(1)).all() for t in teacher_feats)
    naive_error = max(float((n.double() - e).abs().nan_to_num(float("inf")).max()) for n, e in zip(naive, exact))
    assert naive_error > 0.1, naive_error
    exported = export_onnx(model, tmp_path / "big_fp16.onnx", fp16_options(ExportOptions()), simplify="never")
    out = run_onnx(exported.path, x.numpy())
    assert np.isfinite(out["anomaly_map"]).all() and np.isfinite(out["score"]).all()
    reference = model.anomaly_map(x).numpy()
    np.testing.assert_allclose(out["anomaly_map"], reference, atol=5e-3)
