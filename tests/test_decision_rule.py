"""One decision rule everywhere: a score that reaches the threshold is anomalous (score >= threshold).
Scores exactly at the threshold are the case a merge of two rules would change silently."""

import numpy as np
import pytest

from mrkd.runtime.line.alarms import AlarmPolicy, is_anomalous


def test_rule_at_the_threshold():
    assert is_anomalous(0.5, 0.5) is True and is_anomalous(0.4999, 0.5) is False
    np.testing.assert_array_equal(is_anomalous(np.array([0.4, 0.5, 0.6], np.float32), 0.5), [False, True, True])


def test_alarm_policy_counts_a_score_at_the_threshold():
    policy = AlarmPolicy(threshold=0.5, debounce=(1, 1))
    assert policy.update(0, 0.0, 0.5) is not None


def test_export_reports_use_the_runtimes_rule():
    torch = pytest.importorskip("torch")  # noqa: F841 - export.parity needs torch
    from types import SimpleNamespace

    from mrkd.export.parity import compare
    from mrkd.runtime.metadata import GraphOutputs
    layout = SimpleNamespace(image_size=4, per_scale_outputs=False, smoothing_in_graph=True,   # graph gives score
                             outputs=GraphOutputs(anomaly_map="anomaly_map", score="score"))
    maps = np.zeros((2, 1, 4, 4), np.float32)
    reference = {"anomaly_map": maps, "score": np.array([0.5, 0.7])}
    candidate = {"anomaly_map": maps, "score": np.array([0.4999, 0.7])}
    # at 0.5: the reference's first image is anomalous (>=), the candidate's is not
    assert compare("rule", reference, candidate, layout, threshold=0.5).decision_agreement == 0.5


def test_evaluation_counts_use_the_same_rule():
    pytest.importorskip("torch")
    from mrkd.train.metrics import precision_recall_f1
    counts = precision_recall_f1(np.array([1, 0]), np.array([0.5, 0.2]), threshold=0.5)
    assert counts["recall"] == 1.0
